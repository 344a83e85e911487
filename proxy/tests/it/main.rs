//! Integration tests: one test binary (`cargo test -p sluice --test it`).

mod admin;
mod backpressure;
mod core;
mod drivers;
mod harness_selftest;
mod loadgen;
mod pg;
mod proxy;
mod session_state;
