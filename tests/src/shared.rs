//! The machine's Postgres and Redis, which every test shares unless it starts private
//! ones (`servers`); overridable for a run elsewhere.

/// Base URL of the Postgres server tests use (no database name).
pub fn postgres_base() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// The Redis tests use.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}
