//! The registry of connected clients: their cancel keys, and what the admin console shows.
//!
//! Each client gets a (process id, secret) of Sluice's own; a CancelRequest with them is
//! forwarded to whichever server connection that client holds at that moment. The registry map
//! is touched only when clients connect, leave or cancel; per-transaction updates (the server
//! held, the state) go to the client's own [`ClientSlot`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::server::CancelKey;

/// What a client is doing, for SHOW CLIENTS and the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    Idle = 0,
    Waiting = 1,
    Active = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// Why a session was told to end while it waited for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kick {
    IdleTimeout = 1,
    Shutdown = 2,
    /// `KILL db` from the admin console.
    Killed = 3,
}

/// Milliseconds since the first call: a cheap clock for idle times.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One client's entry.
pub struct ClientSlot {
    /// Shared with the other clients of the same user, database or application.
    pub user: Arc<String>,
    pub database: Arc<String>,
    pub application_name: Arc<String>,
    pub addr: Option<SocketAddr>,
    pub tls: bool,
    /// Seconds since the Unix epoch (a `SystemTime` takes twice the room in every slot).
    connected_at: u64,
    state: AtomicU8,
    current: Mutex<Option<CancelKey>>,
    /// When the client last went idle ([`now_ms`]).
    idle_since: AtomicU64,
    /// Idle time after which the client is disconnected, in milliseconds (0: never).
    idle_timeout_ms: u32,
    /// A [`Kick`] once the registry told the session to end; 0 before.
    kicked: AtomicU8,
    /// Wakes the session from its wait for the client. Idle sessions hold no timer of their own:
    /// the registry's [`ClientRegistry::sweep`] finds the ones idle too long.
    kick: AtomicWaker,
}

impl ClientSlot {
    /// When the client connected.
    pub fn connected_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.connected_at)
    }

    /// Marks the client idle from now, waiting for its next request.
    pub fn went_idle(&self) {
        self.idle_since.store(now_ms(), Ordering::Relaxed);
        self.set_state(ClientState::Idle);
    }

    /// Ready with the reason once the session must end; otherwise `cx` is woken when it must.
    pub fn poll_kicked(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Kick> {
        if let Some(k) = self.kick_reason() {
            return std::task::Poll::Ready(k);
        }
        self.kick.register(cx.waker());
        // Kicked between the check and the registration: the wake went to the old waker.
        match self.kick_reason() {
            Some(k) => std::task::Poll::Ready(k),
            None => std::task::Poll::Pending,
        }
    }

    /// The reason the session was told to end, if it was.
    pub fn kick_reason(&self) -> Option<Kick> {
        match self.kicked.load(Ordering::Acquire) {
            1 => Some(Kick::IdleTimeout),
            2 => Some(Kick::Shutdown),
            3 => Some(Kick::Killed),
            _ => None,
        }
    }

    fn kick(&self, why: Kick) {
        self.kicked.store(why as u8, Ordering::Release);
        // A session not waiting at this moment sees the reason at its next wait.
        self.kick.wake();
    }

    /// The server this client holds now (`None` between transactions).
    pub fn set_server(&self, key: Option<CancelKey>) {
        *self.current.lock() = key;
    }

    pub fn server(&self) -> Option<CancelKey> {
        *self.current.lock()
    }

    pub fn set_state(&self, s: ClientState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }
}

#[derive(Default)]
pub struct ClientRegistry {
    /// Set by [`ClientRegistry::kick_all`]: sessions registered later are kicked at once.
    closing: std::sync::atomic::AtomicBool,
    next_pid: AtomicI32,
    /// A fleet member's tag, in the top bits of every process id it gives out (0: none).
    tag: AtomicI32,
    clients: Mutex<HashMap<i32, (i32, Arc<ClientSlot>)>>,
}

/// Bits of a fleet member's process ids below its tag ([`ClientRegistry::set_tag`]).
pub const TAG_SHIFT: u32 = 19;
/// Fleet tags are 1..=TAG_MAX (12 bits above the 19 of a counter: a positive i32).
pub const TAG_MAX: i32 = (1 << 12) - 1;

/// The fleet member tag a client's process id carries (0: none).
pub fn tag_of(process_id: i32) -> i32 {
    process_id >> TAG_SHIFT
}

/// Unregisters a client when its session ends.
pub struct Registration<'a> {
    registry: &'a ClientRegistry,
    pub process_id: i32,
    pub secret_key: i32,
    pub slot: Arc<ClientSlot>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.clients.lock().remove(&self.process_id);
    }
}

/// Who is registering.
pub struct ClientIdentity {
    pub user: Arc<String>,
    pub database: Arc<String>,
    pub application_name: Arc<String>,
    pub addr: Option<SocketAddr>,
    /// Whether the connection is encrypted.
    pub tls: bool,
    /// `client_idle_timeout` (zero: none).
    pub idle_timeout: Duration,
}

impl ClientRegistry {
    pub fn register(&self, who: ClientIdentity) -> Registration<'_> {
        let slot = Arc::new(ClientSlot {
            user: who.user,
            database: who.database,
            application_name: who.application_name,
            addr: who.addr,
            tls: who.tls,
            connected_at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            state: AtomicU8::new(ClientState::Idle as u8),
            current: Mutex::new(None),
            idle_since: AtomicU64::new(now_ms()),
            // The configuration refuses longer (config/validate.rs).
            idle_timeout_ms: u32::try_from(who.idle_timeout.as_millis()).unwrap_or(u32::MAX),
            kicked: AtomicU8::new(0),
            kick: AtomicWaker::new(),
        });
        let secret_key: i32 = rand::random();
        let mut clients = self.clients.lock();
        // Process ids are positive like PostgreSQL's; skip any still in use after wrapping.
        // A fleet member's carry its tag, so that any member can route a cancel to it.
        let tag = self.tag.load(Ordering::Relaxed);
        let process_id = loop {
            let n = self
                .next_pid
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            let pid = if tag == 0 {
                n & i32::MAX
            } else {
                (tag << TAG_SHIFT) | (n & ((1 << TAG_SHIFT) - 1))
            };
            if pid != 0 && pid != tag << TAG_SHIFT && !clients.contains_key(&pid) {
                break pid;
            }
        };
        if self.closing.load(Ordering::Acquire) {
            slot.kick(Kick::Shutdown);
        }
        clients.insert(process_id, (secret_key, slot.clone()));
        Registration {
            registry: self,
            process_id,
            secret_key,
            slot,
        }
    }

    /// Tags this registry's process ids with fleet member tag `tag` (1..=[`TAG_MAX`]), before
    /// the first client registers.
    pub fn set_tag(&self, tag: i32) {
        self.tag.store(tag & TAG_MAX, Ordering::Relaxed);
    }

    /// This registry's fleet member tag (0: none).
    pub fn tag(&self) -> i32 {
        self.tag.load(Ordering::Relaxed)
    }

    /// Forwards a cancel for `process_id` if the secret matches and the client holds a server.
    /// Unknown keys and idle clients are ignored, as PostgreSQL ignores bad cancel requests.
    /// Returns whether the client is one of this registry's.
    pub fn cancel(&self, process_id: i32, secret_key: i32, timeout: Duration) -> bool {
        let (known, target) = {
            let clients = self.clients.lock();
            match clients.get(&process_id) {
                Some((secret, slot)) if *secret == secret_key => (true, slot.server()),
                _ => (false, None),
            }
        };
        match target {
            Some(key) => {
                tokio::spawn(async move {
                    if let Err(e) = key.send(timeout).await {
                        tracing::warn!(error = %e, "forwarding a cancel request failed");
                    }
                });
            }
            None => tracing::debug!(process_id, "cancel request for no running query ignored"),
        }
        known
    }

    /// Tells every session whose client has idled past its `client_idle_timeout` to end.
    /// Called about once a second; returns how many were told.
    pub fn sweep(&self) -> usize {
        let now = now_ms();
        let clients = self.clients.lock();
        let mut n = 0;
        for (_, slot) in clients.values() {
            if slot.idle_timeout_ms > 0
                && slot.state() == ClientState::Idle
                && slot.kick_reason().is_none()
                && now.saturating_sub(slot.idle_since.load(Ordering::Relaxed))
                    >= u64::from(slot.idle_timeout_ms)
            {
                slot.kick(Kick::IdleTimeout);
                n += 1;
            }
        }
        n
    }

    /// Tells every session of `database` to end as soon as it waits for its client (`KILL`);
    /// returns how many were told.
    pub fn kick_database(&self, database: &str) -> usize {
        let clients = self.clients.lock();
        let mut n = 0;
        for (_, slot) in clients.values() {
            if slot.database.as_str() == database && slot.kick_reason().is_none() {
                slot.kick(Kick::Killed);
                n += 1;
            }
        }
        n
    }

    /// Tells every session to end as soon as it waits for its client (shutdown).
    pub fn kick_all(&self) {
        let clients = self.clients.lock();
        self.closing.store(true, Ordering::Release);
        for (_, slot) in clients.values() {
            slot.kick(Kick::Shutdown);
        }
    }

    /// Clients by state, indexed by [`ClientState`] (`state as usize`).
    pub fn state_counts(&self) -> [usize; 3] {
        let mut counts = [0; 3];
        for (_, slot) in self.clients.lock().values() {
            counts[slot.state() as usize] += 1;
        }
        counts
    }

    /// A snapshot of every client: (process id, slot).
    pub fn snapshot(&self) -> Vec<(i32, Arc<ClientSlot>)> {
        let mut v: Vec<_> = self
            .clients
            .lock()
            .iter()
            .map(|(pid, (_, slot))| (*pid, slot.clone()))
            .collect();
        v.sort_by_key(|(pid, _)| *pid);
        v
    }
}
