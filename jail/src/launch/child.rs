//! The jailed program's side: installing its seccomp filter and SIGSYS reporter, and the
//! filter rewrites for traps and log mode.

use std::io::Read;
use std::os::fd::{IntoRawFd, RawFd};

use hostmem_base::sandbox;
use hostmem_base::seccomp::SockFilter;

use crate::error::Error;

use super::{RET_LOG, RET_TRAP, RET_USER_NOTIF, SECCOMP_NOTIFY_ENV, SIGSYS_FD_ENV};

/// Turns every `SECCOMP_RET_LOG` of `prog` into `SECCOMP_RET_USER_NOTIF` (log mode with
/// arguments, see the module doc). Returns how many were changed.
pub fn logs_to_notifications(prog: &mut [SockFilter]) -> usize {
    const BPF_RET_K: u16 = 0x06;
    let mut n = 0;
    for i in prog.iter_mut() {
        if i.code == BPF_RET_K && i.k & 0xffff_0000 == RET_LOG {
            i.k = RET_USER_NOTIF;
            n += 1;
        }
    }
    n
}

/// Turns every kill action (`SECCOMP_RET_KILL_PROCESS`, `_KILL_THREAD`) of `prog` into
/// `SECCOMP_RET_TRAP`, for the SIGSYS reporter. Returns how many were changed.
pub fn kills_to_traps(prog: &mut [SockFilter]) -> usize {
    const BPF_RET_K: u16 = 0x06;
    let mut n = 0;
    for i in prog.iter_mut() {
        let action = i.k & 0xffff_0000;
        if i.code == BPF_RET_K && (action == 0x8000_0000 || action == 0) {
            i.k = RET_TRAP;
            n += 1;
        }
    }
    n
}

/// The first act of a program whose filter the launcher installed before the exec
/// ([`JailConfig::seccomp_at_exec`] with [`JailConfig::sigsys_reporter`]): if the launcher
/// named a SIGSYS report fd ([`SIGSYS_FD_ENV`]), install the SIGSYS handler that reports a
/// trapped call (number and arguments) on it before the process dies by SIGSYS. Needs
/// `rt_sigaction(SIGSYS)` and `rt_sigprocmask` in the policy. Without the variable (no
/// filter, or log mode) it does nothing.
///
/// [`JailConfig::seccomp_at_exec`]: super::JailConfig::seccomp_at_exec
/// [`JailConfig::sigsys_reporter`]: super::JailConfig::sigsys_reporter
pub fn child_install_sigsys_reporter() -> Result<(), Error> {
    let Some(rfd) = std::env::var(SIGSYS_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    else {
        return Ok(());
    };
    let owned = hostmem_base::fd::take_inherited(rfd)
        .map_err(|e| Error::Seccomp(format!("report fd {rfd}: {e}")))?;
    // The handler writes to it for the rest of the process's life.
    let rfd = owned.into_raw_fd();
    sandbox::install_sigsys_reporter(rfd)
        .map_err(|e| Error::Seccomp(format!("SIGSYS handler: {e}")))
}

/// The jailed program's first act: read the BPF program from `fd`, close it, set
/// no_new_privs and install the filter. If the launcher named a SIGSYS report fd
/// ([`SIGSYS_FD_ENV`]), a SIGSYS handler is installed first and kill actions become traps,
/// so a forbidden call is reported (number and arguments) before the process dies by
/// SIGSYS. In log mode ([`SECCOMP_NOTIFY_ENV`]) log actions become user notifications and
/// the filter gets a listener, which the launcher's thread takes (see the module doc).
/// Nothing the program reads afterwards can run outside the filter.
pub fn child_install_seccomp(fd: RawFd) -> Result<(), Error> {
    let owned = hostmem_base::fd::take_inherited(fd).map_err(|e| Error::Seccomp(e.to_string()))?;
    let mut f = std::fs::File::from(owned);
    std::io::Seek::rewind(&mut f).map_err(|e| Error::Seccomp(format!("rewinding: {e}")))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .map_err(|e| Error::Seccomp(format!("reading the program: {e}")))?;
    drop(f);
    let mut prog = hostmem_base::seccomp::program_from_bytes(&bytes)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    let report_fd = std::env::var(SIGSYS_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok());
    if let Some(rfd) = report_fd {
        let owned = hostmem_base::fd::take_inherited(rfd)
            .map_err(|e| Error::Seccomp(format!("report fd {rfd}: {e}")))?;
        // The handler writes to it for the rest of the process's life.
        let rfd = owned.into_raw_fd();
        sandbox::install_sigsys_reporter(rfd)
            .map_err(|e| Error::Seccomp(format!("SIGSYS handler: {e}")))?;
        let n = kills_to_traps(&mut prog);
        log::debug!("seccomp: {n} kill actions report through fd {rfd}");
    }
    hostmem_base::seccomp::set_no_new_privs().map_err(|e| Error::Seccomp(e.to_string()))?;
    if std::env::var_os(SECCOMP_NOTIFY_ENV).is_some() {
        let n = logs_to_notifications(&mut prog);
        let listener = hostmem_base::seccomp::install_filter_with_listener(&prog)
            .map_err(|e| Error::Seccomp(e.to_string()))?;
        // Stays open for the process's life: the launcher takes its copy with pidfd_getfd.
        let lfd = listener.into_raw_fd();
        log::debug!("seccomp log mode: {n} log actions notify through listener fd {lfd}");
        return Ok(());
    }
    if report_fd.is_some() {
        // Logged, so that the kernel's audit record names a trapped call: the handler's
        // record is only the program's claim.
        return hostmem_base::seccomp::install_filter_logged(&prog, false)
            .map_err(|e| Error::Seccomp(e.to_string()));
    }
    hostmem_base::seccomp::install_filter(&prog, false).map_err(|e| Error::Seccomp(e.to_string()))
}
