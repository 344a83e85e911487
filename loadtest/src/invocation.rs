//! One function invocation: get a container (and through it a connection),
//! run the workload with retries, under the invocation's own timeout.
//!
//! Cold model: every invocation is a fresh container whose connection is
//! opened on first use and closed at the end. Warm model: containers keep
//! their connection between invocations and sit idle ("frozen") in a pool;
//! an invocation takes the most recently used idle container (as Lambda
//! tends to) or creates a new one while under the concurrency limit. A warm
//! container does not check its connection before use, just as a thawed
//! Lambda does not: a connection the server dropped while it was frozen
//! surfaces as an error on first use and is retried on a new connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_postgres::{Client, Config};

use crate::config::{Model, RetryPolicy};
use crate::db::connect;
use crate::recorder::{Outcome, Recorder};
use crate::retry::{backoff, classify, retry_wait, ErrorClass, TokenBucket};
use crate::workload::{self, AttemptError, Op, WorkContext};

/// A simulated function container.
#[derive(Default)]
pub struct Container {
    client: Option<Client>,
    uses: u64,
}

/// State shared by all invocations of a run.
pub struct Shared {
    pub pg: Config,
    pub work: WorkContext,
    pub model: Model,
    pub retry: RetryPolicy,
    pub bucket: Option<TokenBucket>,
    pub timeout: Duration,
    pub recorder: Arc<Recorder>,
    /// Concurrency limit: one permit per running invocation (= container).
    slots: Semaphore,
    idle: Mutex<Vec<Container>>,
    containers_created: AtomicU64,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pg: Config,
        work: WorkContext,
        model: Model,
        retry: RetryPolicy,
        timeout: Duration,
        max_concurrency: usize,
        recorder: Arc<Recorder>,
    ) -> Shared {
        let bucket = retry.budget.map(TokenBucket::new);
        Shared {
            pg,
            work,
            model,
            retry,
            bucket,
            timeout,
            recorder,
            slots: Semaphore::new(max_concurrency.min(Semaphore::MAX_PERMITS)),
            idle: Mutex::new(Vec::new()),
            containers_created: AtomicU64::new(0),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Container>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Containers created so far (warm model).
    pub fn containers_created(&self) -> u64 {
        self.containers_created.load(Ordering::Relaxed)
    }

    /// Warm model: create and connect `n` containers before the run, so the
    /// run starts with a warm population. Connect failures leave the
    /// container unconnected (it connects on first use) and are logged.
    pub async fn prewarm(&self, n: usize) {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let cfg = self.pg.clone();
            let timeout = self.timeout;
            tasks.spawn(async move {
                match tokio::time::timeout(timeout, connect(&cfg)).await {
                    Ok(Ok(c)) => Some(c),
                    Ok(Err(e)) => {
                        tracing::warn!("prewarm connect failed: {}", classify(&e).detail);
                        None
                    }
                    Err(_) => {
                        tracing::warn!("prewarm connect timed out");
                        None
                    }
                }
            });
        }
        let mut made = Vec::with_capacity(n);
        while let Some(res) = tasks.join_next().await {
            made.push(Container {
                client: res.ok().flatten(),
                uses: 0,
            });
        }
        self.containers_created
            .fetch_add(made.len() as u64, Ordering::Relaxed);
        self.idle().extend(made);
    }

    fn take_container(&self) -> Container {
        if let Model::Warm { .. } = self.model {
            if let Some(c) = self.idle().pop() {
                return c;
            }
            self.containers_created.fetch_add(1, Ordering::Relaxed);
        }
        Container::default()
    }

    fn return_container(&self, mut c: Container) {
        match self.model {
            Model::Cold => {} // dropping the client closes the connection
            Model::Warm { max_uses, .. } => {
                c.uses += 1;
                if max_uses > 0 && c.uses >= max_uses {
                    // Retired, like a recycled Lambda environment: its
                    // replacement will be created (and connect) on demand.
                    return;
                }
                self.idle().push(c);
            }
        }
    }

    /// Close every idle container's connection (end of run).
    pub fn shutdown(&self) {
        self.idle().clear();
    }
}

/// Run invocation `seq`, intended to start at `intended`, and record it.
pub async fn invoke(shared: Arc<Shared>, seq: u64, intended: Instant) {
    let op = workload::choose(&shared.work, seq, &mut rand::rng());
    let write_seq = match op {
        Op::Write { seq } => Some(seq),
        _ => None,
    };
    let outcome = invoke_inner(&shared, seq, &op).await;
    shared.recorder.finished(intended, outcome, write_seq);
}

async fn invoke_inner(shared: &Shared, seq: u64, op: &Op) -> Outcome {
    // Wait for a concurrency slot; Lambda would throttle beyond its limit.
    let permit = match tokio::time::timeout(shared.timeout, shared.slots.acquire()).await {
        Ok(Ok(p)) => p,
        _ => {
            return Outcome::Failed {
                key: "throttled".into(),
                detail: "no free concurrency slot within the invocation timeout".into(),
            }
        }
    };
    let mut container = shared.take_container();
    let res = tokio::time::timeout(shared.timeout, attempts(shared, &mut container, seq, op)).await;
    let outcome = match res {
        Ok(Ok(())) => Outcome::Succeeded,
        Ok(Err(class)) => Outcome::Failed {
            key: class.key,
            detail: class.detail,
        },
        Err(_) => {
            // The runtime is torn down on a Lambda timeout, so its connection
            // (possibly mid-query) is abandoned.
            container.client = None;
            Outcome::Failed {
                key: "timeout".into(),
                detail: format!(
                    "invocation exceeded its {}s timeout",
                    shared.timeout.as_secs_f64()
                ),
            }
        }
    };
    shared.return_container(container);
    drop(permit);
    outcome
}

/// Attempt loop with backoff. Returns the final error's class on failure.
async fn attempts(
    shared: &Shared,
    container: &mut Container,
    seq: u64,
    op: &Op,
) -> Result<(), ErrorClass> {
    let mut attempt = 1u32;
    loop {
        let class = match attempt_once(shared, container, seq, op, attempt).await {
            Ok(()) => return Ok(()),
            Err(c) => c,
        };
        if !class.retryable || attempt >= shared.retry.max_attempts {
            return Err(class);
        }
        if let Some(bucket) = &shared.bucket {
            if !bucket.try_take() {
                shared.recorder.retry_denied();
                return Err(class);
            }
        }
        shared.recorder.retried(&class.key, &class.detail);
        let hinted = class.retry_after.filter(|_| shared.retry.honour_hint);
        if hinted.is_some() {
            shared.recorder.retry_hinted();
        }
        let wait = {
            let mut rng = rand::rng();
            let wait = backoff(attempt, shared.retry.base, shared.retry.cap, &mut rng);
            retry_wait(wait, hinted, &mut rng)
        };
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

async fn attempt_once(
    shared: &Shared,
    container: &mut Container,
    seq: u64,
    op: &Op,
    attempt: u32,
) -> Result<(), ErrorClass> {
    let client = match container.client.take() {
        Some(c) => c,
        None => {
            let started = Instant::now();
            let c = connect(&shared.pg).await.map_err(|e| classify(&e))?;
            shared.recorder.connected(started.elapsed());
            c
        }
    };
    let res = workload::execute(&client, &shared.work, op, seq, attempt).await;
    // Keep the connection unless it is broken; a SQL-level error (e.g. a
    // shed 53300 from the proxy) leaves a usable session behind.
    let broken = client.is_closed() || matches!(&res, Err(AttemptError::Pg(e)) if is_fatal(e));
    if !broken {
        container.client = Some(client);
    }
    res.map_err(|e| match e {
        AttemptError::Pg(e) => classify(&e),
        AttemptError::Workload(key, detail) => ErrorClass::new(key, false, detail),
    })
}

/// Errors after which the session cannot be trusted: FATAL/PANIC from the
/// server, or any transport-level failure.
fn is_fatal(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => matches!(db.severity(), "FATAL" | "PANIC"),
        None => true,
    }
}
