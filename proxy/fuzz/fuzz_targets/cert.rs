//! The certificate a server presents over TLS, read for SCRAM-SHA-256-PLUS channel binding
//! (`tls::end_point_hash`, RFC 5929 `tls-server-end-point`): with `server_tls = "require"`
//! nothing else has checked it.
//!
//! Checks: no panic, and binding data is a SHA-256, SHA-384 or SHA-512 digest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|der: &[u8]| {
    if let Some(hash) = sluice::tls::end_point_hash(der) {
        assert!(matches!(hash.len(), 32 | 48 | 64), "{} bytes", hash.len());
    }
});
