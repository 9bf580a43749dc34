//! Which rooms each local connection listens to, or is joining: the gateway's one
//! answer to "is this connection in that room", kept beside the room tasks so that a
//! removal, a membership check after a Redis outage and the connection's own
//! `typing` and `leave` agree on it.
//!
//! A join is marked here *before* its membership check: a `room_removed` that arrives
//! while the check is in flight finds the mark and strikes it, and the join then
//! refuses instead of listening on. Without the mark, a removal landing between the
//! check and the listener's registration evicted nothing and the removed user kept
//! receiving the room.

use std::collections::HashMap;
use std::sync::Mutex;

use chat_proto::v1 as pb;

/// Where a connection stands in one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// A join (this ticket) is checking membership or registering its listener.
    Joining(u64),
    /// Listening; delivered the room's events.
    Joined,
}

struct Conn {
    /// Who the connection is, as the message service authorizes it (for re-checks).
    caller: pb::Caller,
    rooms: HashMap<String, Standing>,
}

/// One join in progress; see `Listening::begin`.
#[derive(Debug)]
pub struct Ticket {
    conn: u64,
    room: String,
    id: u64,
    /// The connection had already joined the room (a repeated `join`).
    rejoin: bool,
}

/// What an abandoned join leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// Nothing to undo (or a repeated join left the earlier one in place).
    Nothing,
    /// The connection was listening before and is no member now: stop its listener.
    StopListening,
}

/// The registry; one per gateway. Its lock is never held across an await.
#[derive(Default)]
pub struct Listening {
    inner: Mutex<State>,
}

#[derive(Default)]
struct State {
    conns: HashMap<u64, Conn>,
    next_ticket: u64,
}

impl Listening {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Each update is a single insert or remove: a panic elsewhere cannot leave it torn.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `conn` as joining `room`, before the membership check.
    pub fn begin(&self, conn: u64, room: &str, caller: pb::Caller) -> Ticket {
        let mut state = self.state();
        state.next_ticket += 1;
        let id = state.next_ticket;
        let entry = state.conns.entry(conn).or_insert_with(|| Conn { caller: caller.clone(), rooms: HashMap::new() });
        entry.caller = caller;
        let rejoin = entry.rooms.insert(room.to_owned(), Standing::Joining(id)) == Some(Standing::Joined);
        Ticket { conn, room: room.to_owned(), id, rejoin }
    }

    /// True while no removal has struck the join's mark.
    pub fn still_joining(&self, ticket: &Ticket) -> bool {
        self.standing(ticket.conn, &ticket.room) == Some(Standing::Joining(ticket.id))
    }

    /// The listener is registered: the connection has joined, unless a removal struck
    /// the mark meanwhile (false: the caller must stop the listener).
    pub fn settle(&self, ticket: &Ticket) -> bool {
        let mut state = self.state();
        match state.conns.get_mut(&ticket.conn).and_then(|c| c.rooms.get_mut(&ticket.room)) {
            Some(standing) if *standing == Standing::Joining(ticket.id) => {
                *standing = Standing::Joined;
                true
            }
            _ => false,
        }
    }

    /// The join failed; `still_member` unless the message service said the caller may
    /// not read the room (or that it does not exist).
    pub fn abandon(&self, ticket: Ticket, still_member: bool) -> Abandoned {
        let mut state = self.state();
        let Some(conn) = state.conns.get_mut(&ticket.conn) else { return Abandoned::Nothing };
        if conn.rooms.get(&ticket.room) != Some(&Standing::Joining(ticket.id)) {
            // A removal struck it and stopped the listener already.
            return Abandoned::Nothing;
        }
        if ticket.rejoin && still_member {
            conn.rooms.insert(ticket.room, Standing::Joined);
            return Abandoned::Nothing;
        }
        conn.rooms.remove(&ticket.room);
        if ticket.rejoin {
            Abandoned::StopListening
        } else {
            Abandoned::Nothing
        }
    }

    /// Forgets `conn`'s standing in `room`; true when it had one.
    pub fn leave(&self, conn: u64, room: &str) -> bool {
        self.state().conns.get_mut(&conn).is_some_and(|c| c.rooms.remove(room).is_some())
    }

    /// Strikes `room` from each of `conns` (a removed user's connections); the ones
    /// that had it, whose listeners must stop.
    pub fn strike(&self, conns: &[u64], room: &str) -> Vec<u64> {
        let mut state = self.state();
        conns
            .iter()
            .copied()
            .filter(|conn| state.conns.get_mut(conn).is_some_and(|c| c.rooms.remove(room).is_some()))
            .collect()
    }

    /// True when `conn` has joined `room` (a join still checking does not count).
    pub fn is_joined(&self, conn: u64, room: &str) -> bool {
        self.standing(conn, room) == Some(Standing::Joined)
    }

    /// How many rooms `conn` has joined or is joining.
    pub fn count(&self, conn: u64) -> usize {
        self.state().conns.get(&conn).map_or(0, |c| c.rooms.len())
    }

    /// Forgets `conn` (it closed); the rooms it was in.
    pub fn remove_conn(&self, conn: u64) -> Vec<String> {
        self.state().conns.remove(&conn).map(|c| c.rooms.into_keys().collect()).unwrap_or_default()
    }

    /// Every (room, caller) with a joined local connection, each pair once: what a
    /// membership re-check asks the message service about.
    pub fn joined_pairs(&self) -> Vec<(String, pb::Caller)> {
        let state = self.state();
        let mut seen = std::collections::HashSet::new();
        let mut pairs = Vec::new();
        for conn in state.conns.values() {
            for (room, standing) in &conn.rooms {
                if *standing == Standing::Joined && seen.insert((room.as_str(), conn.caller.user_id.as_str())) {
                    pairs.push((room.clone(), conn.caller.clone()));
                }
            }
        }
        pairs
    }

    fn standing(&self, conn: u64, room: &str) -> Option<Standing> {
        self.state().conns.get(&conn).and_then(|c| c.rooms.get(room).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bob() -> pb::Caller {
        pb::Caller { user_id: "bob".into(), ..Default::default() }
    }

    #[test]
    fn a_removal_during_the_membership_check_makes_the_join_refuse() {
        let l = Listening::default();
        let ticket = l.begin(1, "42", bob());
        assert!(!l.is_joined(1, "42"), "not joined while checking");
        // room_removed arrives while the check is in flight.
        assert_eq!(l.strike(&[1, 2], "42"), vec![1]);
        assert!(!l.still_joining(&ticket));
        assert!(!l.settle(&ticket), "the join must not stay registered");
        assert!(!l.is_joined(1, "42"));
    }

    #[test]
    fn a_removal_after_registration_is_seen_by_typing_and_leave() {
        let l = Listening::default();
        let ticket = l.begin(1, "42", bob());
        assert!(l.settle(&ticket));
        assert!(l.is_joined(1, "42"));
        assert_eq!(l.joined_pairs(), vec![("42".to_owned(), bob())]);
        assert_eq!(l.strike(&[1], "42"), vec![1]);
        assert!(!l.is_joined(1, "42"));
        assert!(!l.leave(1, "42"));
        assert!(l.joined_pairs().is_empty());
    }

    #[test]
    fn a_failed_repeat_join_keeps_the_room_unless_membership_is_gone() {
        let l = Listening::default();
        assert!(l.settle(&l.begin(1, "42", bob())));
        let again = l.begin(1, "42", bob());
        assert_eq!(l.abandon(again, true), Abandoned::Nothing);
        assert!(l.is_joined(1, "42"), "a backend hiccup does not unjoin");
        let again = l.begin(1, "42", bob());
        assert_eq!(l.abandon(again, false), Abandoned::StopListening);
        assert!(!l.is_joined(1, "42"));
        let first = l.begin(1, "7", bob());
        assert_eq!(l.abandon(first, false), Abandoned::Nothing);
        assert_eq!(l.count(1), 0);
    }

    #[test]
    fn pairs_are_listed_once_per_room_and_user() {
        let l = Listening::default();
        for conn in [1, 2] {
            assert!(l.settle(&l.begin(conn, "42", bob())));
        }
        let pending = l.begin(3, "9", bob());
        assert_eq!(l.joined_pairs().len(), 1);
        assert!(l.still_joining(&pending));
        assert_eq!(l.remove_conn(1), vec!["42".to_owned()]);
        assert_eq!(l.joined_pairs().len(), 1, "connection 2 still listens");
    }
}
