//! The room task alone: an in-memory log stands in for the message service, real
//! outboxes are the listeners, and time is paused, so typing expiry and slow fetches cost
//! no waiting.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::Message as WsMessage;
use chat_proto::v1 as pb;
use chat_proto::v1::envelope::Event;
use serde_json::Value;
use tokio_util::task::TaskTracker;

use super::*;
use crate::error::CommandError;
use crate::outbox::{Queued, Receiver};

const ROOM: &str = "7";

/// One room's stored messages, as the message service would return them, and a record
/// of what the room task asked for.
#[derive(Clone, Default)]
struct FakeLog {
    state: Arc<Mutex<LogState>>,
}

#[derive(Default)]
struct LogState {
    messages: BTreeMap<i64, pb::Message>,
    /// `(after, before)` of every `messages` call.
    fetches: Vec<(i64, i64)>,
    last_seq_calls: usize,
    /// How long a `messages` call takes: lets live events queue up behind a join.
    latency: Duration,
    /// `messages` fails (after its latency), as when the message service is down.
    failing: bool,
}

impl FakeLog {
    fn with(seqs: impl IntoIterator<Item = i64>) -> Self {
        let log = Self::default();
        for seq in seqs {
            log.store(message(seq));
        }
        log
    }

    fn state(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().expect("no test panicked holding the log")
    }

    fn store(&self, message: pb::Message) {
        self.state().messages.insert(message.seq, message);
    }

    fn fetches(&self) -> Vec<(i64, i64)> {
        self.state().fetches.clone()
    }
}

impl RoomLog for FakeLog {
    async fn last_seq(&self, room_id: String) -> Result<i64, CommandError> {
        assert_eq!(room_id, ROOM);
        let mut state = self.state();
        state.last_seq_calls += 1;
        Ok(state.messages.keys().next_back().copied().unwrap_or(0))
    }

    async fn messages(
        &self,
        room_id: String,
        after: i64,
        before: i64,
        limit: u32,
    ) -> Result<Vec<pb::Message>, CommandError> {
        assert_eq!(room_id, ROOM);
        let latency = {
            let mut state = self.state();
            state.fetches.push((after, before));
            state.latency
        };
        tokio::time::sleep(latency).await;
        if self.state().failing {
            return Err(CommandError::new(crate::error::ErrorCode::Unavailable, "log down"));
        }
        if after + 1 >= before {
            return Ok(Vec::new());
        }
        let state = self.state();
        Ok(state.messages.range(after + 1..before).take(limit as usize).map(|(_, m)| m.clone()).collect())
    }
}

fn message(seq: i64) -> pb::Message {
    pb::Message {
        id: format!("id{seq}"),
        room_id: ROOM.to_owned(),
        seq,
        sender_id: "alice".to_owned(),
        text: Some(format!("m{seq}")),
        ..Default::default()
    }
}

fn envelope(event: Event) -> pb::Envelope {
    pb::Envelope { event: Some(event), ..Default::default() }
}

/// A message as it arrives live from Redis.
fn live(seq: i64) -> pb::Envelope {
    envelope(Event::MessageCreated(pb::MessageCreated { message: Some(message(seq)) }))
}

fn typing(user: &str, active: bool) -> pb::Envelope {
    envelope(Event::Typing(pb::Typing { room_id: ROOM.to_owned(), user_id: user.to_owned(), active }))
}

fn spawn_room(last_seq: i64, log: &FakeLog) -> (RoomHandle, Metrics) {
    let metrics = Metrics::new();
    let room = RoomHandle::spawn(ROOM.to_owned(), last_seq, log.clone(), metrics.clone(), &TaskTracker::new());
    (room, metrics)
}

/// A connection of `user`: its outbox (in a listener) and the end its task would read.
fn connection(id: u64, user: &str) -> (Listener, Receiver) {
    let (outbox, rx) = Outbox::new(id, 4096, Default::default());
    (Listener { outbox, user_id: Arc::from(user) }, rx)
}

async fn join(room: &RoomHandle, listener: &Listener, since: Option<i64>) -> Joined {
    room.join(listener.clone(), since).await.expect("room task running").expect("join succeeds")
}

/// Returns once the room task has handled everything sent to it before: its mailbox is
/// first in, first out, and a leave is answered only when its turn comes.
async fn settle(room: &RoomHandle) {
    room.leave(u64::MAX).await;
}

/// Every frame queued for a connection since the last call, batches flattened.
fn take(rx: &Receiver) -> Vec<String> {
    let mut queued = VecDeque::new();
    rx.take(&mut queued);
    queued
        .into_iter()
        .flat_map(|item| match item {
            Queued::One(frame) | Queued::Timed(frame, _) => vec![frame],
            Queued::Many(frames) => frames,
            Queued::Owed(_) => unreachable!("no socket to write to directly"),
        })
        .map(|frame| match frame {
            WsMessage::Text(text) => text.as_str().to_owned(),
            other => panic!("not a text frame: {other:?}"),
        })
        .collect()
}

fn json(frame: &str) -> Value {
    serde_json::from_str(frame).expect("a JSON frame")
}

/// The seqs of `frames`, which must all be message events.
fn seqs(frames: &[String]) -> Vec<i64> {
    frames
        .iter()
        .map(|f| {
            let v = json(f);
            assert_eq!(v["type"], "message", "{f}");
            v["message"]["seq"].as_i64().expect("a seq")
        })
        .collect()
}

/// `(user_id, active)` of `frames`, which must all be typing events.
fn typing_of(frames: &[String]) -> Vec<(String, bool)> {
    frames
        .iter()
        .map(|f| {
            let v = json(f);
            assert_eq!(v["type"], "typing", "{f}");
            assert_eq!(v["room"], ROOM);
            (v["user_id"].as_str().expect("a user").to_owned(), v["active"].as_bool().expect("a flag"))
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_jump_in_seq_is_repaired_from_the_log_in_order_and_duplicates_are_dropped() {
    let log = FakeLog::with(1..=4);
    let (room, metrics) = spawn_room(0, &log);
    let (bob, rx) = connection(1, "bob");
    assert_eq!(join(&room, &bob, None).await, Joined { last_seq: 0, truncated: false });

    for seq in [1, 4, 3, 4, 1] {
        room.event(live(seq));
    }
    settle(&room).await;
    assert_eq!(seqs(&take(&rx)), [1, 2, 3, 4]);
    assert_eq!(log.fetches(), [(1, 4)], "only the missing 2 and 3 are fetched");
    assert_eq!(metrics.gap_repairs.get(), 2);

    log.store(message(5));
    room.event(live(5));
    settle(&room).await;
    assert_eq!(seqs(&take(&rx)), [5]);
    assert_eq!(log.fetches().len(), 1, "the next seq needs no repair");
}

#[tokio::test(start_paused = true)]
async fn typing_expires_after_its_ttl_unless_refreshed_and_is_not_echoed() {
    let (room, _) = spawn_room(0, &FakeLog::default());
    let (alice, alice_rx) = connection(1, "alice");
    let (bob, bob_rx) = connection(2, "bob");
    join(&room, &alice, None).await;
    join(&room, &bob, None).await;

    room.event(typing("alice", true));
    settle(&room).await;
    assert_eq!(typing_of(&take(&bob_rx)), [("alice".to_owned(), true)]);
    tokio::time::sleep(TYPING_TTL - Duration::from_millis(100)).await;
    assert!(take(&bob_rx).is_empty(), "still typing just before the TTL");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(typing_of(&take(&bob_rx)), [("alice".to_owned(), false)], "expired without a refresh");

    // A refresh one second before the deadline carries typing past it.
    room.event(typing("alice", true));
    settle(&room).await;
    tokio::time::sleep(TYPING_TTL - Duration::from_secs(1)).await;
    room.event(typing("alice", true));
    settle(&room).await;
    assert_eq!(typing_of(&take(&bob_rx)), [("alice".to_owned(), true), ("alice".to_owned(), true)]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(take(&bob_rx).is_empty(), "the refresh extended typing past the first deadline");
    tokio::time::sleep(TYPING_TTL - Duration::from_secs(1)).await;
    assert_eq!(typing_of(&take(&bob_rx)), [("alice".to_owned(), false)], "expired TTL after the refresh");

    assert!(take(&alice_rx).is_empty(), "a user's own typing is not echoed to them");
}

#[tokio::test(start_paused = true)]
async fn typing_stopped_by_the_user_does_not_expire_again() {
    let (room, _) = spawn_room(0, &FakeLog::default());
    let (bob, bob_rx) = connection(2, "bob");
    join(&room, &bob, None).await;

    room.event(typing("alice", true));
    room.event(typing("alice", false));
    settle(&room).await;
    assert_eq!(typing_of(&take(&bob_rx)), [("alice".to_owned(), true), ("alice".to_owned(), false)]);
    tokio::time::sleep(TYPING_TTL * 2).await;
    assert!(take(&bob_rx).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_join_replays_its_backlog_between_live_events_without_gap_or_duplicate() {
    // The log already holds 13 and 14 while the join fetches: it must not replay them,
    // since they are about to arrive live.
    let log = FakeLog::with(1..=14);
    log.state().latency = Duration::from_millis(50);
    let (room, _) = spawn_room(10, &log);
    let (alice, alice_rx) = connection(1, "alice");
    let (carol, carol_rx) = connection(2, "carol");
    join(&room, &alice, None).await;

    room.event(live(11));
    room.event(live(12));
    let joining = tokio::spawn({
        let (room, carol) = (room.clone(), carol.clone());
        async move { join(&room, &carol, Some(8)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(log.fetches(), [(8, 13)], "the join is fetching its backlog");
    room.event(live(13));
    room.event(live(14));

    let joined = joining.await.expect("join task");
    assert_eq!(joined, Joined { last_seq: 12, truncated: false });
    settle(&room).await;
    assert_eq!(seqs(&take(&carol_rx)), [9, 10, 11, 12, 13, 14]);
    assert_eq!(seqs(&take(&alice_rx)), [11, 12, 13, 14]);
}

#[tokio::test(start_paused = true)]
async fn a_join_that_missed_more_than_the_backlog_limit_gets_the_newest_and_truncated() {
    let newest = MAX_BACKLOG + 5;
    let log = FakeLog::with(1..=newest);
    let (room, _) = spawn_room(newest, &log);

    let (far, far_rx) = connection(1, "far");
    assert_eq!(join(&room, &far, Some(4)).await, Joined { last_seq: newest, truncated: true });
    assert_eq!(seqs(&take(&far_rx)), (6..=newest).collect::<Vec<_>>());

    let (edge, edge_rx) = connection(2, "edge");
    assert_eq!(join(&room, &edge, Some(5)).await, Joined { last_seq: newest, truncated: false });
    assert_eq!(seqs(&take(&edge_rx)), (6..=newest).collect::<Vec<_>>());

    let (current, current_rx) = connection(3, "current");
    let fetches = log.fetches().len();
    assert_eq!(join(&room, &current, Some(newest)).await, Joined { last_seq: newest, truncated: false });
    assert_eq!(join(&room, &current, Some(newest + 10)).await, Joined { last_seq: newest, truncated: false });
    assert!(take(&current_rx).is_empty(), "nothing was missed");
    assert_eq!(log.fetches().len(), fetches, "and nothing was fetched");
}

#[tokio::test(start_paused = true)]
async fn a_resync_repairs_up_to_the_rooms_newest_seq() {
    // 3..=5 were published while Redis was down: no later message reveals the gap.
    let log = FakeLog::with(1..=5);
    let (room, _) = spawn_room(2, &log);
    let (bob, rx) = connection(1, "bob");
    join(&room, &bob, None).await;

    room.resync();
    settle(&room).await;
    assert_eq!(seqs(&take(&rx)), [3, 4, 5]);
    assert_eq!(log.fetches(), [(2, 6)]);

    log.store(message(6));
    room.event(live(5));
    room.event(live(6));
    room.resync();
    settle(&room).await;
    assert_eq!(seqs(&take(&rx)), [6], "the resynced messages are not delivered again");
    assert_eq!(log.fetches().len(), 1, "a room already at its newest seq fetches nothing");
    assert_eq!(log.state().last_seq_calls, 2);
}

#[tokio::test(start_paused = true)]
async fn kept_frames_serve_later_joins_without_asking_the_log_again() {
    let log = FakeLog::with(1..=10);
    let (room, _) = spawn_room(10, &log);

    let (a, a_rx) = connection(1, "a");
    join(&room, &a, Some(5)).await;
    let a_frames = take(&a_rx);
    assert_eq!(seqs(&a_frames), [6, 7, 8, 9, 10]);
    assert_eq!(log.fetches(), [(5, 11)]);

    let (b, b_rx) = connection(2, "b");
    assert_eq!(join(&room, &b, Some(7)).await, Joined { last_seq: 10, truncated: false });
    assert_eq!(take(&b_rx), a_frames[2..], "the same frames, byte for byte");

    // A live message extends the kept frames.
    log.store(message(11));
    room.event(live(11));
    let (c, c_rx) = connection(3, "c");
    assert_eq!(join(&room, &c, Some(6)).await, Joined { last_seq: 11, truncated: false });
    assert_eq!(seqs(&take(&c_rx)), [7, 8, 9, 10, 11]);
    assert_eq!(log.fetches().len(), 1, "served from the kept frames");

    // Unused for RECENT_TTL, they are dropped at the next live message.
    tokio::time::sleep(RECENT_TTL + Duration::from_secs(1)).await;
    log.store(message(12));
    room.event(live(12));
    let (d, d_rx) = connection(4, "d");
    join(&room, &d, Some(9)).await;
    assert_eq!(seqs(&take(&d_rx)), [10, 11, 12]);
    assert_eq!(log.fetches(), [(5, 11), (9, 13)]);
}

#[tokio::test(start_paused = true)]
async fn an_edit_delete_or_reaction_drops_the_kept_frames() {
    // Each change to message 8, as stored, and as published.
    let edited = pb::Message { text: Some("edited".to_owned()), edited_at_ms: Some(1), ..message(8) };
    let deleted = pb::Message { text: None, deleted: true, ..message(8) };
    let reacted = pb::Message {
        reactions: vec![pb::Reaction { emoji: "👍".to_owned(), user_ids: vec!["bob".to_owned()] }],
        ..message(8)
    };
    let changes = [
        ("message_edited", edited.clone(), Event::MessageEdited(pb::MessageEdited { message: Some(edited) })),
        (
            "message_deleted",
            deleted,
            Event::MessageDeleted(pb::MessageDeleted {
                room_id: ROOM.to_owned(),
                message_id: "id8".to_owned(),
                seq: 8,
            }),
        ),
        (
            "reaction",
            reacted,
            Event::Reaction(pb::ReactionChanged {
                room_id: ROOM.to_owned(),
                message_id: "id8".to_owned(),
                user_id: "bob".to_owned(),
                emoji: "👍".to_owned(),
                added: true,
            }),
        ),
    ];
    for (kind, stored, change) in changes {
        let log = FakeLog::with(1..=10);
        let (room, _) = spawn_room(10, &log);
        let (a, a_rx) = connection(1, "a");
        join(&room, &a, Some(5)).await;
        take(&a_rx);

        // The message service stores a change before publishing it.
        log.store(stored.clone());
        room.event(envelope(change));
        settle(&room).await;
        let delivered = take(&a_rx);
        assert_eq!(delivered.len(), 1, "{kind}");
        assert_eq!(json(&delivered[0])["type"], kind);

        let (b, b_rx) = connection(2, "b");
        join(&room, &b, Some(7)).await;
        assert_eq!(log.fetches(), [(5, 11), (7, 11)], "{kind}: the join asks the log again");
        let replayed = take(&b_rx);
        assert_eq!(seqs(&replayed), [8, 9, 10]);
        assert_eq!(
            replayed[0],
            crate::protocol::server::message_event(&stored),
            "{kind}: the stored version is replayed"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_room_task_is_tracked_until_its_last_listener_leaves() {
    let tracker = TaskTracker::new();
    let room = RoomHandle::spawn(ROOM.to_owned(), 0, FakeLog::default(), Metrics::new(), &tracker);
    tracker.close();
    let (a, _rx) = connection(1, "a");
    join(&room, &a, None).await;
    assert_eq!(tracker.len(), 1);
    assert!(!room.stop_if_empty().await, "a listener is still there");
    assert_eq!(room.leave(1).await, 0);
    assert!(room.stop_if_empty().await);
    tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await.expect("the room task has ended");
}

#[tokio::test(start_paused = true)]
async fn a_backlog_join_does_not_stall_the_rooms_deliveries_to_others() {
    let log = FakeLog::with(1..=10);
    log.state().latency = Duration::from_secs(5);
    let (room, _) = spawn_room(10, &log);
    let (bob, bob_rx) = connection(1, "bob");
    let (carol, carol_rx) = connection(2, "carol");
    join(&room, &bob, None).await;
    let joining = tokio::spawn({
        let (room, carol) = (room.clone(), carol.clone());
        async move { join(&room, &carol, Some(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(log.fetches(), [(5, 11)], "carol's backlog is being fetched");

    let sent = tokio::time::Instant::now();
    log.store(message(11));
    room.event(live(11));
    room.event(typing("dave", true));
    settle(&room).await;
    assert!(sent.elapsed() < Duration::from_secs(1), "bob waited {:?} for carol's fetch", sent.elapsed());
    let frames = take(&bob_rx);
    assert_eq!(seqs(&frames[..1]), [11]);
    assert_eq!(typing_of(&frames[1..]), [("dave".to_owned(), true)]);
    assert!(take(&carol_rx).is_empty(), "carol's live frames wait behind her backlog");

    assert_eq!(joining.await.expect("join task"), Joined { last_seq: 10, truncated: false });
    let frames = take(&carol_rx);
    assert_eq!(seqs(&frames[..6]), [6, 7, 8, 9, 10, 11], "backlog, then what arrived meanwhile");
    assert_eq!(typing_of(&frames[6..]), [("dave".to_owned(), true)]);
    log.store(message(12));
    room.event(live(12));
    settle(&room).await;
    assert_eq!(seqs(&take(&carol_rx)), [12], "then live, no gap, no duplicate");
    assert_eq!(seqs(&take(&bob_rx)), [12]);
}

#[tokio::test(start_paused = true)]
async fn a_join_whose_backlog_cannot_be_fetched_is_refused_and_delivers_nothing() {
    let log = FakeLog::with(1..=10);
    log.state().failing = true;
    let (room, _) = spawn_room(10, &log);
    let (carol, carol_rx) = connection(2, "carol");
    let refused = room.join(carol.clone(), Some(5)).await.expect("room task running");
    assert!(refused.is_err(), "{refused:?}");
    room.event(live(11));
    settle(&room).await;
    assert!(take(&carol_rx).is_empty());
    assert!(room.stop_if_empty().await, "the refused join left nothing behind");
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_leaves_while_its_backlog_is_fetched_gets_nothing() {
    let log = FakeLog::with(1..=10);
    log.state().latency = Duration::from_secs(5);
    let (room, _) = spawn_room(10, &log);
    let (carol, carol_rx) = connection(2, "carol");
    let joining = tokio::spawn({
        let (room, carol) = (room.clone(), carol.clone());
        async move { room.join(carol, Some(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!room.stop_if_empty().await, "a pending join keeps the room");
    assert_eq!(room.leave(2).await, 0);
    room.event(live(11));
    tokio::time::sleep(Duration::from_secs(6)).await;
    settle(&room).await;
    assert!(take(&carol_rx).is_empty());
    let abandoned = joining.await.expect("join task").expect("answered, not dropped (a retry would re-add it)");
    assert_eq!(abandoned.expect_err("the join was abandoned").code, crate::error::ErrorCode::Forbidden);
}

#[tokio::test(start_paused = true)]
async fn a_join_that_falls_too_far_behind_while_fetching_is_refused_and_delivers_nothing() {
    let log = FakeLog::with(1..=10);
    log.state().latency = Duration::from_secs(5);
    let (room, _) = spawn_room(10, &log);
    let (bob, bob_rx) = connection(1, "bob");
    let (carol, carol_rx) = connection(2, "carol");
    join(&room, &bob, None).await;
    let joining = tokio::spawn({
        let (room, carol) = (room.clone(), carol.clone());
        async move { room.join(carol, Some(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let newest = 10 + MAX_BACKLOG + 1;
    for seq in 11..=newest {
        log.store(message(seq));
        room.event(live(seq));
    }
    let refused = joining.await.expect("join task").expect("answered");
    assert_eq!(refused.expect_err("too far behind").code, crate::error::ErrorCode::Unavailable);
    settle(&room).await;
    assert!(take(&carol_rx).is_empty(), "nothing queued for the refused join");
    assert_eq!(seqs(&take(&bob_rx)), (11..=newest).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn an_evicted_listener_reads_the_rooms_earlier_events_then_the_notice_then_nothing() {
    let log = FakeLog::with(1..=3);
    let (room, _) = spawn_room(0, &log);
    let (bob, bob_rx) = connection(1, "bob");
    let (carol, carol_rx) = connection(2, "carol");
    join(&room, &bob, None).await;
    join(&room, &carol, None).await;

    // Seq 1 was dispatched before the removal, seq 2 and 3 after it; the task has not
    // run yet when the removal is handed over, as when a removal races new messages.
    room.event(live(1));
    let notice = r#"{"type":"room_removed","room":"7"}"#;
    assert!(room.evict(bob.outbox.id(), &bob.outbox, WsMessage::Text(notice.into())));
    room.event(live(2));
    room.event(live(3));
    settle(&room).await;

    let frames = take(&bob_rx);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(seqs(&frames[..1]), [1]);
    assert_eq!(frames[1], notice, "the notice follows the room's last event for bob");
    assert_eq!(seqs(&take(&carol_rx)), [1, 2, 3]);
}
