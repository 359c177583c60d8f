//! SIGSYS reporting (`SECCOMP_RET_TRAP`): the handler a jailed program installs before its
//! filter, which writes one [`SigsysRecord`] per trapped call to the report pipe.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;

/// Size of one record the SIGSYS handler writes (see [`SigsysRecord::parse`]).
pub const SIGSYS_RECORD_LEN: usize = 72;
const SIGSYS_MAGIC: u32 = 0x5359_5331; // "SYS1"

/// What the SIGSYS handler saw: a syscall seccomp trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigsysRecord {
    /// Syscall number (`si_syscall`).
    pub nr: i32,
    /// Audit arch (`si_arch`, 0xc000003e for x86-64).
    pub arch: u32,
    /// The six argument registers (rdi, rsi, rdx, r10, r8, r9).
    pub args: [u64; 6],
    /// The address after the syscall instruction.
    pub ip: u64,
}

impl SigsysRecord {
    /// Parses one [`SIGSYS_RECORD_LEN`]-byte record; `None` if it is not one.
    pub fn parse(b: &[u8]) -> Option<SigsysRecord> {
        if b.len() < SIGSYS_RECORD_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        if u32_at(0) != SIGSYS_MAGIC {
            return None;
        }
        let mut args = [0u64; 6];
        for (i, a) in args.iter_mut().enumerate() {
            *a = u64_at(16 + 8 * i);
        }
        Some(SigsysRecord {
            nr: u32_at(4) as i32,
            arch: u32_at(8),
            args,
            ip: u64_at(64),
        })
    }

    /// The record's bytes as the handler writes them ([`SigsysRecord::parse`] reads them
    /// back). Anything that holds the report fd can write these: a record is the program's
    /// claim, never proof of which call seccomp stopped.
    pub fn to_bytes(&self) -> [u8; SIGSYS_RECORD_LEN] {
        let mut rec = [0u8; SIGSYS_RECORD_LEN];
        rec[0..4].copy_from_slice(&SIGSYS_MAGIC.to_ne_bytes());
        rec[4..8].copy_from_slice(&self.nr.to_ne_bytes());
        rec[8..12].copy_from_slice(&self.arch.to_ne_bytes());
        for (i, a) in self.args.iter().enumerate() {
            rec[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        rec[64..72].copy_from_slice(&self.ip.to_ne_bytes());
        rec
    }
}

static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// The layout of the SIGSYS member of `siginfo_t` (after signo, errno, code and padding).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t (whose SIGSYS union member has the
    // `SigsysInfo` layout on x86-64) and a valid ucontext_t for an SA_SIGINFO handler. Only
    // async-signal-safe work follows: reading them, a raw write(2) of a stack buffer, and
    // moving the saved instruction pointer.
    unsafe {
        let si = &*(info as *const SigsysInfo);
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let g = &mut uc.uc_mcontext.gregs;
        let mut rec = [0u8; SIGSYS_RECORD_LEN];
        rec[0..4].copy_from_slice(&SIGSYS_MAGIC.to_ne_bytes());
        rec[4..8].copy_from_slice(&si.syscall.to_ne_bytes());
        rec[8..12].copy_from_slice(&si.arch.to_ne_bytes());
        let regs = [
            libc::REG_RDI,
            libc::REG_RSI,
            libc::REG_RDX,
            libc::REG_R10,
            libc::REG_R8,
            libc::REG_R9,
        ];
        for (i, r) in regs.iter().enumerate() {
            let v = g[*r as usize] as u64;
            rec[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_ne_bytes());
        }
        rec[64..72].copy_from_slice(&(si.call_addr as u64).to_ne_bytes());
        let fd = REPORT_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            libc::write(fd, rec.as_ptr().cast(), rec.len());
        }
        // SA_RESETHAND made SIGSYS's action SIG_DFL on entry. Step back over the 2-byte
        // syscall instruction (syscall, int 0x80 and sysenter are all 2 bytes; the kernel
        // rolled the registers back to the call's), so on return the same call traps
        // again and the kernel's forced SIGSYS kills the process: the exit status says
        // SIGSYS even for a pid-namespace init, which ignores raise().
        g[libc::REG_RIP as usize] -= 2;
    }
}

/// Installs the SIGSYS reporter: on a `SECCOMP_RET_TRAP` the handler writes one
/// [`SigsysRecord`] (raw bytes) to `report_fd` and then lets the process die by SIGSYS.
/// Call before installing a filter whose kill actions were turned into traps. The fd is
/// used from the signal handler and must stay open for the process's life.
pub fn install_sigsys_reporter(report_fd: RawFd) -> Result<(), Errno> {
    REPORT_FD.store(report_fd, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is valid; we set a handler with the SA_SIGINFO signature
    // and an empty mask, and pass pointers to live locals.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(Errno::last());
        }
        // SIGSYS must not be blocked (the kernel would force SIG_DFL and skip the report).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sigsys_record_reads_back_as_written() {
        let r = SigsysRecord {
            nr: libc::SYS_ptrace as i32,
            arch: 0xc000_003e,
            args: [1, 2, 3, 4, 5, u64::MAX],
            ip: 0x4141_4141,
        };
        assert_eq!(SigsysRecord::parse(&r.to_bytes()), Some(r));
        let mut bad = r.to_bytes();
        bad[0] ^= 1;
        assert_eq!(SigsysRecord::parse(&bad), None, "wrong magic");
    }
}
