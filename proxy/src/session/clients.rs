//! The registry of connected clients: their cancel keys, and what the admin console shows.
//!
//! Each client gets a (process id, secret) of Sluice's own; a CancelRequest with them is
//! forwarded to whichever server connection that client holds at that moment. The registry map
//! is touched only when clients connect, leave or cancel; per-transaction updates (the server
//! held, the state) go to the client's own [`ClientSlot`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

/// One client's entry.
pub struct ClientSlot {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub addr: Option<SocketAddr>,
    pub connected_at: SystemTime,
    state: AtomicU8,
    current: Mutex<Option<CancelKey>>,
}

impl ClientSlot {
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
    next_pid: AtomicI32,
    clients: Mutex<HashMap<i32, (i32, Arc<ClientSlot>)>>,
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
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub addr: Option<SocketAddr>,
}

impl ClientRegistry {
    pub fn register(&self, who: ClientIdentity) -> Registration<'_> {
        let slot = Arc::new(ClientSlot {
            user: who.user,
            database: who.database,
            application_name: who.application_name,
            addr: who.addr,
            connected_at: SystemTime::now(),
            state: AtomicU8::new(ClientState::Idle as u8),
            current: Mutex::new(None),
        });
        let secret_key: i32 = rand::random();
        let mut clients = self.clients.lock();
        // Process ids are positive like PostgreSQL's; skip any still in use after wrapping.
        let process_id = loop {
            let pid = self
                .next_pid
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1)
                & i32::MAX;
            if pid != 0 && !clients.contains_key(&pid) {
                break pid;
            }
        };
        clients.insert(process_id, (secret_key, slot.clone()));
        Registration {
            registry: self,
            process_id,
            secret_key,
            slot,
        }
    }

    /// Forwards a cancel for `process_id` if the secret matches and the client holds a server.
    /// Unknown keys and idle clients are ignored, as PostgreSQL ignores bad cancel requests.
    pub fn cancel(&self, process_id: i32, secret_key: i32, timeout: Duration) {
        let target = {
            let clients = self.clients.lock();
            match clients.get(&process_id) {
                Some((secret, slot)) if *secret == secret_key => slot.server(),
                _ => None,
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
