//! Where a room's stored messages come from: the message service in production, an
//! in-memory log in the room task's tests.

use std::future::Future;

use chat_proto::v1 as pb;

use crate::error::CommandError;

/// A room's stored messages, which the room task reads to repair gaps, replay a join's
/// backlog and catch up after a Redis outage. A trait so the task's ordering logic can
/// be tested without a message service.
pub trait RoomLog: Send + Sync + 'static {
    /// The room's newest seq.
    fn last_seq(&self, room_id: String) -> impl Future<Output = Result<i64, CommandError>> + Send;

    /// Messages with `after < seq < before`, ascending, at most `limit`.
    fn messages(
        &self,
        room_id: String,
        after: i64,
        before: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<pb::Message>, CommandError>> + Send;
}
