//! `chatctl`: a command-line companion for the chat cluster.
//!
//! - `chatctl token --sub alice` mints a development token signed with `JWT_SECRET`;
//! - `chatctl connect --user alice` is an interactive protocol session (stdin/stdout);
//! - `chatctl send --user alice --room 12 hello` sends one message;
//! - `chatctl push|notify|disconnect --user ops --role admin …` call the admin API;
//! - `chatctl certs --dir target/dev-tls` makes the local cluster's mTLS certificates.
//!
//! Exit status: 0 done, 2 the server refused (error reply or HTTP error), 1 anything else
//! (connection problems first of all). See `services/chatctl/README.md`.

mod admin;
mod certs;
mod error;
mod render;
mod send;
mod session;
mod target;
mod token;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::error::{Refused, EXIT_FAILED, EXIT_REFUSED};
use crate::target::ConnOpts;
use crate::token::MintOpts;

#[derive(Parser)]
#[command(name = "chatctl", version, about = "Chat cluster command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mint an HS256 token for development and tests.
    Token {
        /// User id (`sub`).
        #[arg(long, visible_alias = "user")]
        sub: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl: i64,
        #[command(flatten)]
        mint: MintOpts,
    },
    /// Interactive session: commands on stdin (`/help`), events and replies on stdout.
    #[command(after_help = session::HELP)]
    Connect {
        #[command(flatten)]
        conn: ConnOpts,
        /// Print every frame from the server verbatim, one per line, instead of readably.
        #[arg(long)]
        json: bool,
    },
    /// Send one message and print the stored copy (JSON unless --readable).
    Send {
        #[command(flatten)]
        conn: ConnOpts,
        /// Room id.
        #[arg(long, env = "CHAT_ROOM")]
        room: String,
        /// Idempotency key; retries (and reruns) with the same one store the message once.
        #[arg(long)]
        client_msg_id: Option<String>,
        /// Retries after `unavailable`, `rate_limited`, a timeout or a dropped connection.
        #[arg(long, default_value_t = 3)]
        retries: u32,
        /// Print `[room 12 #3] alice: hello` instead of the message JSON.
        #[arg(long)]
        readable: bool,
        /// The text; several words are joined with spaces.
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// (admin) Push an event to users' live connections: POST /v1/push.
    Push {
        #[command(flatten)]
        conn: ConnOpts,
        /// A recipient; repeat for several.
        #[arg(long = "user-id", value_name = "USER_ID", required_unless_present = "all", conflicts_with = "all")]
        user_ids: Vec<String>,
        /// Every connection in the cluster.
        #[arg(long)]
        all: bool,
        /// Event name (1-64 characters).
        #[arg(long)]
        event: String,
        /// Payload, any JSON value (default null).
        #[arg(long)]
        data: Option<String>,
    },
    /// (admin) Store a notification per user and deliver it live: POST /v1/notifications.
    Notify {
        #[command(flatten)]
        conn: ConnOpts,
        /// A recipient; repeat for several.
        #[arg(long = "user-id", value_name = "USER_ID", required = true)]
        user_ids: Vec<String>,
        /// Title (1-200 characters).
        #[arg(long)]
        title: String,
        /// Body text.
        #[arg(long)]
        body: Option<String>,
        /// Extra data, any JSON value.
        #[arg(long)]
        data: Option<String>,
    },
    /// (admin) Close every socket of a user, on every gateway, with 1008:
    /// DELETE /v1/users/{id}/connections.
    Disconnect {
        #[command(flatten)]
        conn: ConnOpts,
        /// The user whose connections to close.
        user_id: String,
    },
    /// Write a development CA and the certificates for mTLS between the gateways and the
    /// message service (ca, message, gateway: .crt and .key, PEM) into DIR.
    Certs {
        /// Where to write them; created if missing.
        #[arg(long)]
        dir: PathBuf,
        /// Validity of every certificate, in days (at most 3650).
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Make new ones even if DIR already holds a CA (by default that DIR is left as is).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let token_on_command_line = token_on_command_line(&matches);

    // One thread is plenty for one connection, and keeps a CLI's footprint small.
    let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli.command, token_on_command_line)),
        Err(e) => Err(anyhow::Error::new(e).context("starting the async runtime")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Refused>() {
            Some(refused) => {
                eprintln!("error {refused}");
                ExitCode::from(EXIT_REFUSED)
            }
            None => {
                eprintln!("chatctl: {e:#}");
                ExitCode::from(EXIT_FAILED)
            }
        },
    }
}

/// Whether `--token` was typed rather than taken from CHAT_TOKEN. `value_source` may only
/// be asked of arguments the subcommand defines (clap panics otherwise in debug builds),
/// and `token` and `certs` define none called `token`.
fn token_on_command_line(matches: &ArgMatches) -> bool {
    matches.subcommand().is_some_and(|(_, m)| {
        matches!(m.try_contains_id("token"), Ok(true)) && m.value_source("token") == Some(ValueSource::CommandLine)
    })
}

/// Runs one subcommand.
async fn run(command: Cmd, token_on_command_line: bool) -> anyhow::Result<()> {
    match command {
        Cmd::Token { sub, ttl, mint } => render::out(token::mint(&sub, ttl, &mint)?),
        Cmd::Connect { conn, json } => {
            let (target, creds) = conn.resolve(token_on_command_line)?;
            session::run(&target, &creds, session::Options { json, timeout: conn.timeout() }).await
        }
        Cmd::Send { conn, room, client_msg_id, retries, readable, text } => {
            let (target, creds) = conn.resolve(token_on_command_line)?;
            let request =
                send::Request { room, text: text.join(" "), client_msg_id, retries, timeout: conn.timeout(), readable };
            send::run(&target, &creds, &request).await
        }
        Cmd::Push { conn, user_ids, all, event, data } => {
            let data = admin::parse_data(data.as_deref())?;
            let (target, creds) = conn.resolve(token_on_command_line)?;
            let audience = if all { admin::Audience::Everyone } else { admin::Audience::Users(user_ids) };
            admin::push(&target, &creds, &audience, &event, data, conn.timeout()).await
        }
        Cmd::Notify { conn, user_ids, title, body, data } => {
            let data = admin::parse_data(data.as_deref())?;
            let (target, creds) = conn.resolve(token_on_command_line)?;
            admin::notify(&target, &creds, &user_ids, &title, body.as_deref(), data, conn.timeout()).await
        }
        Cmd::Disconnect { conn, user_id } => {
            let (target, creds) = conn.resolve(token_on_command_line)?;
            admin::disconnect(&target, &creds, &user_id, conn.timeout()).await
        }
        Cmd::Certs { dir, days, force } => render::out(certs::run(&certs::Options { dir, days, force })?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_typed(args: &[&str]) -> anyhow::Result<bool> {
        let matches = Cli::command().try_get_matches_from(args)?;
        Ok(token_on_command_line(&matches))
    }

    #[test]
    fn only_a_typed_token_counts_and_commands_without_one_are_asked_nothing() -> anyhow::Result<()> {
        assert!(token_typed(&["chatctl", "connect", "--token", "t"])?);
        assert!(!token_typed(&["chatctl", "connect", "--user", "alice"])?);
        assert!(!token_typed(&["chatctl", "token", "--sub", "alice"])?);
        assert!(!token_typed(&["chatctl", "certs", "--dir", "target/dev-tls"])?);
        Ok(())
    }
}
