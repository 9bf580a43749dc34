//! A fresh, uniquely named Postgres database per cluster, dropped with it.

use anyhow::Result;
use sqlx::{Connection, PgConnection};

use crate::shared::postgres_base;
use crate::unique::unique;

/// A uniquely named database, dropped when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    base: String,
}

impl TestDb {
    /// Names a fresh database; the message service creates and migrates it.
    pub fn new() -> Self {
        Self::on(&postgres_base())
    }

    /// A fresh database on the server at `base` (`postgres://user@host:port`).
    pub fn on(base: &str) -> Self {
        let name = unique("chat_test");
        Self { url: format!("{base}/{name}"), base: base.to_owned(), name }
    }

    /// A connection to the test database.
    pub async fn connect(&self) -> Result<PgConnection> {
        Ok(PgConnection::connect(&self.url).await?)
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = format!("{}/postgres", self.base);
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // Drop runs outside any async context we can rely on: use a private runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin).await?;
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
    }
}
