//! The contract's message object, as JSON: what gateways send clients and what the
//! message service's webhooks carry, written in one place so both stay the same.

use std::collections::BTreeMap;

use chat_proto::v1 as pb;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// Milliseconds since the epoch as an RFC 3339 UTC timestamp with milliseconds.
pub fn timestamp(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A message object as the contract shows it.
pub struct MessageJson<'a>(pub &'a pb::Message);

impl Serialize for MessageJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("id", &m.id)?;
        map.serialize_entry("room", &m.room_id)?;
        map.serialize_entry("seq", &m.seq)?;
        map.serialize_entry("sender_id", &m.sender_id)?;
        if let Some(name) = &m.sender_name {
            map.serialize_entry("sender_name", name)?;
        }
        map.serialize_entry("kind", &m.kind)?;
        map.serialize_entry("text", &m.text)?;
        let attachments: Vec<AttachmentJson<'_>> = m.attachments.iter().map(AttachmentJson).collect();
        map.serialize_entry("attachments", &attachments)?;
        map.serialize_entry("reply_to", &m.reply_to)?;
        map.serialize_entry("client_msg_id", &m.client_msg_id)?;
        map.serialize_entry("created_at", &timestamp(m.created_at_ms))?;
        map.serialize_entry("edited_at", &m.edited_at_ms.map(timestamp))?;
        map.serialize_entry("deleted", &m.deleted)?;
        map.serialize_entry("reply_count", &m.reply_count)?;
        map.serialize_entry("last_reply_at", &m.last_reply_at_ms.map(timestamp))?;
        let reactions: BTreeMap<&str, &Vec<String>> =
            m.reactions.iter().map(|r| (r.emoji.as_str(), &r.user_ids)).collect();
        map.serialize_entry("reactions", &reactions)?;
        map.end()
    }
}

/// An attachment object: `{id, name, content_type, size, url}`.
pub struct AttachmentJson<'a>(pub &'a pb::Attachment);

impl Serialize for AttachmentJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = self.0;
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("id", &a.id)?;
        map.serialize_entry("name", &a.name)?;
        map.serialize_entry("content_type", &a.content_type)?;
        map.serialize_entry("size", &a.size)?;
        map.serialize_entry("url", &format!("/v1/attachments/{}", a.id))?;
        map.end()
    }
}
