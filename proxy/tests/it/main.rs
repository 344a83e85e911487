//! Integration tests: one test binary (`cargo test -p sluice --test it`).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod auth_query;
mod backpressure;
mod certs;
mod console;
mod core;
mod drivers;
mod encodings;
mod environment;
mod fidelity;
mod fleet;
mod harness_selftest;
mod harness_tls;
mod hostile;
mod iam;
mod iam_login;
mod loadgen;
mod outage;
mod passthrough;
mod pg;
mod proxy;
mod proxy_protocol;
mod relay_capture;
mod reset;
mod secrets;
mod session_state;
mod silent_server;
mod startup;
mod status_page;
mod support;
mod tls;
mod tls_clients;
mod tls_server_auth;
