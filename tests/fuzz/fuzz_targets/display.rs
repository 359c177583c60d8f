//! libFuzzer entry for the `display` harness (`hostmem_tests::fuzz::display`). No
//! `forbid(unsafe_code)` here: the entry macro exports a `#[no_mangle]` symbol, which that
//! lint rejects; there is no unsafe code of ours.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hostmem_tests::fuzz::display(data));
