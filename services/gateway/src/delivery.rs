//! Delivery ticks: clients' `received {room, seq}`, coalesced per member and room and
//! stored once a second in one call. A busy room's members each send one per message;
//! a row update per frame would cost Postgres more than the message itself, and a
//! `delivered` event per frame would flood the room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chat_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;

/// How often the latest seqs are stored and announced: at most one `delivered` per
/// member, room and gateway in this time.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The highest seq each (room, member) reported since the last flush. Bounded without a
/// channel: one entry per pair, however many frames, and pairs are bounded by the
/// connections and the rooms each has joined.
#[derive(Clone, Default)]
pub struct Deliveries {
    pending: Arc<Mutex<HashMap<(String, String), i64>>>,
}

impl Deliveries {
    /// Records that `user` has everything in `room` up to `seq`.
    pub fn record(&self, room: &str, user: &str, seq: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let highest = pending.entry((room.to_owned(), user.to_owned())).or_insert(seq);
        *highest = (*highest).max(seq);
    }

    /// What was recorded since the last call, emptied.
    fn take(&self) -> Vec<pb::Delivery> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        taken.into_iter().map(|((room_id, user_id), seq)| pb::Delivery { room_id, user_id, seq }).collect()
    }

    /// Stores what was recorded every [`FLUSH_EVERY`] until `stop`, and once more then.
    /// A failed call is logged and its seqs dropped: clients report them again with the
    /// next message they receive, and a lower seq never moves anything back.
    pub async fn run(self, backend: Backend, stop: CancellationToken) {
        let mut every = tokio::time::interval(FLUSH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = every.tick() => false,
                _ = stop.cancelled() => true,
            };
            let deliveries = self.take();
            if !deliveries.is_empty() {
                if let Err(err) = backend.mark_delivered(deliveries).await {
                    tracing::warn!(err = %err.message, "delivered seqs not stored");
                }
            }
            if stopping {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_member_and_room_keeps_its_highest_seq_once() {
        let d = Deliveries::default();
        for (room, user, seq) in [("1", "a", 5), ("1", "a", 3), ("1", "a", 7), ("1", "b", 2), ("2", "a", 1)] {
            d.record(room, user, seq);
        }
        let mut taken: Vec<(String, String, i64)> =
            d.take().into_iter().map(|x| (x.room_id, x.user_id, x.seq)).collect();
        taken.sort();
        assert_eq!(taken, [("1".into(), "a".into(), 7), ("1".into(), "b".into(), 2), ("2".into(), "a".into(), 1)]);
        assert!(d.take().is_empty(), "taken once");
    }
}
