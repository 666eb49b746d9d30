#![no_main]
//! Fuzz target: see `lanbeat::fuzzing::liveness`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lanbeat::fuzzing::liveness(data));
