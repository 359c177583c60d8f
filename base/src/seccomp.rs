//! Installing a classic-BPF seccomp filter, moving a program between processes as bytes,
//! and the user-notification listener (`SECCOMP_RET_USER_NOTIF`) that log mode uses to see
//! a violating call's arguments and then let it continue.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

/// One classic-BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant.
    pub k: u32,
}

/// Seccomp failures.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("PR_SET_NO_NEW_PRIVS: {0}")]
    NoNewPrivs(Errno),
    /// `seccomp(SECCOMP_SET_MODE_FILTER)` failed (the kernel rejected the program).
    #[error("seccomp(SET_MODE_FILTER): {0}")]
    Install(Errno),
    /// `seccomp(SET_MODE_FILTER, NEW_LISTENER)` failed.
    #[error("seccomp(SET_MODE_FILTER, NEW_LISTENER): {0}")]
    InstallListener(Errno),
    /// `pidfd_open` or `pidfd_getfd` of another process's listener failed.
    #[error("taking the listener fd {fd} of pid {pid}: {errno}")]
    TakeListener {
        /// The process.
        pid: i32,
        /// Its listener fd.
        fd: i32,
        /// Why.
        errno: Errno,
    },
    /// Waiting on, receiving from or answering through the listener failed.
    #[error("seccomp listener {op}: {errno}")]
    Notify {
        /// `poll`, `NOTIF_RECV` or `NOTIF_SEND`.
        op: &'static str,
        /// Why.
        errno: Errno,
    },
    /// The program is empty, too long (> 4096 instructions) or its bytes are not whole
    /// instructions.
    #[error("bad BPF program: {0}")]
    BadProgram(String),
}

/// Largest program the kernel accepts.
pub const BPF_MAXINSNS: usize = 4096;

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> Result<(), SeccompError> {
    nix::sys::prctl::set_no_new_privs().map_err(SeccompError::NoNewPrivs)
}

/// Installs `prog` as this process's (all threads' with `tsync`) seccomp filter.
/// no_new_privs must be set first (or the caller must have CAP_SYS_ADMIN).
pub fn install_filter(prog: &[SockFilter], tsync: bool) -> Result<(), SeccompError> {
    check_len(prog)?;
    let flags = if tsync {
        libc::SECCOMP_FILTER_FLAG_TSYNC
    } else {
        0
    };
    set_mode_filter(prog, flags).map_err(SeccompError::Install)?;
    Ok(())
}

/// Installs `prog` for this thread (and the threads it creates later) and returns the
/// listener of its `SECCOMP_RET_USER_NOTIF` actions: every such call blocks until whoever
/// holds the listener answers it ([`NotifyListener`]). no_new_privs must be set first.
pub fn install_filter_with_listener(prog: &[SockFilter]) -> Result<OwnedFd, SeccompError> {
    check_len(prog)?;
    let fd = set_mode_filter(prog, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER)
        .map_err(SeccompError::InstallListener)?;
    // SAFETY: with NEW_LISTENER a successful seccomp() returns a new fd (CLOEXEC) that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn check_len(prog: &[SockFilter]) -> Result<(), SeccompError> {
    if prog.is_empty() || prog.len() > BPF_MAXINSNS {
        return Err(SeccompError::BadProgram(format!(
            "{} instructions",
            prog.len()
        )));
    }
    Ok(())
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)`; the caller checked the length.
fn set_mode_filter(prog: &[SockFilter], flags: libc::c_ulong) -> Result<libc::c_long, Errno> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, a live slice of `SockFilter`, which is #[repr(C)]
    // with the same layout as `struct sock_filter`; the kernel copies the program during
    // the call and keeps no pointer to our memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if ret < 0 {
        return Err(Errno::last());
    }
    Ok(ret)
}

/// A call the filter sent to the listener (`struct seccomp_notif`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// Cookie to answer with.
    pub id: u64,
    /// The calling thread, in the listener's pid namespace (0 if not visible there).
    pub pid: u32,
    /// Syscall number.
    pub nr: i32,
    /// Audit arch.
    pub arch: u32,
    /// Instruction pointer of the call.
    pub ip: u64,
    /// The six arguments.
    pub args: [u64; 6],
}

/// What [`NotifyListener::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerEvent {
    /// A notification is waiting: [`NotifyListener::recv`] will not block.
    Ready,
    /// Nothing within the timeout.
    Timeout,
    /// No task uses the filter any more (the program exited).
    Hangup,
}

/// The supervisor's end of a filter's user notifications.
#[derive(Debug)]
pub struct NotifyListener {
    fd: OwnedFd,
}

impl NotifyListener {
    /// Wraps a listener fd (from [`install_filter_with_listener`]).
    pub fn new(fd: OwnedFd) -> Self {
        NotifyListener { fd }
    }

    /// Takes a copy of listener fd `fd` out of process `pid` with `pidfd_getfd(2)`, so the
    /// supervisor does not depend on the process sending it (which it could not do if its
    /// own `sendmsg` were a notified call). Needs ptrace access to `pid`.
    pub fn take_from(pid: i32, fd: i32) -> Result<Self, SeccompError> {
        let err = |errno| SeccompError::TakeListener { pid, fd, errno };
        // SAFETY: plain syscall with integer arguments; a non-negative result is a new fd
        // (pidfds are CLOEXEC) that we own.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            return Err(err(Errno::last()));
        }
        // SAFETY: see above; the fd is ours alone.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: plain syscall with integer arguments; on success the result is a new
        // CLOEXEC fd in our table that we own.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if got < 0 {
            return Err(err(Errno::last()));
        }
        // SAFETY: see above.
        Ok(NotifyListener::new(unsafe {
            OwnedFd::from_raw_fd(got as i32)
        }))
    }

    /// Waits up to `timeout_ms` for a notification.
    pub fn wait(&self, timeout_ms: i32) -> Result<ListenerEvent, SeccompError> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        match n {
            n if n < 0 => match Errno::last() {
                Errno::EINTR => Ok(ListenerEvent::Timeout),
                errno => Err(SeccompError::Notify { op: "poll", errno }),
            },
            0 => Ok(ListenerEvent::Timeout),
            _ if p.revents & libc::POLLIN != 0 => Ok(ListenerEvent::Ready),
            _ => Ok(ListenerEvent::Hangup),
        }
    }

    /// Receives one notification (blocks until there is one).
    pub fn recv(&self) -> Result<Notification, SeccompError> {
        // SAFETY: seccomp_notif is plain data; the kernel requires it zeroed on input.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: NOTIF_RECV writes one `struct seccomp_notif` into `n`, which is live and
        // of that type.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) };
        if r < 0 {
            return Err(SeccompError::Notify {
                op: "NOTIF_RECV",
                errno: Errno::last(),
            });
        }
        Ok(Notification {
            id: n.id,
            pid: n.pid,
            nr: n.data.nr,
            arch: n.data.arch,
            ip: n.data.instruction_pointer,
            args: n.data.args,
        })
    }

    /// Lets the notified call `id` run as if the filter had allowed it
    /// (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`). `Ok(false)`: the call is gone (the thread was
    /// interrupted or died), nothing to answer.
    pub fn continue_call(&self, id: u64) -> Result<bool, SeccompError> {
        let mut resp = libc::seccomp_notif_resp {
            id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        };
        // SAFETY: NOTIF_SEND reads one `struct seccomp_notif_resp` from `resp`, which is live
        // and of that type.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut resp,
            )
        };
        if r < 0 {
            return match Errno::last() {
                Errno::ENOENT => Ok(false),
                errno => Err(SeccompError::Notify {
                    op: "NOTIF_SEND",
                    errno,
                }),
            };
        }
        Ok(true)
    }
}

/// Serialises a program: 8 bytes per instruction, little-endian.
pub fn program_to_bytes(prog: &[SockFilter]) -> Vec<u8> {
    let mut v = Vec::with_capacity(prog.len() * 8);
    for i in prog {
        v.extend_from_slice(&i.code.to_le_bytes());
        v.push(i.jt);
        v.push(i.jf);
        v.extend_from_slice(&i.k.to_le_bytes());
    }
    v
}

/// Parses a program serialised by [`program_to_bytes`].
pub fn program_from_bytes(bytes: &[u8]) -> Result<Vec<SockFilter>, SeccompError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) || bytes.len() / 8 > BPF_MAXINSNS {
        return Err(SeccompError::BadProgram(format!("{} bytes", bytes.len())));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| SockFilter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let p = vec![
            SockFilter {
                code: 0x20,
                jt: 0,
                jf: 0,
                k: 4,
            },
            SockFilter {
                code: 0x06,
                jt: 1,
                jf: 2,
                k: 0x7fff_0000,
            },
        ];
        assert_eq!(program_from_bytes(&program_to_bytes(&p)).unwrap(), p);
        assert!(program_from_bytes(&[1, 2, 3]).is_err());
        assert!(program_from_bytes(&[]).is_err());
    }
}
