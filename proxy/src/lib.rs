//! Sluice: a PostgreSQL connection-pooling proxy for serverless fan-out.
//!
//! # Layout
//! Data flows one way, each module importing only those after it:
//! `net` (accept, limits, shutdown) → `session` (startup, auth, transaction relay) → `pool`
//! (budget, admission, fair queue, shedding) → `server` (authenticated backend connections) →
//! `protocol` (pure framing and message codecs). Side modules import nothing from the path:
//! `config`, `metrics`, `error`, `auth` (client authentication secrets and exchanges).
//! `admin` serves `/metrics`, `/healthz` and `/readyz`.

pub mod auth;
pub mod config;
pub mod metrics;
pub mod pool;
pub mod protocol;
