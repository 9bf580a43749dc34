//! Property tests of client frame parsing: whatever arrives, parsing answers with a
//! frame, a `bad_request` or (for a well-formed command naming an id the server never
//! spells that way) `not_found` — never a panic — and a reply id is only ever one the
//! client sent.

use chat_gateway::error::ErrorCode;
use chat_gateway::protocol::client::{self, parse};
use proptest::prelude::*;

const TYPES: &[&str] = &[
    "auth",
    "create_room",
    "join",
    "leave",
    "send",
    "history",
    "ping",
    "add_members",
    "remove_member",
    "rooms",
    "edit",
    "delete",
    "react",
    "unreact",
    "typing",
    "read",
    "presence",
    "refresh_token",
    "bogus",
];

/// JSON-ish values, nested a little.
fn value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::hash_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Frames that look like commands: a known (or bogus) type, maybe an id, random fields
/// under the names commands use.
fn command_like() -> impl Strategy<Value = String> {
    let fields = prop::collection::hash_map(
        prop::sample::select(vec![
            "room",
            "text",
            "members",
            "since_seq",
            "before_seq",
            "after_seq",
            "limit",
            "message_id",
            "emoji",
            "active",
            "seq",
            "token",
            "kind",
            "name",
            "user_id",
            "attachments",
            "reply_to",
            "client_msg_id",
            "id",
        ]),
        value(),
        0..8,
    );
    (prop::sample::select(TYPES.to_vec()), fields).prop_map(|(kind, fields)| {
        let mut obj: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        obj.insert("type".into(), kind.into());
        serde_json::Value::Object(obj).to_string()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_and_errors_are_bad_requests(text in ".{0,300}") {
        if let Err(bad) = parse(&text) {
            prop_assert_eq!(bad.error.code, ErrorCode::BadRequest);
        }
        let _ = client::peek_id(&text);
    }

    #[test]
    fn command_like_frames_parse_or_fail_cleanly(text in command_like()) {
        let sent_id = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["id"].as_str().map(str::to_owned));
        match parse(&text) {
            Ok(frame) => prop_assert_eq!(frame.id, sent_id),
            Err(bad) => {
                prop_assert!(
                    matches!(bad.error.code, ErrorCode::BadRequest | ErrorCode::NotFound),
                    "{:?}",
                    bad.error
                );
                // An error echoes the id only if it is the client's own.
                if let Some(id) = bad.id {
                    prop_assert_eq!(Some(id), sent_id);
                }
            }
        }
    }
}
