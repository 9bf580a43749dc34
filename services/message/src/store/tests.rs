//! The group commit against a real Postgres. Each test gets its own database, created and
//! migrated by `Store::connect` as at start, and dropped when the test ends.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use chat_common::startup::Retry;
use chat_proto::v1::{Attachment, Caller, Message, RoomKind};
use tokio_util::task::TaskTracker;

use super::batch::Reply;
use super::{Committer, File, NewMessage, Store};
use crate::error::ServiceError;

/// A fresh database (the end-to-end harness's, dropped with it) with the service's schema.
struct TestDb {
    // Declared first: the pool closes before the database is dropped.
    store: Store,
    _db: chat_tests::TestDb,
}

impl TestDb {
    async fn new() -> Result<Self> {
        let db = chat_tests::TestDb::new();
        let retry = Retry { attempts: 1, delay: Duration::ZERO };
        let store = Store::connect(&db.url, true, 8, crate::store::Schema::Migrate, false, retry).await?;
        Ok(Self { store, _db: db })
    }
}

fn user(id: &str) -> Caller {
    Caller { user_id: id.to_owned(), name: Some(format!("{id} name")), admin: false }
}

fn text(room_id: i64, text: &str) -> NewMessage {
    NewMessage {
        room_id,
        kind: "text",
        text: text.to_owned(),
        reply_to: None,
        client_msg_id: None,
        attachments: Vec::new(),
    }
}

fn keyed(room_id: i64, body: &str, client_msg_id: &str) -> NewMessage {
    NewMessage { client_msg_id: Some(client_msg_id.to_owned()), ..text(room_id, body) }
}

/// A group room of `owner` and `members`.
async fn room(store: &Store, owner: &str, members: &[&str]) -> Result<i64> {
    let members = members.iter().map(|m| (*m).to_owned()).collect();
    let (room, _) = store.create_room(&user(owner), RoomKind::Group, None, members).await?;
    Ok(room.id.parse()?)
}

/// The seqs stored in a room, ascending.
async fn stored_seqs(store: &Store, room_id: i64) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar("SELECT seq FROM messages WHERE room_id = $1 ORDER BY seq")
        .bind(room_id)
        .fetch_all(&store.pool)
        .await?)
}

/// Stores one batch on a connection of the pool, as a commit worker does.
async fn insert(store: &Store, batch: &[(Caller, NewMessage)]) -> Result<Vec<Reply>> {
    let mut conn = store.pool.acquire().await?;
    Ok(store.insert_batch(&mut conn, batch).await)
}

fn stored(reply: Result<(Message, bool), ServiceError>) -> Result<(Message, bool)> {
    reply.context("the send was refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_stay_gapless_under_concurrent_batches() -> Result<()> {
    const ROOMS: usize = 3;
    const PER_SENDER: usize = 15;
    let per_room = 4 * 2 * PER_SENDER;
    let db = TestDb::new().await?;
    let senders = ["ann", "bob", "cyd", "dee"];
    let mut rooms = Vec::new();
    for _ in 0..ROOMS {
        rooms.push(room(&db.store, senders[0], &senders[1..]).await?);
    }
    // Two committers, as in two replicas of the service, with two workers each: batches
    // of one room commit concurrently, and one worker's batches mix rooms.
    let committers = [
        Committer::start(db.store.clone(), 2, &TaskTracker::new()),
        Committer::start(db.store.clone(), 2, &TaskTracker::new()),
    ];
    // Each sender sends one message after another, so batches stay small and many.
    let mut sends = tokio::task::JoinSet::new();
    for (n, sender) in senders.iter().enumerate() {
        for &room_id in &rooms {
            for committer in &committers {
                let (committer, sender) = (committer.clone(), user(sender));
                sends.spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..PER_SENDER {
                        let (message, duplicate) =
                            stored(committer.submit(sender.clone(), text(room_id, &format!("{n}.{i}"))).await)?;
                        anyhow::ensure!(!duplicate, "a new message was answered as a retry");
                        seqs.push(message.seq);
                    }
                    Ok::<_, anyhow::Error>((room_id, seqs))
                });
            }
        }
    }
    let mut answered: HashMap<i64, Vec<i64>> = HashMap::new();
    while let Some(sent) = sends.join_next().await {
        let (room_id, seqs) = sent??;
        answered.entry(room_id).or_default().extend(seqs);
    }
    let expected: Vec<i64> = (1..=per_room as i64).collect();
    for room_id in rooms {
        let mut seqs = answered.remove(&room_id).unwrap_or_default();
        seqs.sort_unstable();
        assert_eq!(seqs, expected, "answered seqs of room {room_id}");
        assert_eq!(stored_seqs(&db.store, room_id).await?, expected, "stored seqs of room {room_id}");
        assert_eq!(db.store.room_seq(room_id).await?, per_room as i64);
    }
    Ok(())
}

#[tokio::test]
async fn a_retry_is_answered_with_the_stored_message() -> Result<()> {
    let db = TestDb::new().await?;
    let room_id = room(&db.store, "ann", &["bob"]).await?;
    let committer = Committer::start(db.store.clone(), 1, &TaskTracker::new());

    let (first, duplicate) = stored(committer.submit(user("ann"), keyed(room_id, "hello", "c-1")).await)?;
    assert!(!duplicate);
    // A retry in a later batch, even with another text, is the stored message.
    let (again, duplicate) = stored(committer.submit(user("ann"), keyed(room_id, "changed", "c-1")).await)?;
    assert!(duplicate);
    assert_eq!(again, first);
    assert_eq!(again.text.as_deref(), Some("hello"));

    // A retry in the same batch as its original is answered with the message just stored.
    let batch = [(user("bob"), keyed(room_id, "hi", "c-1")), (user("bob"), keyed(room_id, "hi", "c-1"))];
    let replies = insert(&db.store, &batch).await?;
    let (original, duplicate) = stored(replies[0].clone())?;
    assert!(!duplicate, "another sender's c-1 is another message");
    assert_eq!(original.seq, 2);
    let (retry, duplicate) = stored(replies[1].clone())?;
    assert!(duplicate);
    assert_eq!(retry, original);

    assert_eq!(stored_seqs(&db.store, room_id).await?, vec![1, 2], "retries take no seq");
    Ok(())
}

#[tokio::test]
async fn a_client_msg_id_reused_in_another_room_is_refused() -> Result<()> {
    let db = TestDb::new().await?;
    let first_room = room(&db.store, "ann", &[]).await?;
    let second_room = room(&db.store, "ann", &[]).await?;
    let committer = Committer::start(db.store.clone(), 1, &TaskTracker::new());

    stored(committer.submit(user("ann"), keyed(first_room, "hello", "c-1")).await)?;
    let reused = committer.submit(user("ann"), keyed(second_room, "hello", "c-1")).await;
    assert!(matches!(&reused, Err(ServiceError::Conflict(m)) if m == "client_msg_id was already used in another room"));

    // The same within one batch.
    let batch = [(user("ann"), keyed(first_room, "a", "c-2")), (user("ann"), keyed(second_room, "b", "c-2"))];
    let replies = insert(&db.store, &batch).await?;
    assert!(stored(replies[0].clone())?.0.seq == 2);
    assert!(matches!(&replies[1], Err(ServiceError::Conflict(_))));

    assert_eq!(stored_seqs(&db.store, second_room).await?, Vec::<i64>::new());
    assert_eq!(db.store.room_seq(second_room).await?, 0);
    Ok(())
}

#[tokio::test]
async fn an_attachment_send_returns_and_stores_its_attachments_in_order() -> Result<()> {
    let db = TestDb::new().await?;
    let room_id = room(&db.store, "ann", &["bob"]).await?;
    let ann = user("ann");
    let mut files = Vec::new();
    for name in ["a.txt", "b.png", "c.pdf"] {
        files.push(db.store.create_attachment(&ann, name, "application/octet-stream", name.as_bytes()).await?);
    }
    // Listed in an order that is neither by id nor by name.
    let order = [files[2].clone(), files[0].clone(), files[1].clone()];
    let ids: Vec<i64> = order.iter().map(|a| a.id.parse()).collect::<Result<_, _>>()?;

    let owned = db.store.own_attachments("ann", &ids).await?;
    assert_eq!(owned.iter().map(|f| f.id).collect::<Vec<_>>(), ids, "in the order asked");
    assert!(db.store.own_attachments("bob", &ids).await.is_err(), "not bob's files");
    let with_files = NewMessage { kind: "file", attachments: owned, ..keyed(room_id, "", "c-1") };
    let batch =
        [(user("bob"), text(room_id, "plain")), (ann.clone(), with_files.clone()), (ann.clone(), with_files.clone())];
    let replies = insert(&db.store, &batch).await?;
    let (plain, _) = stored(replies[0].clone())?;
    assert!(plain.attachments.is_empty());
    let (message, duplicate) = stored(replies[1].clone())?;
    assert!(!duplicate);
    assert_eq!(message.attachments, order, "the answer carries the files in the order sent");
    let (again, duplicate) = stored(replies[2].clone())?;
    assert!(duplicate);
    assert_eq!(again, message, "a retry within the batch carries them too");

    let (history, _) =
        db.store.history(&ann, room_id, super::Page { before_seq: None, after_seq: None, limit: 10 }).await?;
    assert_eq!(history.last(), Some(&message), "what is stored is what was answered");
    let positions: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT attachment_id, position FROM message_attachments WHERE message_id = $1 ORDER BY position",
    )
    .bind(message.id.parse::<i64>()?)
    .fetch_all(&db.store.pool)
    .await?;
    assert_eq!(positions, ids.iter().copied().zip(1..).collect::<Vec<_>>());

    let committer = Committer::start(db.store.clone(), 1, &TaskTracker::new());
    let (retry, duplicate) = stored(committer.submit(ann, with_files).await)?;
    assert!(duplicate);
    assert_eq!(retry, message, "a retry carries the files too");
    Ok(())
}

#[tokio::test]
async fn a_refused_request_does_not_fail_the_rest_of_its_batch() -> Result<()> {
    let db = TestDb::new().await?;
    let room_id = room(&db.store, "ann", &["bob"]).await?;
    let other_room = room(&db.store, "cyd", &[]).await?;
    let committer = Committer::start(db.store.clone(), 1, &TaskTracker::new());
    let (elsewhere, _) = stored(committer.submit(user("cyd"), text(other_room, "elsewhere")).await)?;
    let elsewhere_id: i64 = elsewhere.id.parse()?;

    let batch = [
        (user("ann"), text(room_id, "one")),
        (user("cyd"), text(room_id, "not a member")),
        (user("ann"), text(i64::MAX, "no such room")),
        (user("bob"), NewMessage { reply_to: Some(elsewhere_id), ..text(room_id, "reply elsewhere") }),
        (user("bob"), text(room_id, "two")),
    ];
    let replies = insert(&db.store, &batch).await?;
    assert_eq!(stored(replies[0].clone())?.0.seq, 1);
    assert!(matches!(&replies[1], Err(ServiceError::Forbidden("not a member of this room"))));
    assert!(matches!(&replies[2], Err(ServiceError::NotFound("room"))));
    assert!(
        matches!(&replies[3], Err(ServiceError::InvalidArgument(m)) if m == "reply_to names no message of this room")
    );
    assert_eq!(stored(replies[4].clone())?.0.seq, 2);
    assert_eq!(stored_seqs(&db.store, room_id).await?, vec![1, 2]);
    Ok(())
}

/// One send at a time, as at ordinary load: every batch is a batch of one, which takes
/// the function's single-statement path when it is stored (migration 0007). That path
/// must refuse what the batch path refuses, and leave the deciding to it.
#[tokio::test]
async fn single_sends_are_screened_as_in_a_batch() -> Result<()> {
    let db = TestDb::new().await?;
    let room_id = room(&db.store, "ann", &["bob"]).await?;
    let other_room = room(&db.store, "cyd", &[]).await?;
    let (support, _) = db.store.create_room(&user("cyd"), RoomKind::Support, None, Vec::new()).await?;
    let support: i64 = support.id.parse()?;
    let committer = Committer::start(db.store.clone(), 1, &TaskTracker::new());
    let send = |caller: Caller, msg: NewMessage| committer.submit(caller, msg);

    let (elsewhere, _) = stored(send(user("cyd"), text(other_room, "elsewhere")).await)?;
    let (first, duplicate) = stored(send(user("ann"), keyed(room_id, "one", "c-1")).await)?;
    assert_eq!((first.seq, duplicate), (1, false));

    let not_member = send(user("cyd"), text(room_id, "not a member")).await;
    assert!(matches!(not_member, Err(ServiceError::Forbidden(_))), "{not_member:?}");
    let no_room = send(user("ann"), text(i64::MAX, "no such room")).await;
    assert!(matches!(no_room, Err(ServiceError::NotFound("room"))), "{no_room:?}");
    let reply_elsewhere = NewMessage { reply_to: Some(elsewhere.id.parse()?), ..text(room_id, "reply elsewhere") };
    let reply_elsewhere = send(user("bob"), reply_elsewhere).await;
    assert!(matches!(reply_elsewhere, Err(ServiceError::InvalidArgument(_))), "{reply_elsewhere:?}");
    let (again, duplicate) = stored(send(user("ann"), keyed(room_id, "changed", "c-1")).await)?;
    assert_eq!((&again, duplicate), (&first, true), "a retry is the stored message");

    let reply = NewMessage { reply_to: Some(first.id.parse()?), ..text(room_id, "a reply") };
    let (reply, _) = stored(send(user("bob"), reply).await)?;
    assert_eq!((reply.seq, reply.reply_to.as_deref()), (2, Some(first.id.as_str())));

    // An admin may write in a support room without being a member; no one else may.
    let admin = Caller { admin: true, ..user("ops") };
    assert_eq!(stored(send(admin, text(support, "how can we help")).await)?.0.seq, 1);
    let stranger = send(user("eve"), text(support, "hello")).await;
    assert!(matches!(stranger, Err(ServiceError::Forbidden(_))), "{stranger:?}");

    assert_eq!(stored_texts(&db.store, room_id).await?, ["one", "a reply"], "refused sends store nothing");
    assert_eq!(db.store.room_seq(room_id).await?, 2, "and take no seq");
    Ok(())
}

/// Two replicas store the same retry at once: each send alone in its batch, in the same
/// room. One stores it; the other, whichever way the race goes (it sees the row, or it
/// meets the unique key and tries again), answers with the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_original_on_another_replica_is_stored_once() -> Result<()> {
    const ROUNDS: i64 = 30;
    let db = TestDb::new().await?;
    let room_id = room(&db.store, "ann", &[]).await?;
    let replicas = [
        Committer::start(db.store.clone(), 1, &TaskTracker::new()),
        Committer::start(db.store.clone(), 1, &TaskTracker::new()),
    ];
    for round in 1..=ROUNDS {
        let message = keyed(room_id, "racing", &format!("c-{round}"));
        let (a, b) =
            tokio::join!(replicas[0].submit(user("ann"), message.clone()), replicas[1].submit(user("ann"), message));
        let ((a, a_again), (b, b_again)) = (stored(a)?, stored(b)?);
        assert_eq!(a, b, "round {round}: both answers are the one stored message");
        assert!(a_again != b_again, "round {round}: exactly one of them stored it");
        assert_eq!(a.seq, round);
    }
    assert_eq!(stored_seqs(&db.store, room_id).await?, (1..=ROUNDS).collect::<Vec<_>>());
    Ok(())
}

/// The texts stored in a room, in seq order.
async fn stored_texts(store: &Store, room_id: i64) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT body FROM messages WHERE room_id = $1 ORDER BY seq")
        .bind(room_id)
        .fetch_all(&store.pool)
        .await?)
}

#[tokio::test]
async fn a_send_the_database_refuses_fails_alone_and_the_others_keep_gapless_seqs() -> Result<()> {
    let db = TestDb::new().await?;
    let room_id = room(&db.store, "ann", &["bob"]).await?;
    let other_room = room(&db.store, "cyd", &[]).await?;
    // Each poison passes the batch's screening and fails its transaction: U+0000 in a
    // text or a sender's name (the handlers refuse both before they get here), and an
    // attachment id no row has (a file gone since the handler checked it).
    let named = Caller { name: Some("nul\0name".into()), ..user("bob") };
    let gone = File { id: i64::MAX, attachment: Attachment::default() };
    let batch = [
        (user("ann"), text(room_id, "one")),
        (user("bob"), text(room_id, "a\0b")),
        (user("cyd"), text(other_room, "elsewhere")),
        (user("bob"), NewMessage { attachments: vec![gone], ..text(room_id, "") }),
        (user("ann"), keyed(room_id, "two", "c-2")),
        (named, text(room_id, "from a bad name")),
        (user("bob"), text(room_id, "three")),
    ];
    let replies = insert(&db.store, &batch).await?;
    let seq = |i: usize| stored(replies[i].clone()).map(|(m, _)| m.seq);
    assert_eq!(seq(0)?, 1);
    assert_eq!(seq(2)?, 1, "another room's send");
    assert_eq!(seq(4)?, 2);
    assert_eq!(seq(6)?, 3);
    // A value Postgres cannot take is the request's fault: `bad_request`, not `internal`.
    assert!(matches!(&replies[1], Err(ServiceError::InvalidArgument(_))), "{:?}", replies[1]);
    assert!(matches!(&replies[5], Err(ServiceError::InvalidArgument(_))), "{:?}", replies[5]);
    // So is a file gone since the handler checked it (collected, say).
    assert!(matches!(&replies[3], Err(ServiceError::InvalidArgument(_))), "{:?}", replies[3]);

    assert_eq!(stored_texts(&db.store, room_id).await?, ["one", "two", "three"], "the culprits store nothing");
    assert_eq!(stored_seqs(&db.store, room_id).await?, vec![1, 2, 3]);
    assert_eq!(db.store.room_seq(room_id).await?, 3);
    assert_eq!(stored_seqs(&db.store, other_room).await?, vec![1]);
    Ok(())
}

#[tokio::test]
async fn an_unavailable_database_answers_every_send_unavailable() -> Result<()> {
    let db = TestDb::new().await?;
    let room_id = room(&db.store, "ann", &["bob"]).await?;
    // A worker's kept connection, cut off by the server: nothing is retried on it.
    let mut conn = db.store.pool.acquire().await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await?;
    sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&db.store.pool).await?;
    let batch = [(user("ann"), text(room_id, "one")), (user("bob"), text(room_id, "two"))];
    for reply in db.store.insert_batch(&mut conn, &batch).await {
        assert!(matches!(reply, Err(ServiceError::Unavailable(_))), "{reply:?}");
    }
    assert_eq!(stored_seqs(&db.store, room_id).await?, Vec::<i64>::new());
    Ok(())
}

#[tokio::test]
async fn a_worker_whose_connection_was_cut_answers_unavailable_once_then_stores_again() -> Result<()> {
    let db = TestDb::new().await?;
    let room_id = room(&db.store, "ann", &["bob"]).await?;
    let committer = Committer::start(db.store.clone(), 1, &TaskTracker::new());
    stored(committer.submit(user("ann"), text(room_id, "one")).await)?;
    // The worker keeps its connection between batches; cut it from the server's side.
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE '%store_messages%' AND pid <> pg_backend_pid()",
    )
    .fetch_one(&db.store.pool)
    .await?;
    assert_eq!(cut, 1, "the worker's connection");
    let refused = committer.submit(user("bob"), text(room_id, "two")).await;
    assert!(matches!(refused, Err(ServiceError::Unavailable(_))), "{refused:?}");
    // The dead connection is dropped, not kept: the next batch takes a live one.
    let (again, _) = stored(committer.submit(user("bob"), text(room_id, "two")).await)?;
    assert_eq!(again.seq, 2);
    assert_eq!(stored_seqs(&db.store, room_id).await?, vec![1, 2]);
    Ok(())
}

/// The texts of a search's results, in order.
async fn found(store: &Store, who: &str, q: &str, room_id: Option<i64>) -> Result<Vec<String>> {
    let query = super::SearchQuery { q: q.to_owned(), room_id, before_id: None, limit: 50 };
    let (hits, _) = store.search(&user(who), &query).await?;
    Ok(hits.into_iter().map(|h| h.message.text.unwrap_or_default()).collect())
}

#[tokio::test]
async fn search_finds_current_text_in_the_callers_rooms_only_newest_first() -> Result<()> {
    let db = TestDb::new().await?;
    let store = &db.store;
    let ours = room(store, "alice", &["bob"]).await?;
    let theirs = room(store, "carol", &[]).await?;
    let alice = user("alice");
    for (who, room_id, body) in [
        (&alice, ours, "the red fox jumps"),
        (&user("carol"), theirs, "a red herring in a room alice is not in"),
        (&alice, ours, "Red sky at night"),
        (&alice, ours, "blue fox"),
        (&alice, ours, "soon deleted red"),
        (&alice, ours, "soon edited red"),
    ] {
        stored(insert(store, &[(who.clone(), text(room_id, body))]).await?.remove(0))?;
    }
    let id_of = |body: &str| {
        sqlx::query_scalar::<_, i64>("SELECT id FROM messages WHERE body = $1")
            .bind(body.to_owned())
            .fetch_one(&store.pool)
    };
    store.delete_message(&alice, id_of("soon deleted red").await?).await?;
    store.edit_message(&alice, id_of("soon edited red").await?, "now green").await?;

    // Case-insensitive words, newest first; never another room's, a deleted message or
    // an edited message's old text.
    assert_eq!(found(store, "alice", "RED", None).await?, ["Red sky at night", "the red fox jumps"]);
    assert_eq!(found(store, "alice", "green", None).await?, ["now green"]);
    assert_eq!(found(store, "bob", "red", None).await?, ["Red sky at night", "the red fox jumps"]);
    assert_eq!(found(store, "carol", "red", None).await?, ["a red herring in a room alice is not in"]);
    // Phrases and exclusions.
    assert_eq!(found(store, "alice", "\"red fox\"", None).await?, ["the red fox jumps"]);
    assert_eq!(found(store, "alice", "fox -red", None).await?, ["blue fox"]);
    // One room: the caller's own, or refused.
    assert_eq!(found(store, "alice", "fox", Some(ours)).await?, ["blue fox", "the red fox jumps"]);
    let refused = found(store, "alice", "red", Some(theirs)).await.unwrap_err();
    assert!(matches!(refused.downcast_ref(), Some(ServiceError::Forbidden(_))), "{refused}");
    // A query of nothing but punctuation matches nothing, and is no error.
    assert!(found(store, "alice", "!!! -", None).await?.is_empty());

    // Pages: `before_id` is the last result's id, `has_more` says whether to go on.
    let page = |before_id| super::SearchQuery { q: "red OR fox".into(), room_id: None, before_id, limit: 2 };
    let (first, more) = store.search(&alice, &page(None)).await?;
    assert!(more);
    let last: i64 = first[1].message.id.parse()?;
    let (second, more) = store.search(&alice, &page(Some(last))).await?;
    assert!(!more);
    let texts: Vec<_> = first.iter().chain(&second).map(|h| h.message.text.clone().unwrap_or_default()).collect();
    assert_eq!(texts, ["blue fox", "Red sky at night", "the red fox jumps"]);
    assert!(second[0].snippet.contains("fox"), "a snippet shows the match: {:?}", second[0].snippet);
    Ok(())
}
