//! The `chat.v1.ChatService` gRPC handlers: validate, store, publish.

use chat_proto::v1::chat_service_server::ChatService;
use chat_proto::v1::{
    Caller, CreateRoomRequest, CreateRoomResponse, HistoryRequest, HistoryResponse, JoinRoomRequest, JoinRoomResponse,
    RoomKind, SendMessageRequest, SendMessageResponse,
};
use tonic::{Request, Response, Status};

use crate::error::ServiceError;
use crate::publish::Publisher;
use crate::store::{NewMessage, Page, Store};
use crate::validate;

/// The gRPC service: a store and a publisher.
#[derive(Clone)]
pub struct ChatApi {
    store: Store,
    publisher: Publisher,
}

impl ChatApi {
    /// The service over its backends.
    pub fn new(store: Store, publisher: Publisher) -> Self {
        Self { store, publisher }
    }
}

/// Every request must say who is calling; the gateway fills this from the verified token.
fn caller(caller: Option<Caller>) -> Result<Caller, ServiceError> {
    let caller = caller.ok_or_else(|| ServiceError::InvalidArgument("caller is required".into()))?;
    validate::user_id(&caller.user_id)?;
    Ok(caller)
}

#[tonic::async_trait]
impl ChatService for ChatApi {
    #[tracing::instrument(skip_all, fields(user))]
    async fn create_room(&self, req: Request<CreateRoomRequest>) -> Result<Response<CreateRoomResponse>, Status> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        tracing::Span::current().record("user", caller.user_id.as_str());
        let kind = RoomKind::try_from(req.kind)
            .ok()
            .filter(|k| *k != RoomKind::Unspecified)
            .ok_or_else(|| ServiceError::InvalidArgument("kind must be group, direct or support".into()))?;
        let name = validate::room_name(req.name)?;
        let members = validate::members(&caller.user_id, req.members)?;
        let room = self.store.create_room(&caller, kind, name, members).await?;
        Ok(Response::new(CreateRoomResponse { room: Some(room) }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn join_room(&self, req: Request<JoinRoomRequest>) -> Result<Response<JoinRoomResponse>, Status> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        tracing::Span::current().record("user", caller.user_id.as_str());
        let room_id = validate::room_id(&req.room_id)?;
        let last_seq = self.store.join(&caller, room_id).await?;
        Ok(Response::new(JoinRoomResponse { last_seq }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id, seq))]
    async fn send_message(&self, req: Request<SendMessageRequest>) -> Result<Response<SendMessageResponse>, Status> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        tracing::Span::current().record("user", caller.user_id.as_str());
        let room_id = validate::room_id(&req.room_id)?;
        if !req.attachment_ids.is_empty() {
            return Err(ServiceError::InvalidArgument("unknown attachment id".into()).into());
        }
        validate::text(&req.text, false)?;
        let kind = validate::message_kind(req.kind.as_deref())?;
        validate::client_msg_id(req.client_msg_id.as_deref())?;
        let reply_to = req
            .reply_to
            .as_deref()
            .map(validate::message_id)
            .transpose()
            .map_err(|_| ServiceError::InvalidArgument("reply_to names no message of this room".into()))?;
        let new = NewMessage { room_id, kind, text: &req.text, reply_to, client_msg_id: req.client_msg_id.as_deref() };
        let (message, duplicate) = self.store.insert_message(&caller, new).await?;
        tracing::Span::current().record("seq", message.seq);
        // Published after the commit, and again on a retry: a client retries when it did
        // not see the ack, which may also mean the first publish never happened.
        if let Err(err) = self.publisher.message_created(&message).await {
            tracing::warn!(%err, "message stored but not published; gateways will repair the gap");
        }
        Ok(Response::new(SendMessageResponse { message: Some(message), duplicate }))
    }

    #[tracing::instrument(skip_all, fields(user, room = %req.get_ref().room_id))]
    async fn history(&self, req: Request<HistoryRequest>) -> Result<Response<HistoryResponse>, Status> {
        let req = req.into_inner();
        let caller = caller(req.caller)?;
        tracing::Span::current().record("user", caller.user_id.as_str());
        let room_id = validate::room_id(&req.room_id)?;
        let page =
            Page { before_seq: req.before_seq, after_seq: req.after_seq, limit: validate::history_limit(req.limit)? };
        let (messages, has_more) = self.store.history(&caller, room_id, page).await?;
        Ok(Response::new(HistoryResponse { messages, has_more }))
    }
}
