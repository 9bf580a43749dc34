//! Search (#19): the round trip of one-word `search` commands through the gateways, over
//! a store of a million messages seeded straight into Postgres (sending them through the
//! product would take the bench's whole budget), in rooms the caller is a member of and
//! rooms they are not.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target, Ws};
use crate::fanout::histogram;
use crate::procstat::CpuProbe;
use crate::progress;

/// Filler words, most frequent first, drawn with a skew towards the front (the
/// ⌊48·u^1.5⌋th): "the" is in about a third of the messages, "when" in one in twelve.
const FILLER: &str = "the i you to a and it is that in we for on this of be have with can just so but not me are \
    do at my was will if ok yes no what all get go know think now there about out up like one when";

/// Content words, drawn evenly: each is in about 1% of the messages (a message's word is
/// one of these 30% of the time, and a message has 9.5 words on average).
const CONTENT: &str = "meeting deploy lunch review release ticket budget invoice design server client coffee weekend \
    report schedule printer holiday contract laptop password backup dashboard customer office train \
    flight hotel dinner birthday party project deadline sprint bug feature branch merge test build \
    pipeline database query index cache latency outage alert pager oncall rollback migration schema \
    cluster gateway socket message channel thread reply emoji upload download screenshot link doc \
    slides agenda minutes notes summary draft proposal estimate quote order payment refund receipt \
    shipping delivery package warehouse supplier vendor partner team manager intern hiring \
    interview offer salary bonus sandbox feedback goal roadmap milestone launch campaign marketing \
    sales revenue growth churn signup login logout session token account profile settings \
    permission role admin support escalation incident postmortem runbook metric graph chart trace \
    log error warning crash freeze timeout retry queue worker job cron script config secret \
    certificate domain dns proxy firewall network router wifi vpn cable monitor keyboard mouse \
    headset camera microphone speaker charger battery phone tablet desktop window door kitchen \
    fridge snack pizza burger salad sandwich soup noodles sushi taco breakfast brunch tea juice \
    water cake cookie chocolate fruit apple banana orange grape lemon bread cheese butter milk egg \
    rice pasta steak chicken fish beer wine cocktail bar restaurant cafe menu table booking \
    reservation staging concert movie show series episode season game match score hotfix standup \
    player coach stadium gym run walk bike swim yoga hike trail mountain beach lake river park \
    garden forest city town village street road bridge station airport bus taxi car parking traffic \
    weather rain snow sun wind storm cloud forecast morning afternoon evening night monday tuesday \
    wednesday thursday friday saturday sunday january february march april june july august \
    september october november december family parents kids baby dog cat vacation trip passport \
    visa luggage map photo video music song playlist podcast book article news blog";

/// Four of these make a name ("kalomira"): 10,000 names, each in about 40 messages of a
/// million (a message's word is a name 4% of the time). Names, codes and typos are what
/// makes real text's long tail.
const SYLLABLES: [&str; 10] = ["ka", "lo", "mi", "ra", "ne", "to", "vi", "su", "de", "po"];

/// Share of a message's words that are names, then content words; the rest is filler.
const NAME_SHARE: f64 = 0.04;
const CONTENT_SHARE: f64 = 0.30;

/// The measured queries: content words (each in ~1% of the messages), asked in turn.
pub const WORDS: [&str; 8] = ["deploy", "lunch", "invoice", "printer", "holiday", "budget", "outage", "pizza"];
/// A name: a rare word (a few dozen messages in a million).
pub const RARE: &str = "kalomira";
/// The most frequent filler word (about a third of the messages).
pub const FREQUENT: &str = "the";

/// Other members of each seeded room (besides any searching client), from a pool of users.
const ROOM_MEMBERS: u64 = 10;
const MEMBER_POOL: u64 = 2_000;

/// The seeded store.
#[derive(Clone, Copy, Debug)]
pub struct Corpus {
    pub messages: u64,
    pub rooms: u64,
    /// Rooms each searching client is a member of (every `rooms / member_of`th one).
    pub member_of: u64,
}

/// How hard and how long to ask.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Concurrent clients, each its own user, each asking one query at a time.
    pub clients: usize,
    /// Queries of [`WORDS`], all clients together; a tenth as many of [`RARE`] and of
    /// [`FREQUENT`] after them.
    pub queries: u64,
    /// Time allowed for the [`WORDS`] queries; a quarter of it each for the other two.
    pub within: Duration,
}

/// Seeds `corpus` in the database at `database_url` (the cluster's, migrated), then asks
/// through the gateways; `cpu` is charged for the ~1% words' queries.
pub async fn run(target: &Target, database_url: &str, corpus: Corpus, load: Load, cpu: &CpuProbe) -> Result<Value> {
    ensure!(corpus.rooms > 0 && corpus.messages > 0, "--rooms and --messages must be above 0");
    ensure!((1..=corpus.rooms).contains(&corpus.member_of), "--member-of must be between 1 and --rooms");
    ensure!(load.clients > 0 && load.queries > 0, "--clients and --queries must be above 0");
    let users: Vec<String> = (0..load.clients).map(|n| target.user(n)).collect();

    eprintln!("search: seeding {} messages in {} rooms", corpus.messages, corpus.rooms);
    let started = Instant::now();
    let memberships = psql(database_url, &seed_sql(&target.run, corpus, &users)).await.context("seeding")?;
    let seed_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    psql(database_url, "VACUUM (ANALYZE) messages; VACUUM (ANALYZE) rooms; VACUUM (ANALYZE) room_members;")
        .await
        .context("vacuuming")?;
    let vacuum_s = started.elapsed().as_secs_f64();
    eprintln!("search: seeded in {seed_s:.1} s, vacuumed in {vacuum_s:.1} s");

    let mut searchers = Vec::new();
    for (n, user) in users.iter().enumerate() {
        let rooms: HashSet<String> = memberships
            .lines()
            .filter_map(|line| line.split_once('|'))
            .filter(|(u, _)| u == user)
            .map(|(_, room)| room.to_owned())
            .collect();
        searchers.push(Searcher { ws: target.connect(n, n).await?, rooms });
    }
    let member_of = searchers.first().map_or(0, |s| s.rooms.len());

    // Every word once per client first: a query's first plan and the index pages it reads.
    let every: Vec<&str> = WORDS.iter().copied().chain([RARE, FREQUENT]).collect();
    let (searchers, _) = phase(searchers, &every, (load.clients * every.len()) as u64, load.within, "warm-up").await?;
    let cpu_start = cpu.snapshot();
    let (searchers, main) = phase(searchers, &WORDS, load.queries, load.within, "search, ~1% words").await?;
    let cpu_s = CpuProbe::seconds_between(&cpu_start, &cpu.snapshot());
    let few = (load.queries / 10).max(1);
    let (searchers, rare) = phase(searchers, &[RARE], few, load.within / 4, "search, a rare word").await?;
    let (searchers, frequent) = phase(searchers, &[FREQUENT], few, load.within / 4, "search, a frequent word").await?;
    for mut s in searchers {
        let _ = s.ws.close(None).await;
    }

    let counts = psql(database_url, &frequency_sql(&every, &users[0])).await.context("counting matches")?;
    let matches: Vec<Value> = counts
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|');
            let word = cells.next()?;
            let all: u64 = cells.next()?.parse().ok()?;
            let mine: u64 = cells.next()?.parse().ok()?;
            let fraction = all as f64 / corpus.messages as f64;
            Some(json!({"word": word, "messages": all, "fraction": fraction, "in_callers_rooms": mine}))
        })
        .collect();
    let fraction_of = |words: &[&str]| {
        let f: Vec<f64> = matches
            .iter()
            .filter(|m| words.iter().any(|w| m["word"] == *w))
            .filter_map(|m| m["fraction"].as_f64())
            .collect();
        (!f.is_empty()).then(|| f.iter().sum::<f64>() / f.len() as f64)
    };

    Ok(json!({
        "scenario": "search",
        "messages": corpus.messages,
        "rooms": corpus.rooms,
        "member_of": member_of,
        "clients": load.clients,
        "seed_s": seed_s,
        "vacuum_s": vacuum_s,
        "words": WORDS,
        "word_fraction": fraction_of(&WORDS),
        "queries": main.queries,
        "errors": main.errors,
        "first_error": main.first_error,
        "foreign_results": main.foreign + rare.foreign + frequent.foreign,
        "results_per_query": main.results_per_query,
        "queries_per_s": main.queries_per_s,
        "p50_ms": main.p50_ms,
        "p99_ms": main.p99_ms,
        "max_ms": main.max_ms,
        "cpu_ms_per_query": (!cpu.is_empty() && main.queries > 0).then(|| cpu_s * 1e3 / main.queries as f64),
        "rare": phase_json(RARE, &rare, fraction_of(&[RARE])),
        "frequent": phase_json(FREQUENT, &frequent, fraction_of(&[FREQUENT])),
        "matches": matches,
    }))
}

fn phase_json(word: &str, phase: &Phase, fraction: Option<f64>) -> Value {
    json!({
        "word": word,
        "fraction": fraction,
        "queries": phase.queries,
        "errors": phase.errors,
        "first_error": phase.first_error,
        "results_per_query": phase.results_per_query,
        "p50_ms": phase.p50_ms,
        "p99_ms": phase.p99_ms,
        "max_ms": phase.max_ms,
    })
}

/// One client and the rooms it may see: a result from any other room is a wrong answer.
struct Searcher {
    ws: Ws,
    rooms: HashSet<String>,
}

/// A phase's figures.
#[derive(Default)]
struct Phase {
    queries: u64,
    errors: u64,
    first_error: Option<String>,
    /// Results from rooms the client is not a member of (must be 0).
    foreign: u64,
    results: u64,
    results_per_query: f64,
    queries_per_s: f64,
    /// None when no query was answered.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
}

/// Every searcher asks for `words` in turn, one query at a time, until `budget` queries
/// between them or `within` has passed; each round trip's latency goes in one histogram.
/// The searchers come back (those whose connection failed do not).
async fn phase(
    searchers: Vec<Searcher>,
    words: &[&str],
    budget: u64,
    within: Duration,
    label: &str,
) -> Result<(Vec<Searcher>, Phase)> {
    if searchers.is_empty() {
        bail!("every searching client lost its connection");
    }
    let issued = Arc::new(AtomicU64::new(0));
    let words: Arc<Vec<String>> = Arc::new(words.iter().map(|w| (*w).to_owned()).collect());
    let latencies = Arc::new(Mutex::new(histogram()));
    let bar = progress::bar(budget, label);
    let started = Instant::now();
    let deadline = started + within;
    let mut tasks = Vec::new();
    for mut s in searchers {
        let (issued, words, latencies, bar) = (issued.clone(), words.clone(), latencies.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            let mut tally = Phase::default();
            let mut alive = true;
            while Instant::now() < deadline {
                let k = issued.fetch_add(1, Ordering::Relaxed);
                if k >= budget {
                    break;
                }
                let id = format!("s{k}");
                let frame = json!({"type": "search", "id": id, "q": words[k as usize % words.len()]});
                let sent = Instant::now();
                let reply = ask(&mut s.ws, frame.to_string(), &id).await;
                let elapsed = sent.elapsed();
                bar.inc(1);
                match reply {
                    Ok(reply) if reply["type"] == "ack" => {
                        let _ = local.record((elapsed.as_micros() as u64).max(1));
                        tally.queries += 1;
                        let hits = reply["results"].as_array().map_or(&[][..], Vec::as_slice);
                        tally.results += hits.len() as u64;
                        tally.foreign += hits
                            .iter()
                            .filter(|h| !h["message"]["room"].as_str().is_some_and(|r| s.rooms.contains(r)))
                            .count() as u64;
                    }
                    Ok(reply) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert_with(|| reply.to_string());
                    }
                    Err(err) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert_with(|| format!("{err:#}"));
                        alive = false;
                        break;
                    }
                }
            }
            if let Ok(mut all) = latencies.lock() {
                let _ = all.add(&local);
            }
            (alive.then_some(s), tally)
        }));
    }
    let mut back = Vec::new();
    let mut phase = Phase::default();
    for task in tasks {
        let (searcher, tally) = task.await?;
        back.extend(searcher);
        phase.queries += tally.queries;
        phase.errors += tally.errors;
        phase.foreign += tally.foreign;
        phase.results += tally.results;
        phase.first_error = phase.first_error.or(tally.first_error);
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let h = latencies.lock().map(|h| h.clone()).unwrap_or_else(|_| histogram());
    let ms = |us: u64| (phase.queries > 0).then(|| us as f64 / 1000.0);
    phase.results_per_query = phase.results as f64 / phase.queries.max(1) as f64;
    phase.queries_per_s = phase.queries as f64 / elapsed;
    phase.p50_ms = ms(h.value_at_quantile(0.5));
    phase.p99_ms = ms(h.value_at_quantile(0.99));
    phase.max_ms = ms(h.max());
    let shown = |ms: Option<f64>| ms.map_or("—".to_owned(), |ms| format!("{ms:.1}"));
    eprintln!(
        "{label}: {} answered in {elapsed:.1} s, p50 {} ms, p99 {} ms, max {} ms, {} failed {}",
        phase.queries,
        shown(phase.p50_ms),
        shown(phase.p99_ms),
        shown(phase.max_ms),
        phase.errors,
        phase.first_error.as_deref().unwrap_or("")
    );
    Ok((back, phase))
}

/// Sends `frame` and reads up to the reply with `id` (the searchers join no room, so
/// nothing else should come; anything else is skipped).
async fn ask(ws: &mut Ws, frame: String, id: &str) -> Result<Value> {
    ws.send(Message::Text(frame.into())).await?;
    loop {
        let reply = client::next_json(ws).await?;
        if reply["id"] == id {
            return Ok(reply);
        }
    }
}

/// Runs `sql` through `psql` on `url`, stopping at the first error; its unaligned output.
async fn psql(url: &str, sql: &str) -> Result<String> {
    let mut child = tokio::process::Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting psql")?;
    let mut stdin = child.stdin.take().context("psql's stdin")?;
    stdin.write_all(sql.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A SQL `text[]` of `words`.
fn array(words: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let items: Vec<String> = words.into_iter().map(|w| literal(w.as_ref())).collect();
    format!("ARRAY[{}]::text[]", items.join(", "))
}

/// One transaction: `corpus.rooms` rooms named `search <r>`, each with 10 members from a
/// pool of 2,000 users (`<run>-m<k>`) and `users` in every `rooms / member_of`th one
/// (user n in the rooms with r ≡ n); message i goes to room i mod rooms as its next seq,
/// sent by one of the room's members, a second apart (the last one now), its text drawn
/// from the vocabulary above with a fixed seed. Each room's `last_seq` is its last
/// message's seq (checked before the commit). Answers `user|room id` of `users`' rooms.
fn seed_sql(run: &str, corpus: Corpus, users: &[String]) -> String {
    let Corpus { messages: n, rooms, member_of } = corpus;
    let stride = (rooms / member_of).max(1);
    let pool = MEMBER_POOL;
    let members = ROOM_MEMBERS;
    let prefix = literal(&format!("{run}-m"));
    let users = array(users);
    let filler = array(FILLER.split_whitespace());
    let content = array(CONTENT.split_whitespace());
    let syllables = array(SYLLABLES);
    let names = NAME_SHARE;
    let content_below = NAME_SHARE + CONTENT_SHARE;
    format!(
        "BEGIN;
SET LOCAL seed = 0.19;
CREATE TEMP TABLE search_rooms ON COMMIT DROP AS
  WITH created AS (
    INSERT INTO rooms (kind, name, created_by, last_seq)
    SELECT 'group', 'search ' || r, {prefix} || (r * 9 % {pool}), ({n} - r + {rooms} - 1) / {rooms}
    FROM generate_series(0::bigint, {rooms} - 1) r
    RETURNING id, name)
  SELECT id, split_part(name, ' ', 2)::bigint AS r FROM created;
INSERT INTO room_members (room_id, user_id, role)
SELECT id, {prefix} || ((r * 9 + k) % {pool}), CASE k WHEN 0 THEN 'owner' ELSE 'member' END
FROM search_rooms, generate_series(0::bigint, {members} - 1) k;
INSERT INTO room_members (room_id, user_id, role)
SELECT id, u.name, 'member'
FROM search_rooms, unnest({users}) WITH ORDINALITY u (name, n)
WHERE r % {stride} = (u.n - 1) % {stride};
INSERT INTO messages (room_id, seq, sender_id, body, created_at)
SELECT s.id, i / {rooms} + 1, {prefix} || ((s.r * 9 + i / {rooms} % {members}) % {pool}), t.body,
       now() - ({n} - 1 - i) * interval '1 second'
FROM generate_series(0::bigint, {n} - 1) i
JOIN search_rooms s ON s.r = i % {rooms}
CROSS JOIN LATERAL (
  SELECT string_agg(CASE
           WHEN w.x < {names} THEN v.syl[1 + w.y % 10] || v.syl[1 + w.y / 10 % 10]
                                   || v.syl[1 + w.y / 100 % 10] || v.syl[1 + w.y / 1000 % 10]
           WHEN w.x < {content_below} THEN v.content[1 + w.y % cardinality(v.content)]
           ELSE v.filler[1 + floor(cardinality(v.filler) * power(w.z, 1.5))::int]
         END, ' ') AS body
  FROM (SELECT random() AS x, floor(random() * 10000)::int AS y, random() AS z
        -- 2 to 25 words, short ones likelier (mean 9.5); `i` makes it one draw per message.
        FROM generate_series(1, 2 + floor(24 * power(random(), 2))::int + 0 * i)) w,
       (SELECT {syllables} AS syl, {content} AS content, {filler} AS filler) v
) t;
DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM search_rooms s JOIN rooms ON rooms.id = s.id
             WHERE rooms.last_seq <> coalesce((SELECT max(seq) FROM messages m WHERE m.room_id = s.id), 0)) THEN
    RAISE EXCEPTION 'a seeded room''s last_seq is not its last message''s seq';
  END IF;
END $$;
SELECT user_id || '|' || room_id FROM room_members WHERE user_id = ANY({users});
COMMIT;
"
    )
}

/// `word|messages|in user's rooms` for each word, by the same index the product uses.
fn frequency_sql(words: &[&str], user: &str) -> String {
    format!(
        "SELECT w, count(m.room_id), count(m.room_id) FILTER (WHERE m.room_id IN
           (SELECT room_id FROM room_members WHERE user_id = {user}))
         FROM unnest({words}) w
         LEFT JOIN LATERAL (SELECT room_id FROM messages WHERE search @@ to_tsquery('simple', w)) m ON true
         GROUP BY w;",
        user = literal(user),
        words = array(words),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(y: usize) -> String {
        [y % 10, y / 10 % 10, y / 100 % 10, y / 1000 % 10].iter().map(|&i| SYLLABLES[i]).collect()
    }

    #[test]
    fn the_vocabulary_tiers_are_plain_distinct_words() {
        let filler: Vec<&str> = FILLER.split_whitespace().collect();
        let content: Vec<&str> = CONTENT.split_whitespace().collect();
        let names: HashSet<String> = (0..10_000).map(name).collect();
        assert_eq!(names.len(), 10_000, "every name is distinct");
        let mut seen = HashSet::new();
        for word in filler.iter().chain(&content) {
            assert!(word.bytes().all(|b| b.is_ascii_lowercase()), "{word}: one token in 'simple', no quoting");
            assert!(seen.insert(*word), "{word} is in the vocabulary twice");
            assert!(!names.contains(*word), "{word} is also a name");
        }
        assert_eq!(filler.len(), 48, "the skew in FILLER's doc");
        assert!(content.len() >= 300, "{} content words", content.len());
        assert!(WORDS.iter().all(|w| content.contains(w)), "the measured words are content words");
        assert!(names.contains(RARE) && filler.first() == Some(&FREQUENT));
    }

    #[test]
    fn a_content_word_is_in_about_one_message_in_a_hundred() {
        // 2 + ⌊24·u²⌋ words: E = 2 + 24/3 − ½ (the floor) = 9.5.
        let mean_words = 9.5;
        let per_word = CONTENT_SHARE / CONTENT.split_whitespace().count() as f64;
        let fraction = mean_words * per_word;
        assert!((0.008..0.012).contains(&fraction), "{fraction}");
    }

    #[test]
    fn the_seed_script_quotes_its_users_and_checks_last_seq() {
        let sql = seed_sql("b1", Corpus { messages: 1000, rooms: 10, member_of: 2 }, &["o'brien".to_owned()]);
        assert!(sql.contains("'o''brien'"));
        assert!(sql.contains("r % 5 = (u.n - 1) % 5"), "every fifth room");
        assert!(sql.contains("last_seq <> coalesce"));
    }
}
