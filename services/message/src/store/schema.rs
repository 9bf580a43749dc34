//! The schema: migrating it (the `migrate` command, or at start), waiting for it, and
//! granting the service's role what it needs and nothing more.
//!
//! Migrations are expand/contract (docs/deploy.md): each one leaves the schema usable by
//! the release before it. So a service accepts a schema newer than its own migrations,
//! which `kubectl rollout undo` and an old pod restarting mid-rollout both meet.

use std::collections::HashMap;

use chat_common::startup::Retry;
use sqlx::migrate::Migrator;
use sqlx::PgPool;

/// The migrations of this release, embedded at build time. Ones a newer release applied
/// are left alone, not an error.
fn migrations() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// What a service does with the schema when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// Runs this release's migrations (a local cluster, tests).
    Migrate,
    /// Waits, within the start-up retries, for a `migrate` run to have applied them
    /// (Kubernetes: a Job with a DDL role migrates; the service's role cannot).
    Await,
}

/// Why the schema is not one this release can use.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot read the applied migrations: {0}")]
    Read(#[from] sqlx::Error),
    #[error("migration {version} is not applied yet (run `chat-message migrate`)")]
    Behind { version: i64 },
    #[error(
        "migration {version} ran with other contents than this release's: the migrations were edited after release"
    )]
    Changed { version: i64 },
    #[error("gave up waiting for the schema after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: Box<SchemaError> },
}

/// The latest migration of this release.
pub fn latest_version() -> i64 {
    migrations().iter().map(|m| m.version).max().unwrap_or_default()
}

/// Applies this release's migrations that are not applied yet (under an advisory lock,
/// so replicas starting together take turns).
pub async fn migrate(pool: &PgPool) -> Result<(), SchemaError> {
    migrations().run(pool).await?;
    Ok(())
}

/// Ok once every migration of this release is applied, newer ones or not.
pub async fn check(pool: &PgPool) -> Result<(), SchemaError> {
    const UNDEFINED_TABLE: &str = "42P01";
    let applied: Vec<(i64, Vec<u8>)> =
        match sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success").fetch_all(pool).await {
            Ok(applied) => applied,
            // Nothing has ever migrated this database.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
    let applied: HashMap<i64, Vec<u8>> = applied.into_iter().collect();
    for m in migrations().iter().filter(|m| m.migration_type.is_up_migration()) {
        match applied.get(&m.version) {
            None => return Err(SchemaError::Behind { version: m.version }),
            Some(sum) if sum.as_slice() != &*m.checksum => return Err(SchemaError::Changed { version: m.version }),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Waits for [`check`] to pass, within `retry`: the migration Job may still be running.
pub async fn await_current(pool: &PgPool, retry: Retry) -> Result<(), SchemaError> {
    let attempts = retry.attempts.max(1);
    let mut attempt = 1;
    loop {
        match check(pool).await {
            Ok(()) => return Ok(()),
            // Edited migrations stay edited: waiting cannot help.
            Err(err @ SchemaError::Changed { .. }) => return Err(err),
            Err(last) if attempt >= attempts => return Err(SchemaError::GaveUp { attempts, last: Box::new(last) }),
            Err(err) => tracing::warn!(%err, attempt, attempts, "waiting for the schema"),
        }
        tokio::time::sleep(retry.delay).await;
        attempt += 1;
    }
}

/// Grants `role` reading and writing rows and nothing else: no DDL, so a compromised or
/// buggy service cannot change the schema. Repeated on every run, for the tables that
/// run created.
pub async fn grant_dml(pool: &PgPool, role: &str) -> Result<(), sqlx::Error> {
    let role = quote_ident(role);
    for grant in [
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}"),
        format!("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}"),
        // The migration history is the Job's: the service only reads it (to wait for
        // its schema); a write would change what the next `migrate` does.
        format!("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON _sqlx_migrations FROM {role}"),
    ] {
        // The role name is quoted; nothing else in the statement is configuration.
        sqlx::query(sqlx::AssertSqlSafe(grant)).execute(pool).await?;
    }
    Ok(())
}

/// A Postgres identifier, quoted: role names are configuration, not SQL.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_cannot_break_out() {
        assert_eq!(quote_ident("chat_app"), "\"chat_app\"");
        assert_eq!(quote_ident("x\"; DROP TABLE rooms; --"), "\"x\"\"; DROP TABLE rooms; --\"");
    }

    #[test]
    fn the_latest_version_is_the_last_migration_file() {
        assert_eq!(latest_version(), 12);
    }
}
