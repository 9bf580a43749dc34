//! `chatctl connect`: an interactive protocol session on stdin/stdout.
//!
//! Lines typed (or piped) become protocol commands; frames from the server print one
//! line each (or verbatim with `--json`). Works the same with a terminal or a pipe, so
//! scripts and tests can drive it.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::Dropped;
use crate::render::{self, Asked};
use crate::target::{Credentials, Target};
use crate::ws::{self, Incoming, Ws};

/// The `/help` text.
pub const HELP: &str = "\
commands:
  /join <room> [since_seq]    join a room and make it the current room
  /leave <room>               stop receiving the room's events
  /send <room> <text...>      send a message
  <text>                      send to the current room (after /join); start with // to send a leading /
  /history <room> [limit]     the newest messages (limit 1-100, default 50)
  /rooms                      your rooms, with unread counts
  /search [#room] <query...>  search your rooms (or one) for words, \"phrases\", -excluded words; newest first
  /thread <room> <root_seq>   a message and its replies, one per line
  /receipts <room>            each member's delivered and read seq
  /create <name> <member>...  create a group room with these members
  /typing [room]              tell the room you are typing (default: the current room)
  /raw <json>                 send any frame as is (objects without an id get one)
  /help                       this list
  /quit                       wait for pending replies, close with 1000 and exit (as does end of input)";

const SEARCH_USAGE: &str = "usage: /search [#room] <query...>";

/// What one input line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A command frame to send; the session adds an `id` when it has none.
    Command { asked: Asked, frame: Map<String, Value> },
    /// Text to send exactly as typed (`/raw` with something that is not a JSON object).
    Verbatim(String),
    /// Print the help.
    Help,
    /// Finish and close.
    Quit,
    /// An empty line.
    Nothing,
}

fn command(asked: Asked, frame: Value) -> Action {
    match frame {
        Value::Object(frame) => Action::Command { asked, frame },
        // Every caller passes an object literal; keep the function total anyway.
        other => Action::Verbatim(other.to_string()),
    }
}

fn number(arg: &str, what: &str) -> Result<u64, String> {
    arg.parse().map_err(|_| format!("{what} must be a non-negative number, not {arg:?}"))
}

/// Splits off the first whitespace-separated word; the rest keeps its inner spacing.
fn word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

/// Parses one input line; `current` is the room plain lines go to. `Err` is a usage
/// message for the user.
pub fn parse(line: &str, current: Option<&str>) -> Result<Action, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(Action::Nothing);
    }
    // `//text` escapes a message that starts with a slash.
    let plain = if let Some(rest) = line.strip_prefix("//") {
        Some(format!("/{rest}"))
    } else if line.starts_with('/') {
        None
    } else {
        Some(line.to_owned())
    };
    if let Some(text) = plain {
        let room = current.ok_or("no current room: /join <room> first, or use /send <room> <text>")?;
        return Ok(command(Asked::Send, json!({"type": "send", "room": room, "text": text})));
    }
    let (name, rest) = word(&line[1..]);
    let args: Vec<&str> = rest.split_whitespace().collect();
    match (name, args.as_slice()) {
        ("join", [room]) => Ok(command(Asked::Join { room: room.to_string() }, json!({"type": "join", "room": room}))),
        ("join", [room, since]) => Ok(command(
            Asked::Join { room: room.to_string() },
            json!({"type": "join", "room": room, "since_seq": number(since, "since_seq")?}),
        )),
        ("join", _) => Err("usage: /join <room> [since_seq]".into()),
        ("leave", [room]) => {
            Ok(command(Asked::Leave { room: room.to_string() }, json!({"type": "leave", "room": room})))
        }
        ("leave", _) => Err("usage: /leave <room>".into()),
        ("send", [_, _, ..]) => {
            let (room, text) = word(rest);
            Ok(command(Asked::Send, json!({"type": "send", "room": room, "text": text})))
        }
        ("send", _) => Err("usage: /send <room> <text...>".into()),
        ("history", [room]) => {
            Ok(command(Asked::History { room: room.to_string() }, json!({"type": "history", "room": room})))
        }
        ("history", [room, limit]) => Ok(command(
            Asked::History { room: room.to_string() },
            json!({"type": "history", "room": room, "limit": number(limit, "limit")?}),
        )),
        ("history", _) => Err("usage: /history <room> [limit]".into()),
        ("search", [first, ..]) => {
            // `#` marks the room because a bare id would read as a query word. Search
            // ignores punctuation, so a query never needs a leading `#` of its own.
            let (room, q) = match first.strip_prefix('#') {
                Some(room) => (Some(room), word(rest).1),
                None => (None, rest),
            };
            let q = q.trim_end();
            if q.is_empty() || room == Some("") {
                return Err(SEARCH_USAGE.into());
            }
            let mut frame = Map::new();
            frame.insert("type".into(), "search".into());
            frame.insert("q".into(), q.into());
            if let Some(room) = room {
                frame.insert("room".into(), room.into());
            }
            let asked = Asked::Search { q: q.to_owned(), room: room.map(str::to_owned) };
            Ok(Action::Command { asked, frame })
        }
        ("search", _) => Err(SEARCH_USAGE.into()),
        ("thread", [room, root_seq]) => {
            let root_seq = number(root_seq, "root_seq")?;
            Ok(command(
                Asked::Thread { room: room.to_string(), root_seq },
                json!({"type": "thread", "room": room, "root_seq": root_seq}),
            ))
        }
        ("thread", _) => Err("usage: /thread <room> <root_seq>".into()),
        ("receipts", [room]) => {
            Ok(command(Asked::Receipts { room: room.to_string() }, json!({"type": "receipts", "room": room})))
        }
        ("receipts", _) => Err("usage: /receipts <room>".into()),
        ("rooms", []) => Ok(command(Asked::Rooms, json!({"type": "rooms"}))),
        ("rooms", _) => Err("usage: /rooms".into()),
        ("create", [name, members @ ..]) => Ok(command(
            Asked::Create,
            json!({"type": "create_room", "kind": "group", "name": name, "members": members}),
        )),
        ("create", _) => Err("usage: /create <name> <member>...".into()),
        ("typing", []) => {
            let room = current.ok_or("no current room: /typing <room>, or /join <room> first")?;
            Ok(command(Asked::Typing, json!({"type": "typing", "room": room, "active": true})))
        }
        ("typing", [room]) => Ok(command(Asked::Typing, json!({"type": "typing", "room": room, "active": true}))),
        ("typing", _) => Err("usage: /typing [room]".into()),
        ("raw", _) if rest.is_empty() => Err("usage: /raw <json>".into()),
        // Anything that is not a JSON object goes out verbatim: handy for probing how the
        // server answers malformed frames.
        ("raw", _) => match serde_json::from_str::<Value>(rest) {
            Ok(Value::Object(frame)) => Ok(Action::Command { asked: Asked::Raw, frame }),
            _ => Ok(Action::Verbatim(rest.to_owned())),
        },
        ("help", _) => Ok(Action::Help),
        ("quit" | "exit", _) => Ok(Action::Quit),
        _ => Err(format!("unknown command /{name}: /help lists them")),
    }
}

/// Session options.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Print frames verbatim instead of readably.
    pub json: bool,
    /// How long to wait for the handshake, and for pending replies at the end.
    pub timeout: Duration,
}

/// State of one session, apart from the socket.
struct Session {
    opts: Options,
    next_id: u64,
    /// Commands sent and not yet answered, by id.
    pending: HashMap<String, Asked>,
    /// Where plain lines go: the room of the last `/join`.
    current: Option<String>,
    /// Prefix of the `client_msg_id`s of this session's sends.
    msg_id_prefix: String,
}

impl Session {
    /// Prints a frame from the server and settles the command it answers.
    fn show(&mut self, text: &str, frame: &Value) -> anyhow::Result<()> {
        let is_reply = matches!(frame["type"].as_str(), Some("ack" | "error" | "pong"));
        let asked = match frame["id"].as_str() {
            Some(id) if is_reply => self.pending.remove(id),
            _ => None,
        };
        // A refused join must not leave plain lines going to that room.
        if let (Some(Asked::Join { room }), Some("error")) = (&asked, frame["type"].as_str()) {
            if self.current.as_deref() == Some(room.as_str()) {
                self.current = None;
            }
        }
        if self.opts.json {
            return render::out(text);
        }
        let lines = if is_reply { render::reply(asked.as_ref(), frame) } else { vec![render::event(frame)] };
        lines.into_iter().try_for_each(render::out)
    }

    /// Sends a command frame with a fresh id (unless it has one) and remembers it.
    async fn send_command(&mut self, ws: &mut Ws, asked: Asked, mut frame: Map<String, Value>) -> anyhow::Result<()> {
        let n = self.next_id;
        self.next_id += 1;
        let id = match frame.get("id") {
            Some(Value::String(id)) => Some(id.clone()),
            Some(_) => None,
            None => {
                frame.insert("id".into(), Value::String(format!("r{n}")));
                Some(format!("r{n}"))
            }
        };
        if asked == Asked::Send && !frame.contains_key("client_msg_id") {
            // Every send carries one (docs/reliability.md): a resend can never duplicate.
            frame.insert("client_msg_id".into(), Value::String(format!("{}-{n}", self.msg_id_prefix)));
        }
        match &asked {
            Asked::Join { room } => self.current = Some(room.clone()),
            Asked::Leave { room } if self.current.as_deref() == Some(room.as_str()) => self.current = None,
            _ => {}
        }
        if let Some(id) = id {
            self.pending.insert(id, asked);
        }
        ws::send_text(ws, Value::Object(frame).to_string()).await
    }
}

/// Reads stdin on a thread of its own: a blocking read there never holds up the runtime
/// or the exit, which tokio's own stdin would.
fn stdin_lines() -> anyhow::Result<mpsc::Receiver<String>> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(line) => {
                        if tx.blocking_send(line).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        eprintln!("! reading stdin: {e}");
                        return;
                    }
                }
            }
        })
        .context("starting the stdin reader")?;
    Ok(rx)
}

/// When to refresh a minted token: at three quarters of its life, so a slow round trip
/// still lands before the gateway's 4001.
fn refresh_delay(ttl_secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl_secs.saturating_mul(3) / 4).unwrap_or(0).max(1))
}

/// Runs the session until `/quit`, end of input, or the server closing.
///
/// Returns `Ok` after a clean close (ours, or the server's 1000); an error when the
/// server closed with any other code or the connection was lost.
pub async fn run(target: &Target, creds: &Credentials, opts: Options) -> anyhow::Result<()> {
    let (mut ws, welcome, raw) = ws::open(target, &creds.token, opts.timeout).await?;
    let mut session = Session {
        opts,
        next_id: 1,
        pending: HashMap::new(),
        current: None,
        msg_id_prefix: format!("cc-{}", crate::send::unique_suffix()),
    };
    session.show(&raw, &welcome)?;
    let mut input = stdin_lines()?;
    let mut refresh_at = creds.minter.as_ref().map(|m| Instant::now() + refresh_delay(m.ttl));
    // Set once the input is done (`/quit` or EOF): from then on only the pending replies
    // are awaited, until this deadline.
    let mut finish_by: Option<Instant> = None;
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);

    loop {
        if finish_by.is_some() && session.pending.is_empty() {
            break;
        }
        tokio::select! {
            line = input.recv(), if finish_by.is_none() => {
                let Some(line) = line else {
                    finish_by = Some(Instant::now() + opts.timeout);
                    continue;
                };
                match parse(&line, session.current.as_deref()) {
                    Ok(Action::Command { asked, frame }) => session.send_command(&mut ws, asked, frame).await?,
                    Ok(Action::Verbatim(text)) => ws::send_text(&mut ws, text).await?,
                    Ok(Action::Help) => eprintln!("{HELP}"),
                    Ok(Action::Quit) => finish_by = Some(Instant::now() + opts.timeout),
                    Ok(Action::Nothing) => {}
                    Err(usage) => eprintln!("! {usage}"),
                }
            }
            incoming = ws::next(&mut ws) => match incoming {
                Incoming::Frame { text, value } => session.show(&text, &value)?,
                Incoming::Closed(frame) => {
                    let described = ws::describe_close(frame.as_ref());
                    if ws::close_code(frame.as_ref()) == Some(1000) {
                        eprintln!("closed by the server: {described}");
                        return Ok(());
                    }
                    anyhow::bail!("closed by the server: {described}");
                }
                Incoming::Lost(e) => return Err(Dropped(format!("connection lost: {e}")).into()),
            },
            _ = tokio::time::sleep_until(refresh_at.unwrap_or(far)), if refresh_at.is_some() && finish_by.is_none() => {
                if let Some(minter) = &creds.minter {
                    refresh_at = Some(Instant::now() + refresh_delay(minter.ttl));
                    match minter.mint() {
                        Ok(token) => {
                            let frame = json!({"type": "refresh_token", "token": token});
                            if let Value::Object(frame) = frame {
                                session.send_command(&mut ws, Asked::Refresh, frame).await?;
                            }
                        }
                        Err(e) => eprintln!("! cannot refresh the token: {e:#}"),
                    }
                }
            }
            _ = tokio::time::sleep_until(finish_by.unwrap_or(far)), if finish_by.is_some() => {
                let mut ids: Vec<&String> = session.pending.keys().collect();
                ids.sort();
                let ids: Vec<&str> = ids.into_iter().map(String::as_str).collect();
                ws::close(&mut ws, opts.timeout).await;
                anyhow::bail!("no reply within {:?} to {}", opts.timeout, ids.join(", "));
            }
        }
    }
    ws::close(&mut ws, opts.timeout).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(action: Action) -> Value {
        match action {
            Action::Command { frame, .. } => Value::Object(frame),
            other => panic!("not a command: {other:?}"),
        }
    }

    #[test]
    fn slash_commands_become_frames() -> Result<(), String> {
        assert_eq!(frame(parse("/join 12", None)?), json!({"type":"join","room":"12"}));
        assert_eq!(frame(parse("/join 12 7", None)?), json!({"type":"join","room":"12","since_seq":7}));
        assert_eq!(
            frame(parse("/send 12 hello   there ", None)?),
            json!({"type":"send","room":"12","text":"hello   there "})
        );
        assert_eq!(frame(parse("/history 12 5", None)?), json!({"type":"history","room":"12","limit":5}));
        assert_eq!(
            frame(parse("/create ops bob carol", None)?),
            json!({"type":"create_room","kind":"group","name":"ops","members":["bob","carol"]})
        );
        assert_eq!(frame(parse("/typing", Some("3"))?), json!({"type":"typing","room":"3","active":true}));
        assert_eq!(
            frame(parse(r#"/search  launch  "at noon" -friday "#, Some("3"))?),
            json!({"type":"search","q":r#"launch  "at noon" -friday"#}),
            "all rooms, even with a current room; inner spacing and quotes kept"
        );
        assert_eq!(
            frame(parse("/search #12 launch plan", None)?),
            json!({"type":"search","room":"12","q":"launch plan"})
        );
        assert_eq!(frame(parse("/search 12 launch", None)?), json!({"type":"search","q":"12 launch"}));
        assert_eq!(frame(parse("/thread 12 3", None)?), json!({"type":"thread","room":"12","root_seq":3}));
        assert_eq!(frame(parse("/receipts 12", Some("3"))?), json!({"type":"receipts","room":"12"}));
        assert_eq!(frame(parse(r#"/raw {"type":"ping","id":"p"}"#, None)?), json!({"type":"ping","id":"p"}));
        assert_eq!(parse("/raw {oops", None)?, Action::Verbatim("{oops".into()));
        assert_eq!(parse("/quit", None)?, Action::Quit);
        assert_eq!(parse("   ", None)?, Action::Nothing);
        Ok(())
    }

    #[test]
    fn a_search_remembers_its_query_and_room_for_the_reply() -> Result<(), String> {
        let Action::Command { asked, .. } = parse("/search #12 launch", None)? else {
            return Err("not a command".into());
        };
        assert_eq!(asked, Asked::Search { q: "launch".into(), room: Some("12".into()) });
        Ok(())
    }

    #[test]
    fn a_thread_remembers_its_room_and_root_for_the_reply() -> Result<(), String> {
        let Action::Command { asked, .. } = parse("/thread 12 3", None)? else {
            return Err("not a command".into());
        };
        assert_eq!(asked, Asked::Thread { room: "12".into(), root_seq: 3 });
        Ok(())
    }

    #[test]
    fn plain_lines_go_to_the_current_room() -> Result<(), String> {
        assert_eq!(frame(parse("hi all\r", Some("12"))?), json!({"type":"send","room":"12","text":"hi all"}));
        assert_eq!(frame(parse("//shrug", Some("12"))?), json!({"type":"send","room":"12","text":"/shrug"}));
        assert!(parse("hi", None).is_err());
        Ok(())
    }

    #[test]
    fn bad_usage_is_explained() {
        for line in [
            "/join",
            "/join 1 x",
            "/send 12",
            "/history 1 -3",
            "/nope",
            "/raw",
            "/typing",
            "/search",
            "/search #12 ",
            "/search # x",
            "/thread",
            "/thread 12",
            "/thread 12 x",
            "/thread 12 -1",
            "/thread 12 3 4",
            "/receipts",
            "/receipts 12 13",
        ] {
            assert!(parse(line, None).is_err(), "{line}");
        }
    }
}
