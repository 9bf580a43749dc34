//! Striped async locks: work on one key (a user, a Redis channel) is serialised, while
//! different keys mostly proceed at once, without a lock per key to clean up.

use std::hash::{Hash, Hasher};

use tokio::sync::{Mutex, MutexGuard};

/// A fixed set of async mutexes; a key always maps to the same one.
pub struct Stripes {
    locks: Box<[Mutex<()>]>,
}

impl Stripes {
    /// `n` stripes (at least one).
    pub fn new(n: usize) -> Self {
        Self { locks: (0..n.max(1)).map(|_| Mutex::new(())).collect() }
    }

    /// Waits for `key`'s stripe; the guard releases it.
    pub async fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let index = (hasher.finish() % self.locks.len() as u64) as usize;
        self.locks[index].lock().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_waits_for_itself_but_not_for_a_key_on_another_stripe() {
        let stripes = Stripes::new(64);
        let held = stripes.lock("alice").await;
        let same = tokio::time::timeout(std::time::Duration::from_millis(50), stripes.lock("alice")).await;
        assert!(same.is_err(), "the same key must wait");
        // Some other key lands on another stripe and goes ahead.
        let mut others = 0;
        for i in 0..8 {
            let key = format!("user{i}");
            if tokio::time::timeout(std::time::Duration::from_millis(50), stripes.lock(&key)).await.is_ok() {
                others += 1;
            }
        }
        assert!(others > 0);
        drop(held);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), stripes.lock("alice")).await.is_ok());
    }
}
