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

/// [`install_filter`] with `SECCOMP_FILTER_FLAG_LOG`: the kernel also writes an audit
/// record (`type=1326`) for the calls this filter traps (and answers with an errno), as far
/// as `/proc/sys/kernel/seccomp/actions_logged` names those actions. Kills are logged
/// either way. That record is the kernel's word on which call a `SECCOMP_RET_TRAP` stopped,
/// where a SIGSYS handler's report is only the program's own (see
/// `docs/decisions/036-kernel-record-over-device-claim.md`).
pub fn install_filter_logged(prog: &[SockFilter], tsync: bool) -> Result<(), SeccompError> {
    check_len(prog)?;
    let mut flags = libc::SECCOMP_FILTER_FLAG_LOG;
    if tsync {
        flags |= libc::SECCOMP_FILTER_FLAG_TSYNC;
    }
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

/// What the kernel did with one call under a filter ([`kernel_verdicts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelVerdict {
    /// The filter allowed it (or only logged it).
    Allowed,
    /// The filter answered this errno.
    Errno(u16),
    /// The process died by this signal making the call (SIGSYS for a kill or a trap).
    Killed(i32),
}

/// The errno the probe filter of [`kernel_verdicts`] answers for every call; the filter
/// under test overrides it with its own errno, or with a kill.
const PROBE_ERRNO: u16 = 4000;

/// Asks the kernel whether it accepts `prog` as a seccomp filter: installs it in a child
/// (fork, no_new_privs, `seccomp(SET_MODE_FILTER)`) and returns the errno it got.
pub fn kernel_accepts(prog: &[SockFilter]) -> Result<(), Errno> {
    let fprog = libc::sock_fprog {
        len: prog.len().min(u16::MAX as usize) as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // The child's answer: the filter may kill its exit, so it goes through shared memory.
    let shared = crate::mmap::MemoryMapping::shared_anonymous(8).map_err(|_| Errno::ENOMEM)?;
    let word = shared.as_ptr() as *mut i64;
    // SAFETY: `word` is the first 8 bytes of our own fresh mapping.
    unsafe { word.write_volatile(i64::MIN) };
    // SAFETY: a fork-like clone; the child runs only raw syscalls on `fprog` (prepared
    // above, pointing at `prog`, which its copy of our memory holds), writes one word to
    // the shared mapping and `_exit`s.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
    if pid == 0 {
        // SAFETY: raw syscalls with integer arguments and a pointer to `fprog` (live).
        unsafe {
            let no_core = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::syscall(libc::SYS_prlimit64, 0, libc::RLIMIT_CORE, &no_core, 0usize);
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0);
            let r = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0usize,
                &fprog as *const libc::sock_fprog,
            );
            word.write_volatile(if r < 0 {
                i64::from(Errno::last_raw())
            } else {
                0
            });
            libc::_exit(0);
        }
    }
    if pid < 0 {
        return Err(Errno::last());
    }
    nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None)?;
    // SAFETY: as above; the child is gone.
    match unsafe { word.read_volatile() } {
        0 => Ok(()),
        i64::MIN => Err(Errno::EIO),
        e => Err(Errno::from_raw(e as i32)),
    }
}

/// The kernel's real verdict on each call (`(nr, args)`) under `prog`, for checking an
/// interpreter against it. Safe to use with any filter and any calls: a child installs a
/// probe filter that answers errno `PROBE_ERRNO` to everything but `exit`/`exit_group`
/// (so no call is ever executed), then `prog` on top. The kernel then returns `prog`'s errno
/// where `prog` answers one (the most recent filter's data wins among errnos), the probe's
/// where `prog` allows or logs, and kills where `prog` kills or traps. Results travel through
/// shared memory, since every syscall of the child is filtered; a death names the call in
/// flight and a new child goes on with the next one. Calls of `exit`/`exit_group` are not
/// allowed (they would run). Core dumps are off in the children.
pub fn kernel_verdicts(
    prog: &[SockFilter],
    calls: &[(u32, [u64; 6])],
) -> Result<Vec<KernelVerdict>, SeccompError> {
    check_len(prog)?;
    let unprobed = [libc::SYS_exit, libc::SYS_exit_group, libc::SYS_seccomp];
    if calls.iter().any(|(nr, _)| unprobed.contains(&(*nr as i64))) {
        return Err(SeccompError::BadProgram(
            "exit, exit_group and seccomp cannot be probed".into(),
        ));
    }
    // The probe: exit, exit_group and seccomp (installing `prog` on top) allowed after the
    // arch check, everything else answered with PROBE_ERRNO.
    let ret_errno = 0x0005_0000 | u32::from(PROBE_ERRNO);
    let probe = [
        SockFilter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 4,
        }, // ld arch
        SockFilter {
            code: 0x15,
            jt: 0,
            jf: 5,
            k: 0xc000_003e,
        }, // jeq x86_64
        SockFilter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        }, // ld nr
        SockFilter {
            code: 0x15,
            jt: 3,
            jf: 0,
            k: libc::SYS_exit as u32,
        },
        SockFilter {
            code: 0x15,
            jt: 2,
            jf: 0,
            k: libc::SYS_exit_group as u32,
        },
        SockFilter {
            code: 0x15,
            jt: 1,
            jf: 0,
            k: libc::SYS_seccomp as u32,
        },
        SockFilter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: ret_errno,
        },
        SockFilter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        },
    ];
    let fprogs = [
        libc::sock_fprog {
            len: probe.len() as u16,
            filter: probe.as_ptr() as *mut libc::sock_filter,
        },
        libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        },
    ];
    // Shared with the children: [cursor, verdict per call]. u64 words.
    let words = calls.len() + 1;
    let shared = crate::mmap::MemoryMapping::shared_anonymous(words * 8)
        .map_err(|e| SeccompError::BadProgram(format!("shared memory: {e}")))?;
    let base = shared.as_ptr() as *mut u64;
    const UNSET: u64 = u64::MAX;
    for i in 0..words {
        // SAFETY: `base` points at `words` u64s of our own fresh mapping.
        unsafe { base.add(i).write_volatile(if i == 0 { 0 } else { UNSET }) };
    }
    let mut out = vec![KernelVerdict::Allowed; calls.len()];
    let mut start = 0usize;
    while start < calls.len() {
        // SAFETY: as above.
        unsafe { base.write_volatile(start as u64) };
        // SAFETY: a fork-like clone; the child runs only raw syscalls on memory prepared
        // before it (the programs, the calls, the shared mapping) and never returns.
        let pid =
            unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
        if pid == 0 {
            // SAFETY: raw syscalls on live data (see above); the results go to the shared
            // mapping with volatile writes; `_exit` ends the child.
            unsafe {
                let no_core = libc::rlimit64 {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::syscall(libc::SYS_prlimit64, 0, libc::RLIMIT_CORE, &no_core, 0usize);
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0);
                for f in &fprogs {
                    let r = libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0usize,
                        f as *const libc::sock_fprog,
                    );
                    if r < 0 {
                        libc::_exit(100);
                    }
                }
                let mut i = start;
                while i < calls.len() {
                    base.write_volatile(i as u64);
                    let (nr, a) = &calls[i];
                    let r = libc::syscall(*nr as libc::c_long, a[0], a[1], a[2], a[3], a[4], a[5]);
                    // glibc's syscall() turns the kernel's -errno into -1 and errno.
                    let v = if r == -1 {
                        Errno::last_raw() as u64
                    } else {
                        1 << 32
                    };
                    base.add(1 + i).write_volatile(v);
                    i += 1;
                }
                base.write_volatile(calls.len() as u64);
                libc::syscall(libc::SYS_exit_group, 0);
                libc::_exit(0);
            }
        }
        if pid < 0 {
            return Err(SeccompError::Install(Errno::last()));
        }
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None)
            .map_err(|errno| SeccompError::Notify {
                op: "waitpid",
                errno,
            })?;
        // SAFETY: as above; the child is gone.
        let cursor = unsafe { base.read_volatile() } as usize;
        for (i, slot) in out
            .iter_mut()
            .enumerate()
            .take(cursor.min(calls.len()))
            .skip(start)
        {
            // SAFETY: as above.
            let v = unsafe { base.add(1 + i).read_volatile() };
            *slot = match v {
                e if e == u64::from(PROBE_ERRNO) => KernelVerdict::Allowed,
                e if e < 4096 => KernelVerdict::Errno(e as u16),
                // Returned without an errno: the call ran, which the probe never allows.
                _ => return Err(SeccompError::BadProgram(format!("call {i} ran"))),
            };
        }
        match status {
            nix::sys::wait::WaitStatus::Exited(_, 100) => {
                return Err(SeccompError::Install(Errno::EINVAL))
            }
            nix::sys::wait::WaitStatus::Exited(..) => start = calls.len(),
            nix::sys::wait::WaitStatus::Signaled(_, sig, _) => {
                if cursor >= calls.len() {
                    break; // killed by its own exit_group: every call is done
                }
                out[cursor] = KernelVerdict::Killed(sig as i32);
                start = cursor + 1;
            }
            other => return Err(SeccompError::BadProgram(format!("child ended {other:?}"))),
        }
    }
    drop(shared);
    Ok(out)
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
