//! The REST API (`/v1/...`): rooms and messages over HTTP, presence status, admin
//! pushes, notifications and disconnects. Same authorization as over WebSocket: every
//! call goes the same gRPC path, with the caller from the Bearer token.

use std::time::{Duration, Instant};

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chat_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::auth::{self, Claims};
use crate::backend::caller;
use crate::error::{CommandError, ErrorCode, HttpError};
use crate::protocol::client::{self, CreateRoom, MarkRead, NotifyReq, PushReq, SendReq};
use crate::protocol::{json, Id};
use crate::ratelimit::Verdict;
use crate::state::AppState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// Longest push event name.
const MAX_EVENT_CHARS: usize = 64;

/// Every JSON `/v1` route, each registered together with its OpenAPI description.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_room, list_rooms))
        .routes(routes!(history, send))
        .routes(routes!(search))
        .routes(routes!(receipts))
        .routes(routes!(thread))
        .routes(routes!(dead_webhooks))
        .routes(routes!(replay_webhook))
        .routes(routes!(replay_webhooks))
        .routes(routes!(me_status))
        .routes(routes!(user_status))
        .routes(routes!(disconnect))
        .routes(routes!(connections))
        .routes(routes!(push))
        .routes(routes!(notify, list_notifications))
        .routes(routes!(mark_notifications_read))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
}

type ApiResult<T> = Result<T, HttpError>;

/// The caller, from `Authorization: Bearer <jwt>` (401 without a valid one), within
/// their request rate (429 `rate_limited` with `Retry-After` past it). Every `/v1` route
/// with a caller takes this (or [`Admin`]), so none escapes the limit; the limit is
/// checked before any body is read.
pub struct User(pub Claims);

impl FromRequestParts<AppState> for User {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer)
            .ok_or_else(|| HttpError::unauthorized("a Bearer token is required"))?;
        let claims = state.authenticate(token).map_err(|e| HttpError::unauthorized(e.to_string()))?;
        if let Err(wait) = state.rest_limits().check(&claims.sub, Instant::now()) {
            state.metrics().rate_limited.inc();
            return Err(rate_limited("too many requests", wait));
        }
        Ok(User(claims))
    }
}

/// A caller with the JWT role `admin` (403 otherwise).
pub struct Admin(pub Claims);

impl FromRequestParts<AppState> for Admin {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let User(claims) = User::from_request_parts(parts, state).await?;
        if !claims.is_admin() {
            return Err(HttpError::forbidden("admin only"));
        }
        Ok(Admin(claims))
    }
}

/// A JSON body whose rejections use the API's error format (400, or 413 when too large).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(HttpError(CommandError::new(
                ErrorCode::TooLarge,
                format!("request bodies are at most {MAX_JSON_BODY} bytes"),
            ))),
            Err(rejection) => Err(HttpError::bad_request(rejection.body_text())),
        }
    }
}

/// Query parameters whose rejections use the API's error format.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Params(v))
            .map_err(|rejection| HttpError::bad_request(rejection.body_text()))
    }
}

/// A 429 telling the client how long to wait.
fn rate_limited(message: &str, wait: Duration) -> HttpError {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    HttpError(CommandError::rate_limited(format!("{message}; retry in {ms} ms"), ms))
}

/// A REST send spends a token of the user's command bucket on this gateway, shared with
/// their WebSocket connections, so switching to HTTP buys no extra sends.
fn spend_send(state: &AppState, user: &str) -> ApiResult<()> {
    let limits = state.limits();
    let mut limiter = limits.connect(user);
    let verdict = limiter.check(Instant::now());
    limits.disconnect(user, limiter);
    if verdict != Verdict::Allow {
        state.metrics().rate_limited.inc();
    }
    match verdict {
        Verdict::Allow => Ok(()),
        Verdict::Refuse(wait) => Err(rate_limited("too many sends", wait)),
        // A limiter that refused just once is never abuse; should that change, still only 429.
        _ => Err(rate_limited("too many sends", Duration::from_secs(1))),
    }
}

fn created<T: Serialize>(body: T) -> Response {
    (StatusCode::CREATED, Json(body)).into_response()
}

#[utoipa::path(post, path = "/v1/rooms", tag = "rooms", request_body = CreateRoom, responses((status = 201, description = "`{room}`"), (status = 400, description = "invalid fields"), (status = 401, description = "no valid Bearer token"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `POST /v1/rooms` → 201 `{room}`.
#[tracing::instrument(skip_all, fields(user = %user.sub))]
async fn create_room(
    State(state): State<AppState>,
    User(user): User,
    Body(req): Body<CreateRoom>,
) -> ApiResult<Response> {
    let req = pb::CreateRoomRequest {
        caller: Some(caller(&user)),
        kind: pb::RoomKind::from(req.kind) as i32,
        name: req.name,
        members: req.members,
    };
    let room = state.backend().create_room(req).await?;
    Ok(created(json::room_body(&room)))
}

#[derive(Deserialize)]
struct RoomsQuery {
    limit: Option<u32>,
    after: Option<String>,
}

#[utoipa::path(get, path = "/v1/rooms", tag = "rooms", params(("limit" = Option<u32>, Query, description = "1..=MAX_ROOMS_PER_USER (default: that cap, 1000)"), ("after" = Option<String>, Query, description = "the previous page's `next`")), responses((status = 200, description = "`{rooms:[{id,name,kind,last_seq,unread,last_message}], has_more, next?}`"), (status = 400, description = "invalid parameters"), (status = 401, description = "no valid Bearer token"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/rooms?limit=&after=` → `{rooms, has_more, next?}`.
#[tracing::instrument(skip_all, fields(user = %user.sub))]
async fn list_rooms(
    State(state): State<AppState>,
    User(user): User,
    Params(q): Params<RoomsQuery>,
) -> ApiResult<Response> {
    let page = state.backend().list_rooms(caller(&user), client::rooms_limit(q.limit)?, q.after).await?;
    Ok(Json(json::rooms_body(&page)).into_response())
}

#[derive(Deserialize)]
struct SearchQuery {
    q: String,
    room: Option<String>,
    before_id: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/search", tag = "rooms", params(("q" = String, Query, description = "words, \"quoted phrases\" and -excluded words"), ("room" = Option<String>, Query, description = "only this room"), ("before_id" = Option<String>, Query, description = "the last result's message id, for the next page"), ("limit" = Option<u32>, Query, description = "1..=50, default 20")), responses((status = 200, description = "`{results: [{message, snippet}], has_more}`, newest first"), (status = 400, description = "blank or over-long `q`, or invalid parameters"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "`room` is one the caller is not a member of"), (status = 404, description = "no such room"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/search?q=&room=&before_id=&limit=` → `{results, has_more}`: the `search`
/// command over REST.
#[tracing::instrument(skip_all, fields(user = %user.sub))]
async fn search(
    State(state): State<AppState>,
    User(user): User,
    Params(q): Params<SearchQuery>,
) -> ApiResult<Response> {
    state.spend_search(&user.sub)?;
    let room = q.room.map(Id::parse).transpose()?;
    let before_id = q.before_id.map(Id::parse).transpose()?;
    let req = client::search_request(caller(&user), q.q, room, before_id, q.limit)?;
    let page = state.backend().search(req).await?;
    Ok(Json(json::search_body(&page)).into_response())
}

#[derive(Deserialize)]
struct DeadQuery {
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/admin/webhooks/dead", tag = "admin", params(("limit" = Option<u32>, Query, description = "1..=1000, default 100")), responses((status = 200, description = "`{webhooks: [{id, user_id, room, seq, attempts, last_error, created_at}]}`, oldest first"), (status = 400, description = "invalid limit"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "admin only"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/admin/webhooks/dead` (admin) → the webhooks that ran out of retries.
#[tracing::instrument(skip_all, fields(admin = %admin.sub))]
async fn dead_webhooks(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Params(q): Params<DeadQuery>,
) -> ApiResult<Response> {
    let webhooks = state.backend().dead_webhooks(caller(&admin), q.limit.unwrap_or(0)).await?;
    Ok(Json(json::dead_webhooks_body(&webhooks)).into_response())
}

#[utoipa::path(post, path = "/v1/admin/webhooks/dead/{id}/replay", tag = "admin", params(("id" = String, Path, description = "the webhook-id")), responses((status = 200, description = "`{replayed: 1}`: sent again, with a fresh retry window and the same webhook-id"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "admin only"), (status = 404, description = "no dead webhook with this id"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `POST /v1/admin/webhooks/dead/{id}/replay` (admin) → `{replayed}`.
#[tracing::instrument(skip_all, fields(admin = %admin.sub, webhook = %id))]
async fn replay_webhook(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let replayed = state.backend().replay_webhooks(caller(&admin), Some(id)).await?;
    Ok(Json(serde_json::json!({ "replayed": replayed })).into_response())
}

#[utoipa::path(post, path = "/v1/admin/webhooks/dead/replay", tag = "admin", responses((status = 200, description = "`{replayed}`: every dead webhook sent again"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "admin only"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `POST /v1/admin/webhooks/dead/replay` (admin) → `{replayed}`.
#[tracing::instrument(skip_all, fields(admin = %admin.sub))]
async fn replay_webhooks(State(state): State<AppState>, Admin(admin): Admin) -> ApiResult<Response> {
    let replayed = state.backend().replay_webhooks(caller(&admin), None).await?;
    Ok(Json(serde_json::json!({ "replayed": replayed })).into_response())
}

#[derive(Deserialize)]
struct ThreadQuery {
    after_seq: Option<i64>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/rooms/{id}/threads/{root_seq}", tag = "rooms", params(("id" = String, Path, description = "room id"), ("root_seq" = i64, Path, description = "the seq of the thread's first message"), ("after_seq" = Option<i64>, Query, description = "the last reply of the previous page"), ("limit" = Option<u32>, Query, description = "1..=100, default 50")), responses((status = 200, description = "`{root, replies, has_more}`: replies in seq order"), (status = 400, description = "invalid parameters"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "not a member"), (status = 404, description = "no such room, or no message at root_seq"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/rooms/{id}/threads/{root_seq}?after_seq=&limit=` → `{root, replies, has_more}`.
#[tracing::instrument(skip_all, fields(user = %user.sub, room = %room))]
async fn thread(
    State(state): State<AppState>,
    User(user): User,
    Path((room, root_seq)): Path<(String, i64)>,
    Params(q): Params<ThreadQuery>,
) -> ApiResult<Response> {
    let room = Id::parse(room)?;
    let req = pb::ThreadRequest {
        caller: Some(caller(&user)),
        room_id: room.into_string(),
        root_seq,
        after_seq: q.after_seq,
        limit: client::page_limit(q.limit)?,
    };
    let thread = state.backend().thread(req).await?;
    Ok(Json(json::thread_body(&thread)).into_response())
}

#[utoipa::path(get, path = "/v1/rooms/{id}/receipts", tag = "rooms", params(("id" = String, Path, description = "room id")), responses((status = 200, description = "`{members: [{user_id, delivered_seq, read_seq}]}`, by user id"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "not a member"), (status = 404, description = "no such room"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/rooms/{id}/receipts` → `{members}`: the `receipts` command over REST.
#[tracing::instrument(skip_all, fields(user = %user.sub, room = %room))]
async fn receipts(State(state): State<AppState>, User(user): User, Path(room): Path<String>) -> ApiResult<Response> {
    let room = Id::parse(room)?;
    let receipts = state.backend().receipts(caller(&user), room.into_string()).await?;
    Ok(Json(json::receipts_body(&receipts)).into_response())
}

#[derive(Deserialize)]
struct HistoryQuery {
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/rooms/{id}/messages", tag = "rooms", params(("id" = String, Path, description = "room id"), ("before_seq" = Option<i64>, Query), ("after_seq" = Option<i64>, Query), ("limit" = Option<u32>, Query, description = "1..=100, default 50")), responses((status = 200, description = "`{messages, has_more}`"), (status = 400, description = "invalid parameters"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "not a member"), (status = 404, description = "no such room"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/rooms/{id}/messages?before_seq=&after_seq=&limit=` → `{messages, has_more}`.
#[tracing::instrument(skip_all, fields(user = %user.sub, room = %room))]
async fn history(
    State(state): State<AppState>,
    User(user): User,
    Path(room): Path<String>,
    Params(q): Params<HistoryQuery>,
) -> ApiResult<Response> {
    let room = Id::parse(room)?;
    let limit = client::page_limit(q.limit)?;
    let req = pb::HistoryRequest {
        caller: Some(caller(&user)),
        room_id: room.into_string(),
        before_seq: q.before_seq,
        after_seq: q.after_seq,
        limit,
    };
    let page = state.backend().history(req).await?;
    Ok(Json(json::page_body(&page)).into_response())
}

#[utoipa::path(post, path = "/v1/rooms/{id}/messages", tag = "rooms", params(("id" = String, Path, description = "room id")), request_body = SendReq, responses((status = 201, description = "`{message}`"), (status = 400, description = "invalid fields"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "not a member"), (status = 404, description = "no such room"), (status = 413, description = "body over 64 KiB"), (status = 429, description = "over the user's request or send rate; `Retry-After` says when to retry")))]
/// `POST /v1/rooms/{id}/messages` → 201 `{message}`: the same path as a WebSocket
/// `send`, so every joined connection on every gateway gets the `message` event.
#[tracing::instrument(skip_all, fields(user = %user.sub, room = %room))]
async fn send(
    State(state): State<AppState>,
    User(user): User,
    Path(room): Path<String>,
    Body(req): Body<SendReq>,
) -> ApiResult<Response> {
    let room = Id::parse(room)?;
    spend_send(&state, &user.sub)?;
    let req = pb::SendMessageRequest {
        caller: Some(caller(&user)),
        room_id: room.into_string(),
        text: req.text,
        kind: req.kind,
        attachment_ids: req.attachments,
        reply_to: req.reply_to,
        client_msg_id: req.client_msg_id,
    };
    let message = state.backend().send_message(req).await?;
    Ok(created(json::message_body(&message)))
}

async fn status_of(state: &AppState, user_id: String) -> ApiResult<Response> {
    let connections = state.presence().connections(&user_id).await?;
    Ok(Json(json::status_body(&user_id, connections)).into_response())
}

#[utoipa::path(get, path = "/v1/me/status", tag = "presence", responses((status = 200, description = "`{user_id, online, connections}`"), (status = 401, description = "no valid Bearer token"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/me/status` → `{user_id, online, connections}` across the cluster.
#[tracing::instrument(skip_all, fields(user = %user.sub))]
async fn me_status(State(state): State<AppState>, User(user): User) -> ApiResult<Response> {
    status_of(&state, user.sub).await
}

#[utoipa::path(get, path = "/v1/users/{id}/status", tag = "admin", params(("id" = String, Path, description = "user id")), responses((status = 200, description = "`{user_id, online, connections}`"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "admin only"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/users/{id}/status` (admin) → `{user_id, online, connections}`.
#[tracing::instrument(skip_all, fields(admin = %admin.sub, target = %user_id))]
async fn user_status(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(user_id): Path<String>,
) -> ApiResult<Response> {
    status_of(&state, user_id).await
}

#[utoipa::path(get, path = "/v1/connections", tag = "admin", responses((status = 200, description = "`{users:[{user_id, connections}]}`"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "admin only"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/connections` (admin) → `{users:[{user_id, connections}]}` across the cluster.
#[tracing::instrument(skip_all, fields(admin = %admin.sub))]
async fn connections(State(state): State<AppState>, Admin(admin): Admin) -> ApiResult<Response> {
    let users = state.presence().everyone().await?;
    Ok(Json(json::connections_body(users)).into_response())
}

#[utoipa::path(delete, path = "/v1/users/{id}/connections", tag = "admin", params(("id" = String, Path, description = "user id")), responses((status = 204, description = "the user's sockets close with 1008 on every gateway"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "admin only"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `DELETE /v1/users/{id}/connections` (admin) → 204; the user's sockets on every
/// gateway close with 1008.
#[tracing::instrument(skip_all, fields(admin = %admin.sub, target = %user_id))]
async fn disconnect(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(user_id): Path<String>,
) -> ApiResult<Response> {
    let event = pb::envelope::Event::Disconnect(pb::Disconnect { user_id: user_id.clone() });
    state.events().user(&user_id, event).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/push", tag = "admin", request_body = PushReq, responses((status = 202, description = "delivered as `push` to every connection addressed"), (status = 400, description = "invalid fields"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "admin only"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `POST /v1/push` (admin) `{user_ids:[...] | all:true, event, data}` → 202; every
/// connection of those users (or of everyone), on every gateway, gets `push`.
#[tracing::instrument(skip_all, fields(admin = %admin.sub))]
async fn push(State(state): State<AppState>, Admin(admin): Admin, Body(req): Body<PushReq>) -> ApiResult<Response> {
    let n = req.event.chars().count();
    if n == 0 || n > MAX_EVENT_CHARS {
        return Err(HttpError::bad_request(format!("event must be 1 to {MAX_EVENT_CHARS} characters")));
    }
    let push = pb::Push { event: req.event, data_json: req.data.to_string() };
    let events = state.events();
    match (req.all, req.user_ids) {
        (true, None) => events.everyone(pb::envelope::Event::Push(push)).await?,
        (false, Some(users)) if !users.is_empty() => {
            for user in &users {
                events.user(user, pb::envelope::Event::Push(push.clone())).await?;
            }
        }
        _ => return Err(HttpError::bad_request("give either a non-empty user_ids or all: true")),
    }
    Ok((StatusCode::ACCEPTED, Json(json::empty_body())).into_response())
}

#[utoipa::path(post, path = "/v1/notifications", tag = "notifications", request_body = NotifyReq, responses((status = 201, description = "`{notifications}`"), (status = 400, description = "invalid fields"), (status = 401, description = "no valid Bearer token"), (status = 403, description = "admin only"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `POST /v1/notifications` (admin) → 201 `{notifications}`; stored, and delivered live
/// as `notification` to every connection of each user.
#[tracing::instrument(skip_all, fields(admin = %admin.sub))]
async fn notify(State(state): State<AppState>, Admin(admin): Admin, Body(req): Body<NotifyReq>) -> ApiResult<Response> {
    let req = pb::CreateNotificationsRequest {
        caller: Some(caller(&admin)),
        user_ids: req.user_ids,
        title: req.title,
        body: req.body,
        data_json: req.data.to_string(),
    };
    let stored = state.backend().create_notifications(req).await?;
    Ok(created(json::notifications_body(&stored)))
}

#[derive(Deserialize)]
struct NotificationsQuery {
    before: Option<String>,
    limit: Option<u32>,
    #[serde(default)]
    unread: bool,
}

#[utoipa::path(get, path = "/v1/notifications", tag = "notifications", params(("before" = Option<String>, Query, description = "notification id: older ones only"), ("limit" = Option<u32>, Query), ("unread" = Option<bool>, Query)), responses((status = 200, description = "`{notifications, has_more, unread}`"), (status = 400, description = "invalid parameters"), (status = 401, description = "no valid Bearer token"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `GET /v1/notifications?before=&limit=&unread=` → `{notifications, has_more, unread}`,
/// the caller's own, newest first.
#[tracing::instrument(skip_all, fields(user = %user.sub))]
async fn list_notifications(
    State(state): State<AppState>,
    User(user): User,
    Params(q): Params<NotificationsQuery>,
) -> ApiResult<Response> {
    let limit = client::page_limit(q.limit)?;
    let req =
        pb::ListNotificationsRequest { caller: Some(caller(&user)), before_id: q.before, limit, unread_only: q.unread };
    let page = state.backend().list_notifications(req).await?;
    Ok(Json(json::notifications_page_body(&page)).into_response())
}

#[utoipa::path(post, path = "/v1/notifications/read", tag = "notifications", request_body = MarkRead, responses((status = 200, description = "`{updated}`"), (status = 400, description = "neither ids nor all"), (status = 401, description = "no valid Bearer token"), (status = 429, description = "over the caller's request rate; `Retry-After` says when to retry")))]
/// `POST /v1/notifications/read {ids:[...] | all:true}` → `{updated}`.
#[tracing::instrument(skip_all, fields(user = %user.sub))]
async fn mark_notifications_read(
    State(state): State<AppState>,
    User(user): User,
    Body(req): Body<MarkRead>,
) -> ApiResult<Response> {
    let req = pb::MarkNotificationsReadRequest { caller: Some(caller(&user)), ids: req.ids, all: req.all };
    let updated = state.backend().mark_notifications_read(req).await?;
    Ok(Json(json::updated_body(updated)).into_response())
}

/// Unknown `/v1` paths: 404 in the API's error format.
pub async fn not_found() -> HttpError {
    HttpError(CommandError::new(ErrorCode::NotFound, "no such endpoint"))
}
