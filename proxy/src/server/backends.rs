//! The count of server connections that exist, from a socket's opening until the server has
//! closed it (its backend has gone): what the pools' budget holds the server to.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Server connections that exist, from the socket's opening until the server has closed it
/// (its backend has gone), and who to tell when one has.
#[derive(Default)]
pub(super) struct Backends {
    pub(super) count: Arc<AtomicU32>,
    pub(super) on_gone: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// One counted server connection: holds its place in [`Backends`] until dropped.
pub(super) struct Backend(Arc<Backends>);

impl Backend {
    pub(super) fn new(backends: &Arc<Backends>) -> Backend {
        backends.count.fetch_add(1, Ordering::AcqRel);
        Backend(backends.clone())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        // Never called in place: the drop may happen under the lock `on_gone` takes.
        let backends = self.0.clone();
        let wake = move || {
            if let Some(f) = backends.on_gone.get() {
                f();
            }
        };
        // Without a runtime nobody can be waiting for room.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(rt.spawn(async move { wake() }));
        }
    }
}

/// How long a closed connection's place is held at most while waiting for the server to close
/// its end (a server that went silent never does).
pub const GONE_WAIT: Duration = Duration::from_secs(5);
