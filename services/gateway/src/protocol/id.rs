//! Server-issued ids as clients send them. Only the exact spelling the server issued
//! (`chat_common::ids`) names anything; any other spelling is `not_found`. Checked
//! once, where frames and REST paths are parsed, so the gateway's own state (the rooms
//! a connection joined, the room tasks, the listeners a removal evicts) is only ever
//! keyed by the one spelling the message service uses too.

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::error::{CommandError, ErrorCode};

/// What the refusal says; `client::parse` also tells an unknown id from a malformed
/// frame by it (serde carries only a message from a field to the frame's error).
const NAMES_NOTHING: &str = "names nothing: an id is the exact string the server issued";

/// A room or message id in its canonical spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id(String);

impl Id {
    /// `raw` as an id, or `not_found` when it is not spelled as the server issues ids.
    pub fn parse(raw: impl Into<String>) -> Result<Self, CommandError> {
        let raw = raw.into();
        match chat_common::ids::parse(&raw) {
            Some(_) => Ok(Id(raw)),
            None => Err(CommandError::new(ErrorCode::NotFound, refusal(&raw))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn refusal(raw: &str) -> String {
    // Bounded: the client's string is echoed back, and a frame may be 64 KiB.
    let shown: String = raw.chars().take(32).collect();
    format!("{shown:?} {NAMES_NOTHING}")
}

/// Whether a frame failed to parse only because an id names nothing.
pub(crate) fn names_nothing(err: &serde_json::Error) -> bool {
    err.is_data() && err.to_string().contains(NAMES_NOTHING)
}

/// Ids are strings in the contract; a client that sends a number means the same id.
#[derive(Deserialize)]
#[serde(untagged)]
enum Repr {
    Str(String),
    Int(i64),
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = match Repr::deserialize(d)? {
            Repr::Str(s) => s,
            Repr::Int(n) => n.to_string(),
        };
        match chat_common::ids::parse(&raw) {
            Some(_) => Ok(Id(raw)),
            None => Err(serde::de::Error::custom(refusal(&raw))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_issued_spelling_is_an_id() {
        assert_eq!(Id::parse("42").map(Id::into_string), Ok("42".to_owned()));
        for other in ["042", "0042", "+42", " 42", "4.2e1", "-1", "0", "", "abc"] {
            let err = Id::parse(other).unwrap_err();
            assert_eq!(err.code, ErrorCode::NotFound, "{other:?}");
        }
    }

    #[test]
    fn a_json_number_is_the_same_id_when_it_is_one() {
        assert_eq!(serde_json::from_str::<Id>("42").unwrap().as_str(), "42");
        let err = serde_json::from_str::<Id>("-42").unwrap_err();
        assert!(names_nothing(&err), "{err}");
        assert!(!names_nothing(&serde_json::from_str::<Id>("true").unwrap_err()));
    }
}
