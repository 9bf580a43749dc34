//! The `chat.v1.ChatService` gRPC handlers: validate, store, publish.

use chat_common::events::{EventBus, PublishError};
use chat_proto::v1::chat_service_server::ChatService;
use chat_proto::v1::envelope::Event;
use chat_proto::v1::*;
use futures_util::StreamExt;
use tonic::{Request, Response, Status};

use crate::attachments::AttachmentLimits;
use crate::blobs::PART_BYTES;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::store::{parse_rooms_cursor, Committer, NewMessage, Page, RoomsPage, SearchQuery, Store};
use crate::validate;

/// The gRPC service: a store and the event bus.
#[derive(Clone)]
pub struct GrpcHandlers {
    store: Store,
    /// Group commit: stores every send.
    committer: Committer,
    events: EventBus,
    /// Longest message text accepted, in characters.
    max_text_chars: usize,
    metrics: Metrics,
    /// Upload quota and download streams.
    attachments: AttachmentLimits,
    /// A replayed dead webhook's new retry window (`WEBHOOK_RETRY_FOR_SECS`).
    webhook_retry_for: std::time::Duration,
}

impl GrpcHandlers {
    /// The service over its backends, with no upload quota until
    /// [`GrpcHandlers::with_attachment_limits`] sets one.
    pub fn new(store: Store, committer: Committer, events: EventBus, max_text_chars: usize, metrics: Metrics) -> Self {
        let attachments = AttachmentLimits::new(0, std::time::Duration::ZERO, DEFAULT_STREAMS);
        let webhook_retry_for = std::time::Duration::from_secs(86_400);
        Self { store, committer, events, max_text_chars, metrics, attachments, webhook_retry_for }
    }

    /// The same service replaying dead webhooks for `retry_for`.
    pub fn with_webhook_retry_for(mut self, retry_for: std::time::Duration) -> Self {
        self.webhook_retry_for = retry_for;
        self
    }

    /// The same service with these attachment limits.
    pub fn with_attachment_limits(mut self, limits: AttachmentLimits) -> Self {
        self.attachments = limits;
        self
    }
}

/// A stream of one attachment: metadata, then its parts.
pub type AttachmentStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<AttachmentChunk, Status>> + Send>>;

/// An upload id as issued by `BeginUpload`; anything else names nothing.
fn upload_id(id: &str) -> Result<i64, ServiceError> {
    id.parse::<i64>().map_err(|_| ServiceError::NotFound("upload"))
}

/// Every request must say who is calling; the gateway fills this from the verified token.
/// Admins only (the gateway checked the token; this checks the claim it forwarded).
fn admin(caller: Caller) -> Result<Caller, ServiceError> {
    if caller.admin {
        Ok(caller)
    } else {
        Err(ServiceError::Forbidden("admin only"))
    }
}

fn caller(caller: Option<Caller>) -> Result<Caller, ServiceError> {
    let caller = caller.ok_or_else(|| ServiceError::InvalidArgument("caller is required".into()))?;
    validate::user_id(&caller.user_id)?;
    validate::sender_name(caller.name.as_deref())?;
    tracing::Span::current().record("user", caller.user_id.as_str());
    Ok(caller)
}

/// Downloads at once when nothing else is configured (`ATTACHMENT_STREAMS`'s default).
pub const DEFAULT_STREAMS: usize = 32;

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ChatService for GrpcHandlers {
    #[tracing::instrument(skip_all, fields(user))]
    async fn create_room(&self, req: Request<CreateRoomRequest>) -> Reply<CreateRoomResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let kind = RoomKind::try_from(req.kind)
            .ok()
            .filter(|k| *k != RoomKind::Unspecified)
            .ok_or_else(|| ServiceError::InvalidArgument("kind must be group, direct or support".into()))?;
        let name = validate::room_name(req.name)?;
        let members = validate::members(&caller.user_id, req.members)?;
        let (room, created) = self.store.create_room(&caller, kind, name, members).await?;
        for member in room.members.iter().filter(|m| created && m.user_id != caller.user_id) {
            let event = Event::RoomAdded(RoomAdded { user_id: member.user_id.clone(), room: Some(room.clone()) });
            self.events.user(&member.user_id, event).await.unwrap_or_else(not_published);
        }
        Ok(Response::new(CreateRoomResponse { room: Some(room) }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn join_room(&self, req: Request<JoinRoomRequest>) -> Reply<JoinRoomResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let room_id = validate::room_id(&req.room_id)?;
        let (last_seq, members) = self.store.join(&caller, room_id).await?;
        Ok(Response::new(JoinRoomResponse { last_seq, members }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id, seq))]
    async fn send_message(&self, req: Request<SendMessageRequest>) -> Reply<SendMessageResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let room_id = validate::room_id(&req.room_id)?;
        let attachments = validate::attachment_ids(&req.attachment_ids)?;
        validate::text(&req.text, !attachments.is_empty(), self.max_text_chars)?;
        let kind = validate::message_kind(req.kind.as_deref())?;
        validate::client_msg_id(req.client_msg_id.as_deref())?;
        let reply_to = req
            .reply_to
            .as_deref()
            .map(validate::message_id)
            .transpose()
            .map_err(|_| ServiceError::InvalidArgument("reply_to names no message of this room".into()))?;
        // The one check that needs the database, after every check that does not.
        let attachments = self.store.own_attachments(&caller.user_id, &attachments).await?;
        let msg = NewMessage { room_id, kind, text: req.text, reply_to, client_msg_id: req.client_msg_id, attachments };
        let (message, duplicate) = self.committer.submit(caller, msg).await?;
        if !duplicate {
            self.metrics.sends_persisted.inc();
        }
        tracing::Span::current().record("seq", message.seq);
        // Published after the commit, and again on a retry: a client retries when it did
        // not see the ack, which may also mean the first publish never happened.
        self.events.message_created(&message).await.unwrap_or_else(not_published);
        if let Some(root) = message.reply_to.as_deref().and_then(chat_common::ids::parse) {
            self.announce_root(root).await;
        }
        Ok(Response::new(SendMessageResponse { message: Some(message), duplicate }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn history(&self, req: Request<HistoryRequest>) -> Reply<HistoryResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let room_id = validate::room_id(&req.room_id)?;
        let page =
            Page { before_seq: req.before_seq, after_seq: req.after_seq, limit: validate::history_limit(req.limit)? };
        let (messages, has_more) = self.store.history(&caller, room_id, page).await?;
        Ok(Response::new(HistoryResponse { messages, has_more }))
    }

    #[tracing::instrument(skip_all, fields(user))]
    async fn search(&self, req: Request<SearchRequest>) -> Reply<SearchResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let query = SearchQuery {
            q: validate::search_query(&req.q)?,
            room_id: req.room_id.as_deref().map(validate::room_id).transpose()?,
            before_id: req.before_id.as_deref().map(validate::before_id).transpose()?,
            limit: validate::search_limit(req.limit)?,
        };
        let (hits, has_more) = self.store.search(&caller, &query).await?;
        let results = hits.into_iter().map(|h| SearchHit { message: Some(h.message), snippet: h.snippet }).collect();
        Ok(Response::new(SearchResponse { results, has_more }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn add_members(&self, req: Request<AddMembersRequest>) -> Reply<AddMembersResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let room_id = validate::room_id(&req.room_id)?;
        let members = validate::members(&caller.user_id, req.members)?;
        if members.is_empty() {
            return Err(ServiceError::InvalidArgument("members must name at least one other user".into()).into());
        }
        let (room, added) = self.store.add_members(&caller, room_id, members).await?;
        for user_id in &added {
            let event = Event::RoomAdded(RoomAdded { user_id: user_id.clone(), room: Some(room.clone()) });
            self.events.user(user_id, event).await.unwrap_or_else(not_published);
        }
        Ok(Response::new(AddMembersResponse { room: Some(room), added }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn remove_member(&self, req: Request<RemoveMemberRequest>) -> Reply<RemoveMemberResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let room_id = validate::room_id(&req.room_id)?;
        validate::user_id(&req.user_id)?;
        let removed = self.store.remove_member(&caller, room_id, &req.user_id).await?;
        if removed {
            let event = Event::RoomRemoved(RoomRemoved { user_id: req.user_id.clone(), room_id: req.room_id });
            self.events.user(&req.user_id, event).await.unwrap_or_else(not_published);
        }
        Ok(Response::new(RemoveMemberResponse { removed }))
    }

    #[tracing::instrument(skip_all, fields(user))]
    async fn list_rooms(&self, req: Request<ListRoomsRequest>) -> Reply<ListRoomsResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let max = self.store.max_rooms_page();
        let limit = match req.limit {
            0 => max,
            n if n <= max => n,
            _ => return Err(ServiceError::InvalidArgument(format!("limit must be between 1 and {max}")).into()),
        };
        let after = req.after.as_deref().map(parse_rooms_cursor).transpose()?;
        let page = self.store.list_rooms(&caller, RoomsPage { limit, after }).await?;
        Ok(Response::new(ListRoomsResponse { rooms: page.rooms, has_more: page.has_more, next: page.next }))
    }

    #[tracing::instrument(skip_all, fields(user, message = %req.get_ref().message_id))]
    async fn edit_message(&self, req: Request<EditMessageRequest>) -> Reply<EditMessageResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let message_id = validate::message_id(&req.message_id)?;
        validate::text(&req.text, false, self.max_text_chars)?;
        let message = self.store.edit_message(&caller, message_id, &req.text).await?;
        let event = Event::MessageEdited(MessageEdited { message: Some(message.clone()) });
        self.events.room(&message.room_id, event).await.unwrap_or_else(not_published);
        Ok(Response::new(EditMessageResponse { message: Some(message) }))
    }

    #[tracing::instrument(skip_all, fields(user, message = %req.get_ref().message_id))]
    async fn delete_message(&self, req: Request<DeleteMessageRequest>) -> Reply<DeleteMessageResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let message_id = validate::message_id(&req.message_id)?;
        let (room_id, seq, changed) = self.store.delete_message(&caller, message_id).await?;
        let room_id = room_id.to_string();
        if changed {
            let event =
                Event::MessageDeleted(MessageDeleted { room_id: room_id.clone(), message_id: req.message_id, seq });
            self.events.room(&room_id, event).await.unwrap_or_else(not_published);
        }
        Ok(Response::new(DeleteMessageResponse { room_id, seq }))
    }

    #[tracing::instrument(skip_all, fields(user, message = %req.get_ref().message_id))]
    async fn react(&self, req: Request<ReactRequest>) -> Reply<ReactResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let message_id = validate::message_id(&req.message_id)?;
        validate::emoji(&req.emoji)?;
        let (room_id, changed) = self.store.react(&caller, message_id, &req.emoji, req.add).await?;
        let room_id = room_id.to_string();
        if changed {
            let event = Event::Reaction(ReactionChanged {
                room_id: room_id.clone(),
                message_id: req.message_id,
                user_id: caller.user_id,
                emoji: req.emoji,
                added: req.add,
            });
            self.events.room(&room_id, event).await.unwrap_or_else(not_published);
        }
        Ok(Response::new(ReactResponse { room_id, changed }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn mark_read(&self, req: Request<MarkReadRequest>) -> Reply<MarkReadResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let room_id = validate::room_id(&req.room_id)?;
        if req.seq < 0 {
            return Err(ServiceError::InvalidArgument("seq must not be negative".into()).into());
        }
        let read_seq = self.store.mark_read(&caller, room_id, req.seq).await?;
        let event = Event::Read(ReadReceipt { room_id: req.room_id.clone(), user_id: caller.user_id, seq: read_seq });
        self.events.room(&req.room_id, event).await.unwrap_or_else(not_published);
        Ok(Response::new(MarkReadResponse { read_seq }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn thread(&self, req: Request<ThreadRequest>) -> Reply<ThreadResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let room_id = validate::room_id(&req.room_id)?;
        let page = Page { before_seq: None, after_seq: req.after_seq, limit: validate::history_limit(req.limit)? };
        let (root, replies, has_more) = self.store.thread(&caller, room_id, req.root_seq, page).await?;
        Ok(Response::new(ThreadResponse { root: Some(root), replies, has_more }))
    }

    #[tracing::instrument(skip_all)]
    async fn dead_webhooks(&self, req: Request<DeadWebhooksRequest>) -> Reply<DeadWebhooksResponse> {
        let req = req.into_inner();
        admin(caller(req.caller)?)?;
        let limit = match req.limit {
            0 => 100,
            n @ 1..=1000 => i64::from(n),
            _ => return Err(ServiceError::InvalidArgument("limit must be between 1 and 1000".into()).into()),
        };
        let webhooks = self
            .store
            .dead_webhooks(limit)
            .await?
            .into_iter()
            .map(|d| DeadWebhook {
                id: d.id,
                user_id: d.user_id,
                room_id: d.room_id.to_string(),
                seq: d.seq,
                attempts: d.attempts,
                last_error: d.last_error,
                created_at_ms: d.created_at.timestamp_millis(),
            })
            .collect();
        Ok(Response::new(DeadWebhooksResponse { webhooks }))
    }

    #[tracing::instrument(skip_all)]
    async fn replay_webhooks(&self, req: Request<ReplayWebhooksRequest>) -> Reply<ReplayWebhooksResponse> {
        let req = req.into_inner();
        admin(caller(req.caller)?)?;
        let replayed = self.store.replay_webhooks(req.id.as_deref(), self.webhook_retry_for).await?;
        if replayed == 0 && req.id.is_some() {
            return Err(ServiceError::NotFound("dead webhook").into());
        }
        Ok(Response::new(ReplayWebhooksResponse { replayed }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn receipts(&self, req: Request<ReceiptsRequest>) -> Reply<ReceiptsResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let room_id = validate::room_id(&req.room_id)?;
        Ok(Response::new(ReceiptsResponse { members: self.store.receipts(&caller, room_id).await? }))
    }

    #[tracing::instrument(skip_all, fields(deliveries = req.get_ref().deliveries.len()))]
    async fn mark_delivered(&self, req: Request<MarkDeliveredRequest>) -> Reply<MarkDeliveredResponse> {
        let deliveries = validate::deliveries(req.into_inner().deliveries)?;
        let moved = self.store.mark_delivered(&deliveries).await?;
        for delivery in &moved {
            self.events.room(&delivery.room_id, Event::Delivered(delivery.clone())).await.unwrap_or_else(not_published);
        }
        Ok(Response::new(MarkDeliveredResponse { moved }))
    }

    async fn room_seq(&self, req: Request<RoomSeqRequest>) -> Reply<RoomSeqResponse> {
        let room_id = validate::room_id(&req.get_ref().room_id)?;
        Ok(Response::new(RoomSeqResponse { last_seq: self.store.room_seq(room_id).await? }))
    }

    async fn room_messages(&self, req: Request<RoomMessagesRequest>) -> Reply<RoomMessagesResponse> {
        let req = req.into_inner();
        let room_id = validate::room_id(&req.room_id)?;
        let limit = i64::from(req.limit.clamp(1, 1000));
        let messages = self.store.room_messages(room_id, req.after_seq, req.before_seq, limit).await?;
        Ok(Response::new(RoomMessagesResponse { messages }))
    }

    #[tracing::instrument(skip_all, fields(user))]
    async fn create_notifications(
        &self,
        req: Request<CreateNotificationsRequest>,
    ) -> Reply<CreateNotificationsResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        if !caller.admin {
            return Err(ServiceError::Forbidden("only admins send notifications").into());
        }
        let data = if req.data_json.is_empty() { "null" } else { req.data_json.as_str() };
        validate::notification(&req.user_ids, &req.title, &req.body, data)?;
        let notifications = self.store.create_notifications(&req.user_ids, &req.title, &req.body, data).await?;
        for n in &notifications {
            let event = Event::Notification(NotificationCreated { notification: Some(n.clone()) });
            self.events.user(&n.user_id, event).await.unwrap_or_else(not_published);
        }
        Ok(Response::new(CreateNotificationsResponse { notifications }))
    }

    #[tracing::instrument(skip_all, fields(user))]
    async fn list_notifications(&self, req: Request<ListNotificationsRequest>) -> Reply<ListNotificationsResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let before = req.before_id.as_deref().map(validate::notification_id).transpose()?;
        let limit = validate::history_limit(req.limit)?;
        let (notifications, has_more, unread) =
            self.store.list_notifications(&caller.user_id, before, limit, req.unread_only).await?;
        Ok(Response::new(ListNotificationsResponse { notifications, has_more, unread }))
    }

    #[tracing::instrument(skip_all, fields(user))]
    async fn mark_notifications_read(
        &self,
        req: Request<MarkNotificationsReadRequest>,
    ) -> Reply<MarkNotificationsReadResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let ids: Vec<i64> = req.ids.iter().map(|id| validate::notification_id(id)).collect::<Result<_, _>>()?;
        if ids.is_empty() && !req.all {
            return Err(ServiceError::InvalidArgument("name ids, or set all".into()).into());
        }
        let updated = self.store.mark_notifications_read(&caller.user_id, &ids, req.all).await?;
        Ok(Response::new(MarkNotificationsReadResponse { updated }))
    }

    #[tracing::instrument(skip_all, fields(user))]
    async fn begin_upload(&self, req: Request<BeginUploadRequest>) -> Reply<BeginUploadResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        self.attachments.check_quota(&self.store, &caller.user_id, 1).await?;
        let name = validate::file_name(&req.name)?;
        validate::content_type(&req.content_type)?;
        let id = self.store.begin_upload(&caller, &name, &req.content_type).await?;
        Ok(Response::new(BeginUploadResponse { upload_id: id.to_string() }))
    }

    #[tracing::instrument(skip_all, fields(user, upload = %req.get_ref().upload_id, part = req.get_ref().part))]
    async fn append_upload(&self, req: Request<AppendUploadRequest>) -> Reply<AppendUploadResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let id = upload_id(&req.upload_id)?;
        if req.data.is_empty() || req.data.len() > PART_BYTES || req.part < 0 {
            return Err(ServiceError::InvalidArgument(format!("a part is 1 to {PART_BYTES} bytes")).into());
        }
        let size = self.store.append_upload(&caller, id, req.part, &req.data, validate::MAX_ATTACHMENT_BYTES).await?;
        Ok(Response::new(AppendUploadResponse { size: size as i64 }))
    }

    #[tracing::instrument(skip_all, fields(user, upload = %req.get_ref().upload_id))]
    async fn finish_upload(&self, req: Request<FinishUploadRequest>) -> Reply<UploadAttachmentResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        // The sizes counted include this upload's own, unfinished as it is.
        self.attachments.check_quota(&self.store, &caller.user_id, 0).await?;
        let attachment = self.store.finish_upload(&caller, upload_id(&req.upload_id)?).await?;
        Ok(Response::new(UploadAttachmentResponse { attachment: Some(attachment) }))
    }

    #[tracing::instrument(skip_all, fields(user, upload = %req.get_ref().upload_id))]
    async fn abort_upload(&self, req: Request<AbortUploadRequest>) -> Reply<AbortUploadResponse> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        self.store.abort_upload(&caller, upload_id(&req.upload_id)?).await?;
        Ok(Response::new(AbortUploadResponse {}))
    }

    type ReadAttachmentStream = AttachmentStream;

    #[tracing::instrument(skip_all, fields(user, attachment = %req.get_ref().attachment_id))]
    async fn read_attachment(&self, req: Request<GetAttachmentRequest>) -> Reply<AttachmentStream> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        let id = validate::attachment_id(&req.attachment_id)?;
        let attachment = self.store.attachment(&caller, id).await?;
        let slot = self.attachments.stream_slot().await?;
        let first = AttachmentChunk { attachment: Some(attachment), data: Vec::new() };
        // One part read per poll: the HTTP/2 window, not this service, decides how far
        // ahead of a slow reader the stream runs. The slot goes with the stream.
        let store = self.store.clone();
        let parts = futures_util::stream::unfold(Some((0, slot)), move |state| {
            let store = store.clone();
            async move {
                let (part, slot) = state?;
                match store.attachment_part(id, part).await {
                    Ok(Some(data)) => Some((Ok(AttachmentChunk { attachment: None, data }), Some((part + 1, slot)))),
                    Ok(None) => None,
                    Err(err) => Some((Err(Status::from(err)), None)),
                }
            }
        });
        let stream = futures_util::stream::once(async move { Ok(first) }).chain(parts);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn user_rooms(&self, req: Request<UserRoomsRequest>) -> Reply<UserRoomsResponse> {
        let req = req.get_ref();
        let rooms = self.store.user_rooms(&req.user_id, req.limit).await?;
        Ok(Response::new(UserRoomsResponse { room_ids: rooms.into_iter().map(|id| id.to_string()).collect() }))
    }
}

impl GrpcHandlers {
    /// Tells the room's members a reply changed its root (count and newest time), with a
    /// `message_edited` of the root as it stands. After the reply's own event, so a client
    /// that counts replies sees the reply first; a failure is logged (the reply is stored,
    /// and the next thread or history read shows the count).
    async fn announce_root(&self, root_id: i64) {
        match self.store.message(root_id).await {
            Ok(Some(root)) => {
                let room_id = root.room_id.clone();
                let event = Event::MessageEdited(MessageEdited { message: Some(root) });
                self.events.room(&room_id, event).await.unwrap_or_else(not_published);
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(%err, root_id, "reply stored; its root's new count not announced"),
        }
    }
}

/// Changes are stored before they are published, so a failed publish is logged, not
/// returned: gateways repair lost messages from Postgres.
fn not_published(err: PublishError) {
    tracing::warn!(%err, "event stored but not published");
}
