//! Attacker primitives for the hostile suites (cargo feature `attack`, enabled only by
//! `hostmem-tests`): what code that took over a jailed device would try, in the one place
//! `unsafe` may live. Nothing in hostmem's own crates calls them.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

use crate::{Error, Result};

/// Maps `len` bytes of `fd` READ|EXEC (a private file mapping, as the loader maps library
/// code) and runs them as `extern "C" fn() -> u64`, returning its result: run-time code, if
/// the filters let it through. The bytes must be a complete function for this target.
pub fn run_code_from_fd(fd: BorrowedFd<'_>, len: usize) -> Result<u64> {
    // SAFETY: a new private mapping at an address the kernel picks; it aliases nothing of
    // ours. It is unmapped below before returning.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::Mmap {
            len,
            errno: Errno::last(),
        });
    }
    // SAFETY: the caller promised a complete function at the start of the mapping (the
    // point of the attack); the mapping is READ|EXEC and `len` long.
    let r = unsafe {
        let f: extern "C" fn() -> u64 = std::mem::transmute(p);
        f()
    };
    // SAFETY: `p` is our mapping of `len` bytes, unused after this.
    unsafe { libc::munmap(p, len) };
    Ok(r)
}
