//! The frames of a room's newest messages, kept for the reconnect storm after a gateway dies.

use std::collections::VecDeque;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use chat_proto::v1 as pb;
use tokio::time::Instant;

use super::{RECENT_FRAMES, RECENT_TTL};

/// The frames of the room's newest messages, `first..=self.seq` without a gap.
///
/// When a gateway dies, its clients come back to the others all at once, each joining
/// with the `since_seq` it had, and in one room those are mostly the same. The first
/// join fetches the missed messages from the message service; the rest of the storm is
/// served from these frames instead of one Postgres query per client. Live messages
/// extend them, so they stay current. An edit, delete or reaction would make a frame
/// stale, so any of those drops them; so does a gap, or disuse for `RECENT_TTL`.
pub(super) struct Recent {
    /// Seq of `frames[0]`.
    first: i64,
    frames: VecDeque<Utf8Bytes>,
    used: Instant,
}

impl Recent {
    /// The fetched `backlog` (and its `frames`, one per message) when its messages are
    /// consecutive and end at the room's watermark; `None` otherwise (a deleted message
    /// keeps its seq, so history has no holes).
    pub(super) fn from_backlog(backlog: &[pb::Message], frames: &[Utf8Bytes], watermark: i64) -> Option<Self> {
        let first = backlog.first()?.seq;
        let consecutive = backlog.iter().zip(first..).all(|(m, seq)| m.seq == seq);
        if !consecutive || backlog.last()?.seq != watermark || frames.len() != backlog.len() {
            return None;
        }
        let start = backlog.len().saturating_sub(RECENT_FRAMES);
        Some(Self {
            first: backlog[start].seq,
            frames: frames[start..].iter().cloned().collect(),
            used: Instant::now(),
        })
    }

    /// The frames of every message after `since` up to `watermark`, if these reach back
    /// that far and end there.
    pub(super) fn after(&mut self, since: i64, watermark: i64) -> Option<Vec<WsMessage>> {
        if since + 1 < self.first || self.first + self.frames.len() as i64 - 1 != watermark {
            return None;
        }
        self.used = Instant::now();
        let skip = usize::try_from(since + 1 - self.first).ok()?;
        Some(self.frames.iter().skip(skip).map(|f| WsMessage::Text(f.clone())).collect())
    }

    /// Appends the next message; false when `seq` does not follow (the caller drops these).
    pub(super) fn push(&mut self, seq: i64, frame: &Utf8Bytes) -> bool {
        if seq != self.first + self.frames.len() as i64 {
            return false;
        }
        self.frames.push_back(frame.clone());
        if self.frames.len() > RECENT_FRAMES {
            self.frames.pop_front();
            self.first += 1;
        }
        true
    }

    pub(super) fn expired(&self) -> bool {
        self.used.elapsed() > RECENT_TTL
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::server;

    fn messages(seqs: impl IntoIterator<Item = i64>) -> Vec<pb::Message> {
        seqs.into_iter().map(|seq| pb::Message { seq, text: Some(format!("m{seq}")), ..Default::default() }).collect()
    }

    fn recent(seqs: impl IntoIterator<Item = i64>, watermark: i64) -> Option<Recent> {
        let backlog = messages(seqs);
        let frames: Vec<Utf8Bytes> = backlog.iter().map(|m| Utf8Bytes::from(server::message_event(m))).collect();
        Recent::from_backlog(&backlog, &frames, watermark)
    }

    fn seqs(frames: &[WsMessage]) -> Vec<i64> {
        frames
            .iter()
            .map(|f| match f {
                WsMessage::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                    v["message"]["seq"].as_i64().expect("seq")
                }
                other => panic!("not text: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn recent_frames_serve_every_since_they_reach_and_follow_live_messages() {
        let mut recent = recent(5..=8, 8).expect("consecutive, up to the watermark");
        assert_eq!(seqs(&recent.after(4, 8).expect("covered")), [5, 6, 7, 8]);
        assert_eq!(seqs(&recent.after(6, 8).expect("covered")), [7, 8]);
        assert!(recent.after(3, 8).is_none(), "seq 4 was never fetched");
        assert!(recent.after(6, 9).is_none(), "seq 9 is not in the frames");
        let next = Utf8Bytes::from(server::message_event(&messages([9])[0]));
        assert!(recent.push(9, &next));
        assert_eq!(seqs(&recent.after(7, 9).expect("covered")), [8, 9]);
        assert!(!recent.push(11, &next), "a gap is refused");
    }

    #[test]
    fn only_gapless_backlogs_ending_at_the_watermark_are_kept() {
        assert!(recent([5, 6, 8], 8).is_none());
        assert!(recent(5..=7, 8).is_none());
        assert!(recent([], 8).is_none());
    }

    #[test]
    fn recent_frames_keep_only_the_newest() {
        let n = RECENT_FRAMES as i64;
        let mut recent = recent(1..=n + 10, n + 10).expect("kept");
        assert_eq!(recent.first, 11);
        assert!(recent.after(5, n + 10).is_none());
        let next = Utf8Bytes::from(server::message_event(&messages([n + 11])[0]));
        assert!(recent.push(n + 11, &next));
        assert_eq!(recent.first, 12);
        assert_eq!(recent.frames.len(), RECENT_FRAMES);
    }
}
