//! `POST /v1/attachments` and `GET /v1/attachments/{id}`: both streamed part by part
//! through a bounded number of transfer slots (never a whole file in memory), uploads
//! under a hard limit, types checked against an allowlist, downloads served with headers
//! that keep browsers from running them.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body as RawBody, BodyDataStream, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chat_proto::v1 as pb;
use futures_util::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::backend::caller;
use crate::error::{CommandError, ErrorCode, HttpError};
use crate::metrics::Metrics;
use crate::protocol::json;
use crate::rest::{Params, User};
use crate::state::AppState;

/// Largest upload.
pub const MAX_UPLOAD: usize = 10 * 1024 * 1024;

/// Bytes per upload call to the message service: its part size, so each call is one row.
const PART_BYTES: usize = 64 * 1024;

/// Declared types kept as they are; anything else is stored as
/// `application/octet-stream`. No HTML, SVG or script types: those could run in a
/// browser that opens the download.
const ALLOWED_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "audio/mpeg",
    "audio/ogg",
    "audio/webm",
    "video/mp4",
    "video/webm",
    "application/zip",
];

/// The attachment routes, with their OpenAPI descriptions.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upload)).routes(routes!(download))
}

/// The stored content type for a declared one.
pub fn allowed_type(declared: Option<&str>) -> &'static str {
    let mime = declared.and_then(|d| d.split(';').next()).map(|m| m.trim().to_ascii_lowercase());
    ALLOWED_TYPES.iter().find(|t| Some(**t) == mime.as_deref()).copied().unwrap_or("application/octet-stream")
}

fn too_large() -> HttpError {
    HttpError(CommandError::new(ErrorCode::TooLarge, format!("attachments are at most {MAX_UPLOAD} bytes")))
}

/// Attachment uploads and downloads streaming at once on this gateway. Each holds about
/// one part (64 KiB) here whatever the file's size, so the slots bound both memory and
/// the load this gateway puts on the message service.
pub struct Transfers {
    slots: Arc<Semaphore>,
    /// Transfers each user has in flight or waiting: one user may hold at most
    /// `per_user` of the slots, so a slow or hostile client cannot take them all.
    users: Arc<Mutex<HashMap<String, usize>>>,
    per_user: usize,
    /// How long a transfer waits for a slot before it is refused (503).
    wait: Duration,
    /// A client that neither sends (upload) nor reads (download) for this long is cut
    /// off: otherwise it would hold its slot for ever.
    stall: Duration,
}

/// A transfer's slot, counted in the `attachment_transfers` gauge while held.
pub struct TransferSlot {
    _permit: OwnedSemaphorePermit,
    _share: UserShare,
    gauge: Gauge<i64, AtomicI64>,
}

/// One of a user's transfers, counted from the moment it asks for a slot.
struct UserShare {
    users: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

impl Drop for UserShare {
    fn drop(&mut self) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
    }
}

impl Drop for TransferSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Transfers {
    /// `slots` transfers at once, at most `per_user` of them one user's; more wait up to
    /// `wait`; a client stalled for `stall` loses its slot.
    pub fn new(slots: usize, per_user: usize, wait: Duration, stall: Duration) -> Self {
        let users = Arc::new(Mutex::new(HashMap::new()));
        Self { slots: Arc::new(Semaphore::new(slots)), users, per_user, wait, stall }
    }

    /// A slot for `user`: 429 `rate_limited` when they already have `per_user` transfers
    /// in flight (or waiting), else 503 `unavailable` with `Retry-After` once none freed
    /// up within the wait.
    pub async fn slot(&self, user: &str, metrics: &Metrics) -> Result<TransferSlot, HttpError> {
        let share = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let n = users.entry(user.to_owned()).or_insert(0);
            if *n >= self.per_user {
                return Err(HttpError(CommandError {
                    code: ErrorCode::RateLimited,
                    message: format!("at most {} attachment transfers of yours at once", self.per_user),
                    retry_after_ms: Some(1000),
                }));
            }
            *n += 1;
            UserShare { users: self.users.clone(), user: user.to_owned() }
        };
        match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                metrics.attachment_transfers.inc();
                Ok(TransferSlot { _permit: permit, _share: share, gauge: metrics.attachment_transfers.clone() })
            }
            _ => Err(HttpError(CommandError {
                code: ErrorCode::Unavailable,
                message: "too many attachment transfers in flight; retry".to_owned(),
                retry_after_ms: Some(1000),
            })),
        }
    }
}

/// A busy or unreachable message service (its own download streams all taken, say)
/// answers like a full gateway: 503 with `Retry-After`.
fn come_back(mut err: CommandError) -> HttpError {
    if err.code == ErrorCode::Unavailable && err.retry_after_ms.is_none() {
        err.retry_after_ms = Some(1000);
    }
    HttpError(err)
}

/// Reads an upload's body in parts of [`PART_BYTES`], never holding more than one.
struct PartReader {
    body: BodyDataStream,
    stall: Duration,
    /// Read from the body but not yet in a part.
    pending: Bytes,
    total: usize,
    ended: bool,
}

impl PartReader {
    fn new(body: RawBody, stall: Duration) -> Self {
        Self { body: body.into_data_stream(), stall, pending: Bytes::new(), total: 0, ended: false }
    }

    /// The next part: full-sized unless it is the last; `None` after the last. Refuses a
    /// body over [`MAX_UPLOAD`] as soon as it passes the limit, and a client that sends
    /// nothing for the stall time (it would hold a transfer slot for ever).
    async fn next_part(&mut self) -> Result<Option<Vec<u8>>, HttpError> {
        let mut part = Vec::new();
        loop {
            if !self.pending.is_empty() {
                if part.is_empty() {
                    part.reserve_exact(PART_BYTES);
                }
                let take = (PART_BYTES - part.len()).min(self.pending.len());
                part.extend_from_slice(&self.pending.split_to(take));
                if part.len() == PART_BYTES {
                    return Ok(Some(part));
                }
            }
            if self.ended {
                return Ok((!part.is_empty()).then_some(part));
            }
            match tokio::time::timeout(self.stall, self.body.next()).await {
                Err(_) => {
                    return Err(HttpError::bad_request(format!(
                        "the upload stalled: nothing arrived for {} s",
                        self.stall.as_secs_f64()
                    )))
                }
                Ok(None) => self.ended = true,
                Ok(Some(Err(_))) => return Err(HttpError::bad_request("the upload was cut off")),
                Ok(Some(Ok(bytes))) => {
                    self.total += bytes.len();
                    if self.total > MAX_UPLOAD {
                        return Err(too_large());
                    }
                    self.pending = bytes;
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct UploadQuery {
    #[serde(default)]
    name: Option<String>,
}

#[utoipa::path(post, path = "/v1/attachments", tag = "attachments",
    params(("name" = Option<String>, Query, description = "file name")),
    request_body(content = String, content_type = "application/octet-stream", description = "the file's bytes; Content-Type is kept if allowlisted"),
    responses((status = 201, description = "`{attachment:{id,name,content_type,size,url}}`"), (status = 400, description = "empty body, or no bytes for 30 s"),
        (status = 401, description = "no valid Bearer token"), (status = 413, description = "over 10 MiB"),
        (status = 429, description = "over the request rate, or the upload quota used up; `Retry-After` says when to retry"),
        (status = 503, description = "every transfer slot busy; `Retry-After` says when to retry")))]
/// `POST /v1/attachments?name=` with the raw bytes as the body → 201 `{attachment}`;
/// 413 over 10 MiB. The body goes on to the message service part by part as it arrives.
#[tracing::instrument(skip_all, fields(user = %user.sub))]
async fn upload(
    State(state): State<AppState>,
    User(user): User,
    Params(q): Params<UploadQuery>,
    headers: HeaderMap,
    body: RawBody,
) -> Result<Response, HttpError> {
    let declared_len =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared_len.is_some_and(|n| n > MAX_UPLOAD) {
        return Err(too_large());
    }
    let _slot = state.transfers().slot(&user.sub, state.metrics()).await?;
    let mut parts = PartReader::new(body, state.transfers().stall);
    // The first part before anything is stored: an empty body costs nothing.
    let Some(first) = parts.next_part().await? else {
        return Err(HttpError::bad_request("the body is the file; it is empty"));
    };
    let content_type = allowed_type(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()));
    let backend = state.backend();
    let begin = pb::BeginUploadRequest {
        caller: Some(caller(&user)),
        name: q.name.unwrap_or_default(),
        content_type: content_type.to_owned(),
    };
    let upload_id = backend.begin_upload(begin).await.map_err(come_back)?;
    // Dropped if this handler is (the client went); on an error, dropped before answering.
    let mut unfinished = Unfinished { state: state.clone(), caller: caller(&user), upload_id: Some(upload_id.clone()) };
    let stored = async {
        let mut next = Some(first);
        let mut part = 0;
        while let Some(data) = next {
            let req = pb::AppendUploadRequest { caller: Some(caller(&user)), upload_id: upload_id.clone(), part, data };
            backend.append_upload(req).await.map_err(come_back)?;
            part += 1;
            next = parts.next_part().await?;
        }
        let finish = pb::FinishUploadRequest { caller: Some(caller(&user)), upload_id: upload_id.clone() };
        backend.finish_upload(finish).await.map_err(come_back)
    };
    let result = stored.await;
    match result {
        Ok(attachment) => {
            unfinished.upload_id = None;
            Ok((StatusCode::CREATED, Json(json::attachment_body(&attachment))).into_response())
        }
        Err(err) => {
            let abort = pb::AbortUploadRequest { caller: Some(caller(&user)), upload_id };
            if let Err(abort_err) = backend.abort_upload(abort).await {
                tracing::warn!(%abort_err, "could not drop a failed upload; the collector will");
            }
            // Only now: should the client go while the abort runs, the guard aborts again.
            unfinished.upload_id = None;
            Err(err)
        }
    }
}

/// An upload begun and not finished, dropped if its handler is (hyper drops it when the
/// client goes): left behind, it would count against the user's quota until the
/// collector takes it.
struct Unfinished {
    state: AppState,
    caller: pb::Caller,
    upload_id: Option<String>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else { return };
        if tokio::runtime::Handle::try_current().is_err() {
            return; // The runtime is gone: the collector will take it.
        }
        let backend = self.state.backend().clone();
        let abort = pb::AbortUploadRequest { caller: Some(self.caller.clone()), upload_id };
        self.state.tasks().spawn(async move {
            if let Err(err) = backend.abort_upload(abort).await {
                tracing::warn!(%err, "could not drop a failed upload; the collector will");
            }
        });
    }
}

#[utoipa::path(get, path = "/v1/attachments/{id}", tag = "attachments",
    params(("id" = String, Path, description = "attachment id")),
    responses((status = 200, description = "the bytes"), (status = 401, description = "no valid Bearer token"),
        (status = 403, description = "neither the uploader nor a member of a room where it was shared"),
        (status = 404, description = "no such attachment"),
        (status = 429, description = "over the request rate; `Retry-After` says when to retry"),
        (status = 503, description = "every transfer slot busy; `Retry-After` says when to retry")))]
/// `GET /v1/attachments/{id}` → the bytes, for the uploader or a member of a room
/// whose message carries the attachment, streamed part by part from the message service.
#[tracing::instrument(skip_all, fields(user = %user.sub, attachment = %id))]
async fn download(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let slot = state.transfers().slot(&user.sub, state.metrics()).await?;
    let mut stream = state
        .backend()
        .read_attachment(pb::GetAttachmentRequest { caller: Some(caller(&user)), attachment_id: id })
        .await
        .map_err(come_back)?;
    let first = stream.message().await.map_err(|status| come_back(status.into()))?;
    let meta = first.and_then(|chunk| chunk.attachment).ok_or_else(|| {
        HttpError(CommandError::from(tonic::Status::internal("the attachment stream had no metadata")))
    })?;
    let inline = meta.content_type.starts_with("image/");
    let mut headers = HeaderMap::new();
    let content_type =
        HeaderValue::from_str(&meta.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    if let Ok(disposition) = HeaderValue::from_str(&content_disposition(&meta.name, inline)) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; sandbox"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    // One part at a time, handed over as the client reads. The forwarder holds the slot;
    // a client that takes no part for the stall time is cut off and frees it (hyper
    // would otherwise wait on its socket for ever). A failure half way ends the response
    // short of its Content-Length, which the client sees as an error, never as a whole
    // file.
    let (tx, rx) = mpsc::channel::<Result<Bytes, tonic::Status>>(1);
    let stall = state.transfers().stall;
    state.tasks().spawn(async move {
        let _slot = slot;
        loop {
            let (item, last) = match stream.message().await {
                Ok(Some(chunk)) => (Ok(Bytes::from(chunk.data)), false),
                Ok(None) => return,
                Err(status) => {
                    tracing::warn!(%status, "attachment stream failed half way");
                    (Err(status), true)
                }
            };
            if tx.send_timeout(item, stall).await.is_err() {
                tracing::info!("attachment download cut off: the client stopped reading");
                return;
            }
            if last {
                return;
            }
        }
    });
    let parts = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Ok((headers, RawBody::from_stream(parts)).into_response())
}

/// `attachment; filename="<ascii>"; filename*=UTF-8''<percent-encoded>` (RFC 6266):
/// the quoted form keeps only safe ASCII, the encoded form carries the real name.
pub fn content_disposition(name: &str, inline: bool) -> String {
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        let c = b as char;
        if c.is_ascii_alphanumeric() || "!#$&+-.^_`|~".contains(c) {
            encoded.push(c);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let kind = if inline { "inline" } else { "attachment" };
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(frames: Vec<Vec<u8>>) -> RawBody {
        let frames = frames.into_iter().map(|f| Ok::<_, std::io::Error>(Bytes::from(f)));
        RawBody::from_stream(futures_util::stream::iter(frames))
    }

    async fn parts_of(frames: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, HttpError> {
        let mut reader = PartReader::new(body_of(frames), Duration::from_secs(5));
        let mut parts = Vec::new();
        while let Some(part) = reader.next_part().await? {
            parts.push(part);
        }
        Ok(parts)
    }

    #[tokio::test]
    async fn a_body_is_cut_into_full_parts_whatever_its_frames_but_the_last() {
        let data: Vec<u8> = (0..(2 * PART_BYTES + 100)).map(|i| (i % 251) as u8).collect();
        // Frames that straddle part boundaries, one empty.
        let frames = vec![
            data[..1000].to_vec(),
            Vec::new(),
            data[1000..PART_BYTES + 7].to_vec(),
            data[PART_BYTES + 7..].to_vec(),
        ];
        let parts = parts_of(frames).await.unwrap();
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [PART_BYTES, PART_BYTES, 100]);
        assert_eq!(parts.concat(), data);
        assert!(parts_of(vec![Vec::new()]).await.unwrap().is_empty(), "an empty body has no part");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_refused_as_soon_as_it_passes() {
        let frames = vec![vec![0u8; MAX_UPLOAD], vec![0u8; 1]];
        let err = parts_of(frames).await.unwrap_err();
        assert_eq!(err.0.code, ErrorCode::TooLarge);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_refused_after_the_stall_time() {
        let frames = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"abc"))])
            .chain(futures_util::stream::pending());
        let mut reader = PartReader::new(RawBody::from_stream(frames), Duration::from_secs(30));
        let err = reader.next_part().await.unwrap_err();
        assert_eq!(err.0.code, ErrorCode::BadRequest);
        assert!(err.0.message.contains("stalled"), "{}", err.0.message);
    }

    #[test]
    fn only_allowlisted_types_survive() {
        assert_eq!(allowed_type(Some("image/png")), "image/png");
        assert_eq!(allowed_type(Some("Text/Plain; charset=utf-8")), "text/plain");
        assert_eq!(allowed_type(Some("text/html")), "application/octet-stream");
        assert_eq!(allowed_type(Some("image/svg+xml")), "application/octet-stream");
        assert_eq!(allowed_type(None), "application/octet-stream");
    }

    #[test]
    fn dispositions_cannot_break_out_of_the_header() {
        let d = content_disposition("re\"port\r\n.pdf", false);
        assert_eq!(d, "attachment; filename=\"re_port__.pdf\"; filename*=UTF-8''re%22port%0D%0A.pdf");
        let d = content_disposition("café.png", true);
        assert!(d.starts_with("inline; filename=\"caf_.png\""), "{d}");
        assert!(d.ends_with("caf%C3%A9.png"), "{d}");
    }
}
