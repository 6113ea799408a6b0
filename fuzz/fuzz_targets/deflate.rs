//! Run with `cargo +nightly fuzz run deflate` (from `fuzz/`).
//!
//! Inflates arbitrary bytes under a small cap: must never panic and never
//! produce more than the cap. Round-trips the input through the compressor.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_proto::deflate::{DeflateOptions, Deflater, Inflater, negotiate};

const CAP: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mut out = BytesMut::new();
    let mut inflater = Inflater::new();
    if inflater.inflate(data, &mut out, CAP).is_ok() {
        let _ = inflater.finish_message(&mut out, CAP);
    }
    assert!(out.len() <= CAP);

    let params = negotiate("permessage-deflate", &DeflateOptions::default()).unwrap();
    let compressed = Deflater::new(&params).compress(data);
    let mut round = BytesMut::new();
    let mut inflater = Inflater::new();
    inflater.inflate(&compressed, &mut round, usize::MAX).unwrap();
    inflater.finish_message(&mut round, usize::MAX).unwrap();
    assert_eq!(&round[..], data);
});
