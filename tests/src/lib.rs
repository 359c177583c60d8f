//! Test-only code shared by the suites of this crate: the fuzz harnesses ([`fuzz`]) and,
//! as a binary, the hostile device (`src/bin/hostmem-hostile-device.rs`).

#![forbid(unsafe_code)]

pub mod fuzz;
