//! Cluster-wide presence in Redis: who has at least one open connection on any gateway.
//!
//! `<prefix>:presence:{user}` is a hash of gateway id → that gateway's connection count
//! for the user; online means the hash is not empty. Counting and the per-user
//! connection cap are one Lua script each, so two gateways never both think they saw
//! the first connection. Each gateway also keeps the set of users it counted and a
//! heartbeat in `<prefix>:gateways`; a gateway silent for the stale period
//! (`PRESENCE_STALE_MS`, default 30 s) is swept by the others, which look every third of
//! that period, so a crashed gateway's users go offline within 4/3 of it (40 s).
//!
//! Counting in Redis can go wrong: a decrement that fails leaves a count too high (and
//! after enough of them the user is refused everywhere), and a connection admitted
//! while Redis was down, or counts lost with a Redis restart, leave it too low. So each
//! gateway also keeps its own counts in memory and rewrites its field of every user's
//! hash from them each `PRESENCE_RECOUNT_MS`: any such error heals within one period.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_common::events::EventBus;
use chat_proto::v1::envelope::Event;
use fred::prelude::{Client, Expiration, HashesInterface, KeysInterface, LuaInterface};
use fred::prelude::{SetOptions, SetsInterface, SortedSetsInterface};
use futures_util::StreamExt;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::Config;
use crate::stripes::Stripes;

/// Lock stripes serialising presence updates per user within one gateway.
const STRIPES: usize = 64;

/// Deadline of presence's Redis commands (and of the gateway's publishes, which share
/// the connection): a Redis outage must not stall connects and disconnects for long.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

// Each script touches one key (the user's hash), so it runs on a Redis Cluster too.
const CONNECT: &str = r#"
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
if tonumber(ARGV[2]) > 0 and total >= tonumber(ARGV[2]) then return -1 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return total + 1
"#;

const DISCONNECT: &str = r#"
local mine = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if mine <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
return {mine, total}
"#;

// Sets this gateway's count for the user (0 removes its field); returns the user's
// total before and after, so a correction that changes online/offline is announced.
const RECOUNT: &str = r#"
local before = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do before = before + tonumber(v) end
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local after = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do after = after + tonumber(v) end
return {before, after}
"#;

/// Users whose presence one pipelined Redis round trip looks up.
const ONLINE_CHUNK: usize = 500;

const SWEEP_USER: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return -1 end
return redis.call('HLEN', KEYS[1])
"#;

/// Outcome of registering a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admitted; `first` when it is the user's only connection in the cluster.
    Admitted { first: bool },
    /// The user already holds the maximum number of connections.
    OverCap,
}

/// Handle to presence state; cheap to clone.
#[derive(Clone)]
pub struct Presence {
    client: Client,
    /// Scans every node of a Redis Cluster, not just one.
    cluster: bool,
    /// Serialises this gateway's count and user-set updates per user (striped), so the
    /// set of users it counted never disagrees with its counts.
    stripes: Arc<Stripes>,
    /// Where presence changes are announced.
    events: EventBus,
    prefix: String,
    gateway_id: String,
    backend: Backend,
    cap: u32,
    /// This gateway's connections per user, as admitted and released: the truth its
    /// Redis counts are rewritten from.
    local: Arc<Mutex<HashMap<String, u32>>>,
    /// How often the Redis counts are rewritten from `local`.
    recount_every: Duration,
    /// Most online ids one lookup returns.
    max_online: usize,
    /// Most rooms one presence change is announced in.
    max_rooms: u32,
    /// A gateway silent for this long is dead; heartbeats go out at a sixth of it and
    /// sweeps run at a third.
    stale_after: Duration,
}

impl Presence {
    /// Presence over a connected Redis `client`, announcing changes on `events`.
    pub fn new(config: &Config, client: Client, backend: Backend, events: EventBus) -> Self {
        let gateway_id = format!("{:016x}", rand::rng().random::<u64>());
        Self {
            client,
            cluster: config.backend.redis.cluster,
            stripes: Arc::new(Stripes::new(STRIPES)),
            events,
            prefix: config.backend.redis_channel_prefix.clone(),
            gateway_id,
            backend,
            cap: config.max_connections_per_user,
            local: Arc::default(),
            recount_every: config.presence_recount(),
            max_online: config.presence_max_online,
            max_rooms: config.presence_max_rooms,
            stale_after: config.presence_stale(),
        }
    }

    fn user_key(&self, user: &str) -> String {
        chat_common::channels::presence_key(&self.prefix, user)
    }

    fn users_key(&self, gateway: &str) -> String {
        format!("{}:gw:{{{gateway}}}:users", self.prefix)
    }

    fn gateways_key(&self) -> String {
        format!("{}:gateways", self.prefix)
    }

    /// Counts a new connection of `user`, unless that exceeds the cap. When Redis is
    /// unreachable the connection is admitted (presence is best effort; chat is not).
    pub async fn admit(&self, user: &str) -> Admission {
        let _serial = self.stripes.lock(user).await;
        let args = vec![self.gateway_id.clone(), self.cap.to_string()];
        let counted = self.client.eval::<i64, _, _, _>(CONNECT, vec![self.user_key(user)], args).await;
        if counted != Ok(-1) {
            self.count_local(user, 1);
        }
        match counted {
            Ok(-1) => Admission::OverCap,
            Ok(total) => {
                // Remembered so that, should this gateway die, another one can sweep the count.
                let added: Result<i64, _> = self.client.sadd(self.users_key(&self.gateway_id), user).await;
                if let Err(err) = added {
                    tracing::warn!(%err, "presence: user not recorded for a sweep");
                }
                Admission::Admitted { first: total == 1 }
            }
            Err(err) => {
                tracing::warn!(%err, "presence unavailable; admitting without counting");
                Admission::Admitted { first: false }
            }
        }
    }

    /// Uncounts a connection; true when it was the user's last one in the cluster.
    pub async fn release(&self, user: &str) -> bool {
        let _serial = self.stripes.lock(user).await;
        self.count_local(user, -1);
        let args = vec![self.gateway_id.clone()];
        match self.client.eval::<(i64, i64), _, _, _>(DISCONNECT, vec![self.user_key(user)], args).await {
            Ok((mine, total)) => {
                if mine <= 0 {
                    let _: Result<i64, _> = self.client.srem(self.users_key(&self.gateway_id), user).await;
                }
                total <= 0
            }
            Err(err) => {
                tracing::warn!(%err, "presence unavailable; connection not uncounted (swept later)");
                false
            }
        }
    }

    /// Moves this gateway's own count of `user`'s connections (the recount's truth).
    fn count_local(&self, user: &str, delta: i32) {
        let mut local = self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = local.entry(user.to_owned()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            local.remove(user);
        }
    }

    /// Which of `users` have a connection anywhere: at most `PRESENCE_MAX_ONLINE` of them.
    pub async fn online(&self, users: &[String]) -> Vec<String> {
        self.online_listed(users).await.0
    }

    /// Which of `users` have a connection anywhere, at most `PRESENCE_MAX_ONLINE` of them,
    /// and whether more are online than listed. One pipelined round trip per chunk of
    /// users, and no more chunks once one more than the cap is found.
    pub async fn online_listed(&self, users: &[String]) -> (Vec<String>, bool) {
        let mut online = Vec::new();
        for chunk in users.chunks(ONLINE_CHUNK) {
            let pipeline = self.client.pipeline();
            for user in chunk {
                let _: Result<(), _> = pipeline.exists(self.user_key(user)).await;
            }
            match pipeline.all::<Vec<i64>>().await {
                Ok(flags) => online.extend(chunk.iter().zip(flags).filter(|(_, n)| *n > 0).map(|(u, _)| u.clone())),
                Err(err) => {
                    tracing::warn!(%err, "presence lookup failed");
                    break;
                }
            }
            if online.len() > self.max_online {
                break;
            }
        }
        let truncated = online.len() > self.max_online;
        online.truncate(self.max_online);
        (online, truncated)
    }

    /// Tells the members of every room of `user` that they came online or went offline.
    pub async fn announce(&self, user: &str, online: bool) {
        let rooms = match self.backend.user_rooms(user.to_owned(), self.max_rooms).await {
            Ok(rooms) => rooms,
            Err(err) => {
                tracing::warn!(%err.message, user, "cannot list rooms for a presence change");
                return;
            }
        };
        for room_id in rooms {
            let event = Event::Presence(chat_proto::v1::Presence {
                room_id: room_id.clone(),
                user_id: user.to_owned(),
                online,
            });
            if let Err(err) = self.events.room(&room_id, event).await {
                tracing::warn!(%err, "publish failed");
            }
        }
    }

    /// The user's open connections across the cluster.
    pub async fn connections(&self, user: &str) -> Result<i64, crate::error::CommandError> {
        let counts: Vec<i64> = self.client.hvals(self.user_key(user)).await.map_err(unavailable)?;
        Ok(counts.into_iter().sum())
    }

    /// Every user with an open connection anywhere, with their connection counts.
    pub async fn everyone(&self) -> Result<Vec<(String, i64)>, crate::error::CommandError> {
        let prefix = format!("{}:presence:{{", self.prefix);
        let pattern = format!("{prefix}*");
        let mut keys = if self.cluster {
            self.client.scan_cluster_buffered(pattern, Some(500), None).boxed()
        } else {
            self.client.scan_buffered(pattern, Some(500), None).boxed()
        };
        let mut users = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(unavailable)?;
            let Some(user) = key.as_str().and_then(|k| k.strip_prefix(&prefix)).and_then(|k| k.strip_suffix('}'))
            else {
                continue;
            };
            let n = self.connections(user).await?;
            if n > 0 {
                users.push((user.to_owned(), n));
            }
        }
        users.sort();
        Ok(users)
    }

    /// Heartbeats this gateway and sweeps dead ones until `shutdown`; then removes this
    /// gateway's heartbeat.
    pub async fn run_housekeeping(self, shutdown: CancellationToken) {
        let mut heartbeat = tokio::time::interval(self.stale_after / 6);
        let mut sweep = tokio::time::interval(self.stale_after / 3);
        let mut recount = tokio::time::interval(self.recount_every);
        recount.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    let now = now_ms() as f64;
                    let res: Result<i64, _> =
                        self.client.zadd(self.gateways_key(), None, None, false, false, (now, self.gateway_id.as_str())).await;
                    if let Err(err) = res {
                        tracing::warn!(%err, "presence heartbeat failed");
                    }
                }
                _ = sweep.tick() => self.sweep().await,
                _ = recount.tick() => tokio::select! {
                    _ = self.recount() => {}
                    _ = shutdown.cancelled() => break,
                },
                _ = shutdown.cancelled() => break,
            }
        }
        let _: Result<i64, _> = self.client.zrem(self.gateways_key(), self.gateway_id.as_str()).await;
    }

    /// Rewrites this gateway's count of every user it holds, or once held, from the
    /// connections it really holds, and announces a user it finds newly online or offline.
    async fn recount(&self) {
        let mine: Vec<String> = match self.client.smembers(self.users_key(&self.gateway_id)).await {
            Ok(users) => users,
            Err(err) => {
                tracing::warn!(%err, "presence recount skipped: Redis unavailable");
                return;
            }
        };
        let held: Vec<String> = self.local.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let users: HashSet<String> = mine.into_iter().chain(held).collect();
        let mut fixed = 0u32;
        for user in users {
            let serial = self.stripes.lock(&user).await;
            let n = self.local.lock().unwrap_or_else(|p| p.into_inner()).get(&user).copied().unwrap_or(0);
            let args = vec![self.gateway_id.clone(), n.to_string()];
            let (before, after) =
                match self.client.eval::<(i64, i64), _, _, _>(RECOUNT, vec![self.user_key(&user)], args).await {
                    Ok(totals) => totals,
                    Err(err) => {
                        tracing::warn!(%err, "presence recount stopped: Redis unavailable");
                        return;
                    }
                };
            let listed: Result<i64, _> = if n > 0 {
                self.client.sadd(self.users_key(&self.gateway_id), user.as_str()).await
            } else {
                self.client.srem(self.users_key(&self.gateway_id), user.as_str()).await
            };
            if let Err(err) = listed {
                tracing::warn!(%err, "presence: user set not updated");
            }
            drop(serial);
            if before != after {
                fixed += 1;
            }
            if before <= 0 && after > 0 {
                self.announce(&user, true).await;
            } else if before > 0 && after <= 0 {
                self.announce(&user, false).await;
            }
        }
        if fixed > 0 {
            tracing::info!(users = fixed, "presence counts corrected from the connections held");
        }
    }

    /// Takes every stale gateway's users offline (once, under a short lock per gateway).
    async fn sweep(&self) {
        let cutoff = (now_ms() - self.stale_after.as_millis() as i64) as f64;
        let stale: Vec<String> =
            match self.client.zrangebyscore(self.gateways_key(), f64::NEG_INFINITY, cutoff, false, None).await {
                Ok(stale) => stale,
                Err(_) => return,
            };
        for gateway in stale.into_iter().filter(|g| *g != self.gateway_id) {
            let lock = format!("{}:sweep:{{{gateway}}}", self.prefix);
            let got: Result<Option<String>, _> =
                self.client.set(lock, "1", Some(Expiration::EX(60)), Some(SetOptions::NX), false).await;
            if !matches!(got, Ok(Some(_))) {
                continue;
            }
            tracing::info!(gateway, "sweeping the presence of a dead gateway");
            let users: Vec<String> = self.client.smembers(self.users_key(&gateway)).await.unwrap_or_default();
            for user in users {
                let left: Result<i64, _> =
                    self.client.eval(SWEEP_USER, vec![self.user_key(&user)], vec![gateway.clone()]).await;
                if left == Ok(0) {
                    self.announce(&user, false).await;
                }
            }
            let _: Result<i64, _> = self.client.del(self.users_key(&gateway)).await;
            let _: Result<i64, _> = self.client.zrem(self.gateways_key(), gateway.as_str()).await;
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn unavailable(err: fred::error::Error) -> crate::error::CommandError {
    tracing::warn!(%err, "presence lookup failed");
    crate::error::CommandError::new(crate::error::ErrorCode::Unavailable, "presence unavailable; retry")
}
