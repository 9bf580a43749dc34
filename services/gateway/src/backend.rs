//! The gRPC client of the message service: one shared tonic `Channel`, and the caller
//! identity always taken from the verified token.

use std::time::Duration;

use chat_common::tls::{TlsError, TlsFiles, TlsPem};
use chat_common::MAX_GRPC_MESSAGE;
use chat_proto::v1 as pb;
use chat_proto::v1::chat_service_client::ChatServiceClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::auth::Claims;
use crate::config::Config;
use crate::discovery;
use crate::error::CommandError;
use crate::metrics::{MethodLabels, Metrics};
use crate::StartupError;

/// Calls a ChatService method on a clone of the shared client, inside a client span
/// whose trace context travels in the request metadata, recording its latency by
/// method; `?` maps a failed status to the protocol error. A call that never reached a
/// message service (see [`never_sent`]) is made again, up to `NEVER_SENT_RETRIES` times.
macro_rules! call {
    ($self:ident, $method:ident, $req:expr) => {{
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = concat!("chat.v1.ChatService/", stringify!($method)),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.method = stringify!($method),
        );
        let attempt = |message| {
            let (mut client, span) = ($self.chat.clone(), span.clone());
            async move {
                let mut request = tonic::Request::new(message);
                chat_common::propagation::inject_metadata(&span, request.metadata_mut());
                tracing::Instrument::instrument(client.$method(request), span).await
            }
        };
        let message = $req;
        let started = std::time::Instant::now();
        let mut reply = attempt(message.clone()).await;
        for _ in 0..NEVER_SENT_RETRIES {
            if !reply.as_ref().is_err_and(never_sent) {
                break;
            }
            reply = attempt(message.clone()).await;
        }
        $self
            .metrics
            .grpc_latency
            .get_or_create(&MethodLabels { method: stringify!($method) })
            .observe(started.elapsed().as_secs_f64());
        reply?.into_inner()
    }};
}

/// Each attempt that meets a refused connection uses that service's stale error up (its
/// connection is made afresh when next picked), so a few attempts get past every service
/// that came up since the balancer last tried it; when none is up, the refusals are
/// immediate.
const NEVER_SENT_RETRIES: usize = 3;

/// Whether a call failed before anything was sent: the balancer picked a message service
/// whose connection could not be made (refused: it was not listening yet, or not any
/// more). Such a call cannot have run, so making it again cannot run it twice; the
/// balancer will pick a connected service, or this one reconnected.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = err.source();
    }
    false
}

/// Handle to the message service; cheap to clone (clones share the HTTP/2 channel).
#[derive(Clone)]
pub struct Backend {
    chat: ChatServiceClient<Channel>,
    health: HealthClient<Channel>,
    metrics: Metrics,
}

/// The client side of mTLS: the gateway's certificate, and the CA and name the message
/// service's certificate must have. The files are parsed here so that a bad one is told
/// by its setting, not at the first handshake.
fn client_tls(files: &TlsFiles, pem: &TlsPem, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
    files.ca.certificates(&pem.ca)?;
    files.identity(pem)?;
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pem.ca))
        .identity(Identity::from_pem(&pem.cert, &pem.key))
        .domain_name(server_name);
    // What every endpoint will do with it, once, here: a config that fails there would
    // otherwise leave the balancer without endpoints and say nothing.
    Endpoint::from_static("https://tls.check").tls_config(config.clone()).map_err(|e| files.cert.invalid(e))?;
    Ok(config)
}

/// A message and a page of the replies to it.
#[derive(Debug, Clone)]
pub struct Thread {
    pub root: pb::Message,
    pub replies: Vec<pb::Message>,
    pub has_more: bool,
}

/// The identity sent with every call.
pub fn caller(claims: &Claims) -> pb::Caller {
    pb::Caller { user_id: claims.sub.clone(), name: claims.name.clone(), admin: claims.is_admin() }
}

impl Backend {
    /// A channel balanced across every address of the message service's URLs
    /// (re-resolved until `shutdown`), with the configured per-call deadline; waits, with
    /// the start-up retries, until the service reports SERVING.
    pub async fn connect(
        config: &Config,
        metrics: Metrics,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Self, StartupError> {
        let targets = config.message_targets()?;
        let (refresh, timeout) = (config.dns_refresh(), config.grpc_timeout());
        let label = format!("message service at {targets}");
        let configure = move |endpoint: Endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(2))
                .timeout(timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        };
        let tls = match config.message_tls() {
            Some(files) => {
                let name = config.message_tls_server_name.clone();
                let build = move |files: &TlsFiles, pem: &TlsPem| client_tls(files, pem, &name);
                Some(chat_common::tls::watch(files, build, shutdown.clone(), tasks)?)
            }
            None => None,
        };
        let endpoints = discovery::Endpoints::new(configure, tls);
        let channel = discovery::balanced_channel(targets, refresh, endpoints, shutdown, tasks).await;
        let chat = ChatServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE);
        let backend = Self { chat, health: HealthClient::new(channel), metrics };
        config
            .backend
            .startup_retry()
            .run(&label, || async {
                match backend.serving().await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("not serving yet".to_owned()),
                    Err(status) => Err(status.message().to_owned()),
                }
            })
            .await?;
        Ok(backend)
    }

    /// True when the message service reports SERVING.
    pub async fn is_serving(&self) -> bool {
        matches!(self.serving().await, Ok(true))
    }

    async fn serving(&self) -> Result<bool, tonic::Status> {
        let reply = self.health.clone().check(HealthCheckRequest { service: String::new() }).await?;
        Ok(reply.into_inner().status == ServingStatus::Serving as i32)
    }

    /// Stores coalesced delivered seqs (the service publishes `delivered` for each that moved).
    pub async fn mark_delivered(&self, deliveries: Vec<pb::Delivery>) -> Result<(), CommandError> {
        call!(self, mark_delivered, pb::MarkDeliveredRequest { deliveries });
        Ok(())
    }

    /// A message and a page of its replies.
    pub async fn thread(&self, req: pb::ThreadRequest) -> Result<Thread, CommandError> {
        let reply = call!(self, thread, req);
        let root = reply.root.ok_or_else(missing)?;
        Ok(Thread { root, replies: reply.replies, has_more: reply.has_more })
    }

    /// Webhooks that ran out of retries (admin).
    pub async fn dead_webhooks(&self, caller: pb::Caller, limit: u32) -> Result<Vec<pb::DeadWebhook>, CommandError> {
        Ok(call!(self, dead_webhooks, pb::DeadWebhooksRequest { caller: Some(caller), limit }).webhooks)
    }

    /// Sends one dead webhook, or all, again (admin); how many.
    pub async fn replay_webhooks(&self, caller: pb::Caller, id: Option<String>) -> Result<u64, CommandError> {
        Ok(call!(self, replay_webhooks, pb::ReplayWebhooksRequest { caller: Some(caller), id }).replayed)
    }

    /// Each member's delivered and read seqs.
    pub async fn receipts(&self, caller: pb::Caller, room_id: String) -> Result<pb::ReceiptsResponse, CommandError> {
        Ok(call!(self, receipts, pb::ReceiptsRequest { caller: Some(caller), room_id }))
    }

    /// Messages matching a text query in the caller's rooms.
    pub async fn search(&self, req: pb::SearchRequest) -> Result<pb::SearchResponse, CommandError> {
        Ok(call!(self, search, req))
    }

    /// Creates a room owned by the caller.
    pub async fn create_room(&self, req: pb::CreateRoomRequest) -> Result<pb::Room, CommandError> {
        let reply = call!(self, create_room, req);
        reply.room.ok_or_else(missing)
    }

    /// Checks access to a room; returns its newest seq and its members.
    pub async fn join_room(&self, caller: pb::Caller, room_id: String) -> Result<pb::JoinRoomResponse, CommandError> {
        Ok(call!(self, join_room, pb::JoinRoomRequest { caller: Some(caller), room_id }))
    }

    /// Stores and publishes a message.
    pub async fn send_message(&self, req: pb::SendMessageRequest) -> Result<pb::Message, CommandError> {
        let reply = call!(self, send_message, req);
        reply.message.ok_or_else(missing)
    }

    /// A page of history.
    pub async fn history(&self, req: pb::HistoryRequest) -> Result<pb::HistoryResponse, CommandError> {
        Ok(call!(self, history, req))
    }
}

impl Backend {
    /// Adds members to a room.
    pub async fn add_members(&self, req: pb::AddMembersRequest) -> Result<pb::AddMembersResponse, CommandError> {
        Ok(call!(self, add_members, req))
    }

    /// Removes a member from a room.
    pub async fn remove_member(&self, req: pb::RemoveMemberRequest) -> Result<bool, CommandError> {
        Ok(call!(self, remove_member, req).removed)
    }

    /// A page of the caller's rooms: at most `limit` (0: the service's default) after
    /// the cursor `after`.
    pub async fn list_rooms(
        &self,
        caller: pb::Caller,
        limit: u32,
        after: Option<String>,
    ) -> Result<pb::ListRoomsResponse, CommandError> {
        let req = pb::ListRoomsRequest { caller: Some(caller), limit, after };
        Ok(call!(self, list_rooms, req))
    }

    /// Edits a message.
    pub async fn edit_message(&self, req: pb::EditMessageRequest) -> Result<pb::Message, CommandError> {
        call!(self, edit_message, req).message.ok_or_else(missing)
    }

    /// Deletes a message.
    pub async fn delete_message(
        &self,
        req: pb::DeleteMessageRequest,
    ) -> Result<pb::DeleteMessageResponse, CommandError> {
        Ok(call!(self, delete_message, req))
    }

    /// Adds or removes a reaction.
    pub async fn react(&self, req: pb::ReactRequest) -> Result<pb::ReactResponse, CommandError> {
        Ok(call!(self, react, req))
    }

    /// Moves a read position.
    pub async fn mark_read(&self, req: pb::MarkReadRequest) -> Result<i64, CommandError> {
        Ok(call!(self, mark_read, req).read_seq)
    }

    /// Stores and delivers notifications (admin).
    pub async fn create_notifications(
        &self,
        req: pb::CreateNotificationsRequest,
    ) -> Result<Vec<pb::Notification>, CommandError> {
        Ok(call!(self, create_notifications, req).notifications)
    }

    /// The caller's notifications.
    pub async fn list_notifications(
        &self,
        req: pb::ListNotificationsRequest,
    ) -> Result<pb::ListNotificationsResponse, CommandError> {
        Ok(call!(self, list_notifications, req))
    }

    /// Marks the caller's notifications read.
    pub async fn mark_notifications_read(&self, req: pb::MarkNotificationsReadRequest) -> Result<i64, CommandError> {
        Ok(call!(self, mark_notifications_read, req).updated)
    }

    /// Starts an upload for the caller; returns its id.
    pub async fn begin_upload(&self, req: pb::BeginUploadRequest) -> Result<String, CommandError> {
        Ok(call!(self, begin_upload, req).upload_id)
    }

    /// Appends the next part of an upload.
    pub async fn append_upload(&self, req: pb::AppendUploadRequest) -> Result<i64, CommandError> {
        Ok(call!(self, append_upload, req).size)
    }

    /// Completes an upload.
    pub async fn finish_upload(&self, req: pb::FinishUploadRequest) -> Result<pb::Attachment, CommandError> {
        call!(self, finish_upload, req).attachment.ok_or_else(missing)
    }

    /// Drops an unfinished upload.
    pub async fn abort_upload(&self, req: pb::AbortUploadRequest) -> Result<(), CommandError> {
        call!(self, abort_upload, req);
        Ok(())
    }

    /// An attachment as a stream, if the caller may read it: its metadata first, then its
    /// bytes in parts. (The latency recorded is until the stream starts.)
    pub async fn read_attachment(
        &self,
        req: pb::GetAttachmentRequest,
    ) -> Result<tonic::Streaming<pb::AttachmentChunk>, CommandError> {
        Ok(call!(self, read_attachment, req))
    }

    /// The rooms a user belongs to (internal).
    /// At most `limit` of them (0: all), the most recently active first.
    pub async fn user_rooms(&self, user_id: String, limit: u32) -> Result<Vec<String>, CommandError> {
        Ok(call!(self, user_rooms, pb::UserRoomsRequest { user_id, limit }).room_ids)
    }
}

/// The room tasks read a room's stored messages from the message service.
impl crate::room::RoomLog for Backend {
    async fn last_seq(&self, room_id: String) -> Result<i64, CommandError> {
        Ok(call!(self, room_seq, pb::RoomSeqRequest { room_id }).last_seq)
    }

    async fn messages(
        &self,
        room_id: String,
        after_seq: i64,
        before_seq: i64,
        limit: u32,
    ) -> Result<Vec<pb::Message>, CommandError> {
        let req = pb::RoomMessagesRequest { room_id, after_seq, before_seq, limit };
        Ok(call!(self, room_messages, req).messages)
    }
}

fn missing() -> CommandError {
    CommandError::from(tonic::Status::internal("message service returned an empty reply"))
}

#[cfg(test)]
mod tests {
    use tonic::transport::Endpoint;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    use super::never_sent;

    #[tokio::test]
    async fn a_refused_connection_is_a_call_never_sent() {
        // A port nothing listens on: bound, then closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        let channel = Endpoint::from_shared(format!("http://{addr}")).expect("a URL").connect_lazy();
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect_err("nothing listens there");
        assert!(never_sent(&status), "{status:?}");
        assert!(!never_sent(&tonic::Status::unavailable("the service said so")));
    }
}
