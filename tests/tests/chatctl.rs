//! `chatctl` against a real cluster, run as a user runs it: the built binary, its
//! arguments, stdin, stdout, stderr and exit status.

use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use chat_tests::{bin, http_json, token, Cluster, WsClient, SECRET, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

/// `chatctl` aimed at `gateway` (`host:port`) with the cluster's secret, and nothing
/// inherited from the environment that could change whom it acts as.
fn chatctl(gateway: &str) -> Command {
    let mut cmd = Command::new(bin("chatctl"));
    for var in ["CHAT_TOKEN", "CHAT_ROOM", "CHAT_TIMEOUT", "JWT_ISSUER", "JWT_AUDIENCE"] {
        cmd.env_remove(var);
    }
    cmd.env("CHAT_URL", format!("http://{gateway}")).env("JWT_SECRET", SECRET).stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// What a finished `chatctl` left behind.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `chatctl` with these arguments to completion (bounded).
async fn run(mut cmd: Command, args: &[&str]) -> Result<Run> {
    let out = tokio::time::timeout(WAIT * 2, cmd.args(args).output())
        .await
        .map_err(|_| anyhow!("chatctl {args:?} did not finish within {:?}", WAIT * 2))??;
    Ok(Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Like `run`, but fails unless chatctl exits 0.
async fn run_ok(cmd: Command, args: &[&str]) -> Result<Run> {
    let run = run(cmd, args).await?;
    anyhow::ensure!(run.code == Some(0), "chatctl {args:?} failed: {run:?}");
    Ok(run)
}

/// A running `chatctl connect`, driven line by line through a pipe.
struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<String>,
    /// Every stdout line read so far, for failure messages.
    seen: Vec<String>,
}

impl Interactive {
    async fn start(mut cmd: Command, args: &[&str]) -> Result<Self> {
        let mut child = cmd
            .arg("connect")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning chatctl connect")?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout pipe")?).lines();
        let mut stderr_pipe = child.stderr.take().context("no stderr pipe")?;
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text).await;
            text
        });
        Ok(Self { child, stdin: Some(stdin), stdout, stderr, seen: Vec::new() })
    }

    /// Types one line.
    async fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Reads stdout until a line contains `needle`; that line.
    async fn expect(&mut self, needle: &str) -> Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.stdout.next_line()).await {
                Err(_) => bail!("no line with {needle:?} within {WAIT:?}; stdout so far: {:#?}", self.seen),
                Ok(line) => line?,
            };
            let Some(line) = line else { bail!("stdout ended before a line with {needle:?}: {:#?}", self.seen) };
            self.seen.push(line.clone());
            if line.contains(needle) {
                return Ok(line);
            }
        }
    }

    /// Closes stdin (if still open), waits for the exit, and returns it with the rest of
    /// stdout and all of stderr.
    async fn finish(mut self) -> Result<Run> {
        drop(self.stdin.take());
        self.exit().await
    }

    /// Waits for chatctl to exit on its own (stdin still open: closing it would end the
    /// session normally), and returns the exit with the rest of stdout and all of stderr.
    async fn exit(mut self) -> Result<Run> {
        let status = tokio::time::timeout(WAIT, self.child.wait()).await.context("chatctl connect did not exit")??;
        let mut rest = Vec::new();
        while let Some(line) = tokio::time::timeout(WAIT, self.stdout.next_line()).await?? {
            rest.push(line);
        }
        let stderr = tokio::time::timeout(WAIT, self.stderr).await??;
        Ok(Run { code: status.code(), stdout: rest.join("\n"), stderr })
    }
}

#[tokio::test]
async fn minted_tokens_are_accepted_by_the_gateway_and_carry_their_claims() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let gw = cluster.gateways[0].as_str();

    let minted = run_ok(chatctl(gw), &["token", "--sub", "alice", "--name", "Alice"]).await?;
    let (_alice, welcome) = WsClient::connect_bearer(&cluster.ws_url(0), minted.stdout.trim()).await?;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user_id"], "alice");

    let admin = run_ok(chatctl(gw), &["token", "--user", "ops", "--role", "admin"]).await?;
    let reply = http_json(gw, "GET", "/v1/connections", Some(admin.stdout.trim()), None).await?;
    assert_eq!(reply.status, 200, "an admin token opens admin routes: {reply:?}");

    // The gateway does check the signature: a token signed with another key is refused.
    let forged = run_ok(chatctl(gw), &["token", "--sub", "alice", "--secret", "not-the-secret"]).await?;
    let refused = http_json(gw, "GET", "/v1/me/status", Some(forged.stdout.trim()), None).await?;
    assert_eq!(refused.status, 401, "{refused:?}");
    Ok(())
}

#[tokio::test]
async fn send_delivers_to_a_joined_client_and_prints_the_stored_message() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;

    let sent =
        run_ok(chatctl(&cluster.gateways[1]), &["send", "--user", "bob", "--room", &room, "hello", "world"]).await?;
    let stored: Value = serde_json::from_str(sent.stdout.trim()).with_context(|| format!("not JSON: {sent:?}"))?;
    assert_eq!(stored["text"], "hello world");
    assert_eq!(stored["sender_id"], "bob");
    assert_eq!(stored["seq"], 1);
    assert!(stored["client_msg_id"].as_str().is_some_and(|id| !id.is_empty()), "a generated client_msg_id");
    let event = alice.event("message").await?;
    assert_eq!(event["message"], stored, "the joined client got exactly the stored message");

    // Rerunning with the same --client-msg-id stores nothing new.
    let args = ["send", "--user", "bob", "--room", &room, "--client-msg-id", "cli-1", "--readable", "once"];
    let first = run_ok(chatctl(&cluster.gateways[0]), &args).await?;
    let again = run_ok(chatctl(&cluster.gateways[1]), &args).await?;
    assert_eq!(first.stdout.trim(), format!("[room {room} #2] bob: once"));
    assert_eq!(again.stdout, first.stdout);
    let history = alice.ack(json!({"type": "history", "room": room})).await?;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(2), "{history}");
    Ok(())
}

#[tokio::test]
async fn send_to_a_room_the_user_is_not_in_is_refused_with_exit_2() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let gw = cluster.gateways[0].as_str();
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&[]).await?;

    // Identity from CHAT_TOKEN this time.
    let mut cmd = chatctl(gw);
    cmd.env("CHAT_TOKEN", token("mallory"));
    let refused = run(cmd, &["send", "--room", &room, "let me in"]).await?;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.stderr.contains("error forbidden:"), "{refused:?}");
    assert!(refused.stdout.is_empty(), "{refused:?}");
    let history = alice.ack(json!({"type": "history", "room": room})).await?;
    assert_eq!(history["messages"], json!([]), "nothing was stored");

    // No gateway at all: a connection problem, exit 1.
    let mut cmd = chatctl(gw);
    cmd.env("CHAT_URL", format!("http://127.0.0.1:{}", chat_tests::free_port()));
    let unreachable = run(cmd, &["send", "--user", "alice", "--retries", "1", "--room", &room, "hi"]).await?;
    assert_eq!(unreachable.code, Some(1), "{unreachable:?}");
    assert!(unreachable.stderr.contains("cannot connect"), "{unreachable:?}");
    Ok(())
}

#[tokio::test]
async fn without_an_identity_chatctl_says_how_to_give_one() -> Result<()> {
    // Nothing listens there: the identity check comes before any connection.
    let addr = format!("127.0.0.1:{}", chat_tests::free_port());
    let missing = run(chatctl(&addr), &["send", "--room", "1", "hi"]).await?;
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(missing.stderr.contains("--token") && missing.stderr.contains("--user"), "{missing:?}");

    let mut cmd = chatctl(&addr);
    cmd.env_remove("JWT_SECRET");
    let no_secret = run(cmd, &["push", "--user", "ops", "--all", "--event", "x"]).await?;
    assert_eq!(no_secret.code, Some(1), "{no_secret:?}");
    assert!(no_secret.stderr.contains("JWT_SECRET"), "{no_secret:?}");
    Ok(())
}

#[tokio::test]
async fn connect_joins_sends_reads_history_and_shows_other_users_messages() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    let elsewhere = alice.create_group(&[]).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;

    // The ws:// spelling of the URL, with the endpoint path, works too.
    let ws_url = format!("ws://{}/ws", cluster.gateways[1]);
    let mut bob = Interactive::start(chatctl(&cluster.gateways[1]), &["--user", "bob", "--url", &ws_url]).await?;
    bob.expect("connected as bob").await?;

    bob.say(&format!("/join {room}")).await?;
    bob.expect(&format!("ack r1 joined {room}")).await?;

    bob.say(&format!("/send {room} hello from bob")).await?;
    bob.expect(&format!("[room {room} #1] bob: hello from bob")).await?;
    let got = alice.event("message").await?;
    assert_eq!(got["message"]["text"], "hello from bob");
    assert_eq!(got["message"]["sender_id"], "bob");

    alice.ack(json!({"type": "send", "room": room, "text": "hi bob"})).await?;
    assert_eq!(alice.event("message").await?["message"]["text"], "hi bob", "her own, as every joined connection");
    bob.expect(&format!("[room {room} #2] alice: hi bob")).await?;

    // After /join, a plain line goes to the current room.
    bob.say("just typing away").await?;
    bob.expect(&format!("[room {room} #3] bob: just typing away")).await?;
    assert_eq!(alice.event("message").await?["message"]["text"], "just typing away");

    bob.say("/typing").await?;
    let typing = alice.event("typing").await?;
    assert_eq!((typing["user_id"].as_str(), typing["active"].as_bool()), (Some("bob"), Some(true)), "{typing}");

    bob.say(&format!("/history {room}")).await?;
    bob.expect(&format!("history of {room}: 3 message(s)")).await?;
    bob.expect(&format!("  [room {room} #1] bob: hello from bob")).await?;
    bob.expect(&format!("  [room {room} #2] alice: hi bob")).await?;
    bob.expect(&format!("  [room {room} #3] bob: just typing away")).await?;

    bob.say(&format!("/send {elsewhere} knock knock")).await?;
    let error = bob.expect("forbidden").await?;
    assert!(error.starts_with("error r") && error.contains("forbidden: "), "{error}");

    bob.say("/quit").await?;
    let done = bob.finish().await?;
    assert_eq!(done.code, Some(0), "{done:?}");
    Ok(())
}

#[tokio::test]
async fn search_lists_hits_one_per_line_only_from_the_users_rooms_and_says_how_to_page_on() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut carol = cluster.client(0, "carol").await?;
    let room = alice.create_group(&["bob"]).await?;
    let private = carol.create_group(&[]).await?;
    carol.ack(json!({"type": "send", "room": private, "text": "the launch is secret"})).await?;
    // One more match than a page (20), so the reply has more.
    alice.ack(json!({"type": "send", "room": room, "text": "launch on friday"})).await?;
    for step in 1..=20 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("launch step {step}")})).await?;
    }

    let mut bob = Interactive::start(chatctl(&cluster.gateways[1]), &["--user", "bob"]).await?;
    bob.expect("connected as bob").await?;
    bob.say("/search LAUNCH").await?;
    bob.expect(r#"ack r1 search "LAUNCH": 20 result(s)"#).await?;
    // The snippet is the server's choice of words around the match: only its start is certain.
    let newest = bob.expect("  [room").await?;
    assert!(newest.starts_with(&format!("  [room {room} #21] alice: launch")), "{newest}");
    let more = bob.expect("more…").await?;
    let (_, next_page) = more.split_once("next page: ").with_context(|| format!("no command in {more:?}"))?;
    let next_page = next_page.strip_suffix(')').with_context(|| format!("unexpected {more:?}"))?;
    assert!(!bob.seen.iter().any(|l| l.contains("secret")), "carol's room is not bob's: {:#?}", bob.seen);

    // The command it prints is the next page: the one match left, and no more.
    bob.say(next_page).await?;
    let last = bob.expect("ack r2").await?;
    assert!(last.contains("launch on friday") && last.contains(r#""has_more":false"#), "{last}");

    bob.say(&format!(r#"/search #{room} "on friday""#)).await?;
    bob.expect(&format!(r#"ack r3 search "\"on friday\"" in {room}: 1 result(s)"#)).await?;
    let hit = bob.expect(&format!("  [room {room} #1] alice: ")).await?;
    assert!(hit.contains("on friday"), "{hit}");
    bob.say(&format!("/search #{private} launch")).await?;
    let refused = bob.expect("error r4").await?;
    assert!(refused.contains("forbidden: "), "{refused}");
    bob.say("/search").await?;

    let done = bob.finish().await?;
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(done.stderr.contains("usage: /search [#room] <query...>"), "{done:?}");
    Ok(())
}

#[tokio::test]
async fn thread_lists_the_root_then_its_replies_and_receipts_list_each_members_seqs() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob", "carol"]).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;
    let root = alice.ack(json!({"type": "send", "room": room, "text": "lunch?"})).await?["message"]["id"].clone();
    let root = root.as_str().context("a message id")?.to_owned();
    bob.ack(json!({"type": "send", "room": room, "text": "yes", "reply_to": root})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "not in the thread"})).await?;
    bob.ack(json!({"type": "send", "room": room, "text": "noon", "reply_to": root})).await?;
    // Bob's device has all four and he read two; alice read everything.
    bob.ack(json!({"type": "received", "room": room, "seq": 4})).await?;
    bob.ack(json!({"type": "read", "room": room, "seq": 2})).await?;
    alice.ack(json!({"type": "read", "room": room, "seq": 4})).await?;
    // `received` is stored within about a second; its `delivered` event says it is.
    loop {
        let delivered = alice.event("delivered").await?;
        if delivered["user_id"] == "bob" && delivered["seq"] == 4 {
            break;
        }
    }

    let mut carol = Interactive::start(chatctl(&cluster.gateways[1]), &["--user", "carol"]).await?;
    carol.expect("connected as carol").await?;
    carol.say(&format!("/thread {room} 1")).await?;
    carol.expect(&format!("ack r1 thread of {room} #1: 2 replies")).await?;
    let lines = [
        format!("  [room {room} #1] alice: lunch? [2 replies]"),
        format!("    [room {room} #2] bob: yes (reply to {root})"),
        format!("    [room {room} #4] bob: noon (reply to {root})"),
    ];
    for line in &lines {
        assert_eq!(&carol.expect("[room").await?, line, "{:#?}", carol.seen);
    }

    carol.say(&format!("/receipts {room}")).await?;
    carol.expect(&format!("ack r2 receipts of {room}: 3 member(s)")).await?;
    for line in ["  alice: delivered #4, read #4", "  bob: delivered #4, read #2", "  carol: delivered #0, read #0"] {
        assert_eq!(carol.expect(": delivered #").await?, line, "{:#?}", carol.seen);
    }

    carol.say(&format!("/thread {room} 99")).await?;
    let missing = carol.expect("error r3").await?;
    assert!(missing.contains("not_found: "), "{missing}");
    carol.say(&format!("/thread {room}")).await?;
    let done = carol.finish().await?;
    assert_eq!(done.code, Some(0), "{done:?}");
    assert!(done.stderr.contains("usage: /thread <room> <root_seq>"), "{done:?}");
    Ok(())
}

#[tokio::test]
async fn connect_with_a_piped_script_answers_everything_before_closing_and_json_prints_frames() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;

    let mut bob = Interactive::start(chatctl(&cluster.gateways[0]), &["--user", "bob", "--json"]).await?;
    // The whole script at once, then end of input: every command must still be answered.
    for line in [format!("/join {room}"), format!("/send {room} scripted"), "/rooms".into(), "/raw {oops".into()] {
        bob.say(&line).await?;
    }
    let done = bob.finish().await?;
    assert_eq!(done.code, Some(0), "{done:?}");
    let frames: Vec<Value> = done
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("--json prints one JSON frame per line: {done:?}"))?;
    assert_eq!(frames.first().map(|f| f["type"].clone()), Some(json!("welcome")), "{frames:#?}");
    let reply = |id: &str| frames.iter().find(|f| f["id"] == id).cloned().unwrap_or_default();
    assert_eq!(reply("r1")["type"], "ack", "{frames:#?}");
    assert_eq!(reply("r2")["message"]["text"], "scripted", "{frames:#?}");
    assert_eq!(reply("r3")["rooms"][0]["id"], json!(room), "{frames:#?}");
    assert_eq!(alice.event("message").await?["message"]["text"], "scripted");
    Ok(())
}

#[tokio::test]
async fn push_and_notify_reach_a_connected_client_on_another_gateway() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let gw = cluster.gateways[0].as_str();
    let mut bob = cluster.client(1, "bob").await?;
    let args =
        ["push", "--user", "ops", "--role", "admin", "--user-id", "bob", "--event", "deploy", "--data", r#"{"v":2}"#];
    let pushed = run_ok(chatctl(gw), &args).await?;
    assert!(pushed.stdout.contains("accepted"), "{pushed:?}");
    let push = bob.event("push").await?;
    assert_eq!((push["event"].clone(), push["data"].clone()), (json!("deploy"), json!({"v": 2})), "{push}");

    run_ok(chatctl(gw), &["push", "--user", "ops", "--role", "admin", "--all", "--event", "hello"]).await?;
    let push = bob.event("push").await?;
    assert_eq!((push["event"].clone(), push["data"].clone()), (json!("hello"), Value::Null), "{push}");

    let notified = run_ok(
        chatctl(gw),
        &[
            "notify",
            "--user",
            "ops",
            "--role",
            "admin",
            "--user-id",
            "bob",
            "--title",
            "Maintenance",
            "--body",
            "at noon",
            "--data",
            r#"{"k":1}"#,
        ],
    )
    .await?;
    let created: Value = serde_json::from_str(&notified.stdout).with_context(|| format!("{notified:?}"))?;
    let stored = &created["notifications"][0];
    assert_eq!(stored["title"], "Maintenance", "{created}");
    let live = bob.event("notification").await?;
    assert_eq!(live["notification"]["id"], stored["id"], "{live}");
    assert_eq!(live["notification"]["body"], "at noon");
    assert_eq!(live["notification"]["data"], json!({"k": 1}));
    Ok(())
}

#[tokio::test]
async fn disconnect_closes_every_socket_of_the_user_with_1008() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut harness_bob = cluster.client(1, "bob").await?;
    let mut cli_bob = Interactive::start(chatctl(&cluster.gateways[0]), &["--user", "bob"]).await?;
    cli_bob.expect("connected as bob").await?;

    let done =
        run_ok(chatctl(&cluster.gateways[0]), &["disconnect", "--user", "ops", "--role", "admin", "bob"]).await?;
    assert!(done.stdout.contains("disconnected bob"), "{done:?}");
    assert_eq!(harness_bob.closed().await?, Some(1008));

    // chatctl's own session was closed abnormally: it says so and exits non-zero. It
    // hears the close through gateway 0, maybe after the harness's client on gateway 1.
    let session = cli_bob.exit().await?;
    assert_eq!(session.code, Some(1), "{session:?}");
    assert!(session.stderr.contains("1008"), "{session:?}");
    Ok(())
}

#[tokio::test]
async fn admin_commands_without_the_admin_role_are_refused_with_403() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let gw = cluster.gateways[0].as_str();
    let mut bob = cluster.client(0, "bob").await?;

    let pushed = run(chatctl(gw), &["push", "--token", &token("bob"), "--user-id", "bob", "--event", "x"]).await?;
    assert_eq!(pushed.code, Some(2), "{pushed:?}");
    assert!(pushed.stderr.contains("403") && pushed.stderr.contains("forbidden"), "{pushed:?}");

    let dropped = run(chatctl(gw), &["disconnect", "--user", "bob", "bob"]).await?;
    assert_eq!(dropped.code, Some(2), "{dropped:?}");
    assert!(dropped.stderr.contains("403"), "{dropped:?}");

    // Bob is still connected and got nothing.
    let pong = bob.request(json!({"type": "ping"})).await?;
    assert_eq!(pong["type"], "pong");
    assert_eq!(bob.take_buffered("push"), Vec::<Value>::new());
    Ok(())
}
