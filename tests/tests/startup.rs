//! Start-up failures end with a clear message and a non-zero exit, never a hang.

use std::process::Output;
use std::time::Duration;

use anyhow::Result;
use chat_tests::{bin, free_port, redis_url, TestDb, SECRET};
use tokio::process::Command;

/// A binary with none of this process's environment, so only what a test sets counts.
fn command(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    cmd.env_clear().env("RUST_LOG", "warn").kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> Result<Output> {
    Ok(tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_gateway_without_jwt_secret_refuses_to_start() -> Result<()> {
    let out = run(command("chat-gateway")).await?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("JWT_SECRET"), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn an_empty_jwt_secret_is_rejected_by_validation() -> Result<()> {
    let mut cmd = command("chat-gateway");
    cmd.env("JWT_SECRET", "");
    let out = run(cmd).await?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("JWT_SECRET"), "{}", stderr(&out));
    // Operators and runbooks match this line: the setting and the reason on one line.
    let line = "Error: invalid configuration: JWT_SECRET must be set (and not empty) for HS256 tokens";
    assert!(stderr(&out).lines().any(|l| l == line), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn the_message_service_gives_up_on_an_unreachable_postgres() -> Result<()> {
    let mut cmd = command("chat-message");
    cmd.env("DATABASE_URL", format!("postgres://postgres@127.0.0.1:{}/chat", free_port()))
        .env("STARTUP_ATTEMPTS", "2")
        .env("STARTUP_RETRY_MS", "50")
        .env("MESSAGE_ADDR", format!("127.0.0.1:{}", free_port()));
    let out = run(cmd).await?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Postgres still unreachable after 2 attempts"), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn the_message_service_gives_up_on_an_unreachable_redis() -> Result<()> {
    let db = TestDb::new();
    let mut cmd = command("chat-message");
    cmd.env("DATABASE_URL", &db.url)
        .env("REDIS_URL", format!("redis://127.0.0.1:{}", free_port()))
        .env("STARTUP_ATTEMPTS", "2")
        .env("STARTUP_RETRY_MS", "50")
        .env("MESSAGE_ADDR", format!("127.0.0.1:{}", free_port()));
    let out = run(cmd).await?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Redis still unreachable after 2 attempts"), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn a_gateway_gives_up_on_an_unreachable_message_service() -> Result<()> {
    let mut cmd = command("chat-gateway");
    cmd.env("JWT_SECRET", SECRET)
        .env("ALLOW_INSECURE_PRODUCTION", "true")
        .env("MESSAGE_SERVICE_URL", format!("http://127.0.0.1:{}", free_port()))
        .env("REDIS_URL", redis_url())
        .env("STARTUP_ATTEMPTS", "2")
        .env("STARTUP_RETRY_MS", "50")
        .env("GATEWAY_ADDR", format!("127.0.0.1:{}", free_port()));
    let out = run(cmd).await?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("still unreachable after 2 attempts"), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn dev_tokens_are_refused_in_the_production_environment() -> Result<()> {
    // Production is the default: turning dev tokens on without saying otherwise is refused.
    for env in [None, Some("production")] {
        let mut cmd = command("chat-gateway");
        cmd.env("JWT_SECRET", SECRET).env("DEV_TOKENS", "true");
        if let Some(env) = env {
            cmd.env("ENVIRONMENT", env);
        }
        let out = run(cmd).await?;
        assert!(!out.status.success());
        assert!(stderr(&out).contains("DEV_TOKENS is refused with ENVIRONMENT=production"), "{}", stderr(&out));
    }
    Ok(())
}

#[tokio::test]
async fn production_refuses_a_published_or_short_jwt_secret() -> Result<()> {
    for secret in ["dev-secret-change-me", "dev-only-not-a-secret", "only-31-bytes-long-xxxxxxxxxxxx"] {
        let mut cmd = command("chat-gateway");
        cmd.env("JWT_SECRET", secret).env("GATEWAY_ADDR", format!("127.0.0.1:{}", free_port()));
        let out = run(cmd).await?;
        assert!(!out.status.success(), "{secret}");
        assert!(stderr(&out).contains("refused with ENVIRONMENT=production"), "{}", stderr(&out));
    }
    Ok(())
}

#[tokio::test]
async fn production_refuses_to_start_open_to_every_origin_and_token_issuer() -> Result<()> {
    let mut cmd = command("chat-gateway");
    cmd.env("JWT_SECRET", SECRET).env("ALLOWED_ORIGINS", "https://chat.example.com");
    let out = run(cmd).await?;
    assert!(!out.status.success());
    let line = "Error: invalid configuration: JWT_ISSUER, JWT_AUDIENCE not set; refused with ENVIRONMENT=production \
                (the default): set them, or ALLOW_INSECURE_PRODUCTION=true to run without, or \
                ENVIRONMENT=development for a local cluster";
    assert!(stderr(&out).lines().any(|l| l == line), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn commit_workers_beyond_the_pool_are_refused() -> Result<()> {
    for workers in ["0", "6"] {
        let mut cmd = command("chat-message");
        cmd.env("DB_MAX_CONNECTIONS", "5").env("COMMIT_WORKERS", workers);
        let out = run(cmd).await?;
        assert!(!out.status.success());
        assert!(stderr(&out).contains("COMMIT_WORKERS must be between 1 and DB_MAX_CONNECTIONS"), "{}", stderr(&out));
    }
    Ok(())
}
