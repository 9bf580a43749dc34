//! Migrations that can roll back: `chat-message migrate` as a Job would run it, a service
//! on a role that only reads and writes rows, and a release that starts on a schema one
//! migration newer than its own.

use std::process::Output;
use std::time::Duration;

use anyhow::Result;
use chat_tests::{bin, postgres_base, redis_url, unique, Cluster, TestDb};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::process::Command;

/// This release's newest migration: the highest number in services/message/migrations.
fn latest() -> Result<i64> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../services/message/migrations");
    let mut latest = 0;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.split('_').next().and_then(|v| v.parse::<i64>().ok()) {
            latest = latest.max(version);
        }
    }
    anyhow::ensure!(latest > 0, "no migrations in {dir}");
    Ok(latest)
}

/// `chat-message` with `args` against `db_url` and the given environment; its output.
async fn chat_message(args: &[&str], db_url: &str, env: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new(bin("chat-message"));
    cmd.args(args)
        .env_clear()
        .env("DATABASE_URL", db_url)
        .env("REDIS_URL", redis_url())
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    Ok(tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `db`'s URL with `role` as the user.
fn as_role(db: &TestDb, role: &str) -> String {
    let host = postgres_base().rsplit_once('@').map(|(_, host)| host.to_owned()).unwrap_or_default();
    format!("postgres://{role}@{host}/{}", db.name)
}

/// A chat between two users through the cluster: a send is acknowledged and delivered.
async fn chat(cluster: &Cluster) -> Result<()> {
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(0, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "hello"})).await?;
    assert_eq!(bob.event("message").await?["message"]["text"], "hello");
    Ok(())
}

#[tokio::test]
async fn a_service_whose_role_only_reads_and_writes_rows_serves_after_migrate() -> Result<()> {
    let mut admin = PgConnection::connect(&format!("{}/postgres", postgres_base())).await?;
    let role = unique("chat_app");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE \"{role}\" LOGIN"))).execute(&mut admin).await?;

    let db = TestDb::new();
    let out = chat_message(&["migrate"], &db.url, &[("DB_APP_ROLE", &role)]).await?;
    assert!(out.status.success(), "migrate failed: {}", stderr(&out));
    let role_url = as_role(&db, &role);
    let cluster = Cluster::builder()
        .database(db)
        .env("DATABASE_URL", &role_url)
        .env("MIGRATE_ON_START", "false")
        .env("CREATE_DATABASE", "false")
        .start()
        .await?;
    chat(&cluster).await?;

    // The role cannot change the schema.
    let mut as_app = PgConnection::connect(&role_url).await?;
    for ddl in [
        "DROP TABLE messages",
        "ALTER TABLE rooms ADD COLUMN x int",
        "CREATE TABLE x (id int)",
        "DELETE FROM _sqlx_migrations",
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99, 'x', true, '\\x00', 0)",
    ] {
        let err = sqlx::query(ddl).execute(&mut as_app).await.expect_err(ddl);
        assert!(
            err.to_string().contains("must be owner") || err.to_string().contains("permission denied"),
            "{ddl}: {err}"
        );
    }
    drop(as_app);
    drop(cluster);
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE \"{role}\""))).execute(&mut admin).await?;
    Ok(())
}

#[tokio::test]
async fn a_service_that_may_not_migrate_waits_for_the_schema_and_says_why() -> Result<()> {
    let db = TestDb::new();
    let env = [("MIGRATE_ON_START", "false"), ("STARTUP_ATTEMPTS", "2"), ("STARTUP_RETRY_MS", "50")];
    let out = chat_message(&[], &db.url, &env).await?;
    assert!(!out.status.success());
    let expected =
        "gave up waiting for the schema after 2 attempts: migration 1 is not applied yet (run `chat-message migrate`)";
    assert!(stderr(&out).contains(expected), "{}", stderr(&out));
    Ok(())
}

#[tokio::test]
async fn this_release_starts_and_migrates_on_a_schema_one_migration_newer() -> Result<()> {
    let db = TestDb::new();
    let out = chat_message(&["migrate"], &db.url, &[]).await?;
    assert!(out.status.success(), "migrate failed: {}", stderr(&out));
    // The next release's migration, expand-only as docs/deploy.md requires, recorded as
    // sqlx records it.
    let mut conn = db.connect().await?;
    sqlx::query("ALTER TABLE messages ADD COLUMN next_release_column text").execute(&mut conn).await?;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'the next release', true, '\\x00', 0)",
    )
    .bind(latest()? + 1)
    .execute(&mut conn)
    .await?;

    // `kubectl rollout undo`: this release's Job runs again, then its service starts.
    let out = chat_message(&["migrate"], &db.url, &[]).await?;
    assert!(out.status.success(), "migrate on a newer schema failed: {}", stderr(&out));
    let cluster = Cluster::builder().database(db).start().await?;
    chat(&cluster).await?;
    Ok(())
}
