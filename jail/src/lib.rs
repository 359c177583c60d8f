//! hostmem-jail: what hostmem needs of minijail, compatible with its policy syntax.
//!
//! * [`policy`]: the `.policy` language (parser, [`constants`] table from minijail).
//! * [`compiler`] + [`bpf`]: our own classic-BPF code generator with minijail's semantics.
//! * [`interp`]: a BPF interpreter to evaluate compiled filters without the kernel.
//! * [`tools`]: `check`, `explain`, `lint` (behind `hostmem policy`).
//! * [`runtime`]: the filter a device stacks after start-up (no new code).
//! * [`launch`]: the jailed spawn (namespaces, empty root, no capabilities, no_new_privs,
//!   fd hygiene) and the device-side seccomp install.

#![forbid(unsafe_code)]

pub mod bpf;
pub mod compiler;
pub mod constants;
pub mod error;
pub mod interp;
pub mod launch;
pub mod policy;
pub mod runtime;
pub mod tools;

pub use error::{Error, Result};
