//! The PROXY protocol v2 header a load balancer sends first (`proxy_protocol = true`):
//! `protocol::proxy_header::parse` on arbitrary bytes, and on every prefix of them.
//!
//! Checks: a header's length is within the input and at least the fixed part, and within the
//! payload limit; a header found in the whole input is found, with the same answer, in every
//! prefix that holds it, and every shorter prefix asks for more or is refused, never a
//! different header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::protocol::proxy_header::{parse, Parsed, FIXED_LEN, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Ok(whole) = parse(data) else { return };
    if let Parsed::Header { len, .. } = whole {
        assert!((FIXED_LEN..=FIXED_LEN + MAX_PAYLOAD).contains(&len) && len <= data.len());
        assert_eq!(parse(&data[..len]).ok(), Some(whole));
        for cut in 0..len {
            assert!(matches!(parse(&data[..cut]), Ok(Parsed::More) | Err(_)));
        }
    }
});
