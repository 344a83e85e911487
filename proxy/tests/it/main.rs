//! Integration tests: one test binary (`cargo test -p sluice --test it`).

mod harness_selftest;
mod loadgen;
mod pg;
mod proxy;
