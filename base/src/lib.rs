//! hostmem-base: the only crate in hostmem with `unsafe` syscall code.
//!
//! Everything that touches raw memory or a raw syscall lives here behind a safe API:
//! memfds ([`shm::SharedMemory`]), RAII mappings ([`mmap::MemoryMapping`]), the hostmem
//! [`window::Window`] (reserve, MAP_FIXED place, restore background), KVM VMs and
//! memslots ([`kvm`]), seccomp filter installation ([`seccomp`]), the namespace sandbox
//! spawner ([`sandbox`]) and small `/proc` readers ([`procfs`]). Every `unsafe` block has a
//! `// SAFETY:` comment that says why it holds.

#[cfg(feature = "attack")]
pub mod attack;
pub mod error;
pub mod fd;
pub mod kvm;
pub mod log_limit;
pub mod mmap;
pub mod procfs;
pub mod rng;
pub mod sandbox;
pub mod seccomp;
pub mod shm;
pub mod size;
#[cfg(feature = "virgl")]
pub mod virgl;
pub mod window;

pub use error::{Error, Result};
