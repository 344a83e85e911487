//! Cancel keys: each client gets a (process id, secret) of Sluice's own; a CancelRequest with
//! them is forwarded to whichever server connection that client holds at that moment.
//!
//! The registry map is touched only when clients connect, leave or cancel; the per-transaction
//! update of a client's current server goes to that client's own slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::server::CancelKey;

/// The server connection a client holds right now, if any.
#[derive(Default)]
pub struct CancelSlot {
    current: Mutex<Option<CancelKey>>,
}

impl CancelSlot {
    pub fn set(&self, key: Option<CancelKey>) {
        *self.current.lock() = key;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    next_pid: AtomicI32,
    clients: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// Unregisters a client's key when its session ends.
pub struct Registration<'a> {
    registry: &'a CancelRegistry,
    pub process_id: i32,
    pub secret_key: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.clients.lock().remove(&self.process_id);
    }
}

impl CancelRegistry {
    pub fn register(&self) -> Registration<'_> {
        let slot = Arc::new(CancelSlot::default());
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
                Some((secret, slot)) if *secret == secret_key => *slot.current.lock(),
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
}
