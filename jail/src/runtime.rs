//! The run-time filter: no new code once start-up is over (W^X for the whole run).
//!
//! The policy a device is launched under must let the dynamic loader map library code
//! (`mmap` READ|EXEC of a private file mapping) and the launcher exec the program, and a
//! seccomp rule cannot tell a library on a read-only bind from a memfd the device just
//! wrote. So the device stacks this second filter on top once its code is loaded (the
//! backend built, before the first input is read): the kernel runs every filter and the
//! strictest verdict wins, so this one only takes away. It kills the process on
//!
//! * `mmap`, `mprotect`, `pkey_mprotect` with `PROT_EXEC` in the protection (any file,
//!   anonymous or not: after start-up nothing may become executable);
//! * `execve`, `execveat` (a new program is new code, even under the same filter);
//! * `personality` (`READ_IMPLIES_EXEC` would make later READ mappings executable behind
//!   the protection the filter sees);
//! * `shmat` with `SHM_EXEC`;
//! * any other architecture, and x32 numbers;
//!
//! and allows everything else (the launch policy below it still decides that). See
//! `docs/decisions/035-no-run-time-code.md`.

use hostmem_base::seccomp::SockFilter;

use crate::bpf::{data, Builder, Insn, JEQ, JSET};
use crate::interp::AUDIT_ARCH_X86_64;
use crate::policy::Action;
use crate::{Error, Result};

const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const PROT_EXEC: u32 = 0x4;
const SHM_EXEC: u32 = 0o100000;

/// Calls killed outright.
const KILLED: [libc::c_long; 3] = [libc::SYS_execve, libc::SYS_execveat, libc::SYS_personality];
/// Calls killed when argument 2 has `PROT_EXEC`.
const PROT_IN_ARG2: [libc::c_long; 3] =
    [libc::SYS_mmap, libc::SYS_mprotect, libc::SYS_pkey_mprotect];

fn nr(n: libc::c_long) -> u32 {
    // Syscall numbers on x86_64 are small and non-negative.
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The run-time filter program (x86_64), killing.
pub fn no_new_code() -> Vec<SockFilter> {
    no_new_code_with(Action::KillProcess)
}

/// The run-time filter program with `refuse` for what it refuses (the arch check always
/// kills).
pub fn no_new_code_with(refuse: Action) -> Vec<SockFilter> {
    let mut b = Builder::default();
    let (kill, allow, arch_ok, native) = (b.label(), b.label(), b.label(), b.label());
    let (prot, shm) = (b.label(), b.label());
    let jump = |b: &mut Builder, op, k, t, f| b.push(Insn::Jump { op, k, t, f });
    b.push(Insn::Load(data::ARCH));
    jump(&mut b, JEQ, AUDIT_ARCH_X86_64, arch_ok, kill);
    b.mark(arch_ok);
    b.push(Insn::Load(data::NR));
    jump(&mut b, JSET, X32_SYSCALL_BIT, kill, native);
    b.mark(native);
    for n in KILLED {
        let next = b.label();
        jump(&mut b, JEQ, nr(n), kill, next);
        b.mark(next);
    }
    for n in PROT_IN_ARG2 {
        let next = b.label();
        jump(&mut b, JEQ, nr(n), prot, next);
        b.mark(next);
    }
    let next = b.label();
    jump(&mut b, JEQ, nr(libc::SYS_shmat), shm, next);
    b.mark(next);
    b.push(Insn::Goto(allow));
    b.mark(prot);
    b.push(Insn::Load(data::arg_lo(2)));
    jump(&mut b, JSET, PROT_EXEC, kill, allow);
    b.mark(shm);
    b.push(Insn::Load(data::arg_lo(2)));
    jump(&mut b, JSET, SHM_EXEC, kill, allow);
    b.mark(allow);
    b.push(Insn::Ret(Action::Allow.ret()));
    b.mark(kill);
    b.push(Insn::Ret(refuse.ret()));
    b.assemble()
}

/// Stacks [`no_new_code`] on every thread of this process (TSYNC: renderer threads
/// started during start-up get it too). As the launch filter does, it reports through the
/// SIGSYS reporter when the launcher asked for one (a trap, so the report is written before
/// the process dies; installed with `SECCOMP_FILTER_FLAG_LOG`, so the kernel's audit record
/// names the call too) and only logs in the launcher's log mode. In a jail no_new_privs is
/// already set; outside one (a device started by hand) it is set here first.
pub fn forbid_new_code() -> Result<()> {
    use crate::launch::{SECCOMP_NOTIFY_ENV, SIGSYS_FD_ENV};
    use hostmem_base::seccomp::SeccompError;
    use hostmem_base::seccomp::{install_filter, install_filter_logged, set_no_new_privs};
    let refuse = if std::env::var_os(SECCOMP_NOTIFY_ENV).is_some() {
        Action::Log
    } else if std::env::var_os(SIGSYS_FD_ENV).is_some() {
        Action::Trap
    } else {
        Action::KillProcess
    };
    let prog = no_new_code_with(refuse);
    // A trap is logged (SECCOMP_FILTER_FLAG_LOG) so that the kernel's audit record names the
    // call: the SIGSYS handler's record is only the device's claim.
    let install = |p: &[SockFilter]| {
        if refuse == Action::Trap {
            install_filter_logged(p, true)
        } else {
            install_filter(p, true)
        }
    };
    match install(&prog) {
        Ok(()) => Ok(()),
        Err(SeccompError::Install(nix::errno::Errno::EACCES)) => {
            set_no_new_privs().map_err(|e| Error::Seccomp(format!("no_new_privs: {e}")))?;
            install(&prog).map_err(|e| Error::Seccomp(format!("the run-time filter: {e}")))
        }
        Err(e) => Err(Error::Seccomp(format!("the run-time filter: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{check, run, SeccompData};

    fn verdict(n: libc::c_long, args: [u64; 6]) -> Action {
        let prog = no_new_code();
        Action::from_ret(run(&prog, &SeccompData::x86_64(nr(n), args)).unwrap())
    }

    #[test]
    fn exec_mappings_and_new_programs_are_killed_the_rest_allowed() {
        check(&no_new_code()).unwrap();
        let rx = u64::from(PROT_EXEC) | 1;
        for n in PROT_IN_ARG2 {
            assert_eq!(
                verdict(n, [0, 4096, rx, 2, 3, 0]),
                Action::KillProcess,
                "{n}"
            );
            assert_eq!(
                verdict(n, [0, 4096, 4, 0x22, 0, 0]),
                Action::KillProcess,
                "{n}"
            );
            assert_eq!(verdict(n, [0, 4096, 3, 2, 3, 0]), Action::Allow, "{n}");
        }
        for n in KILLED {
            assert_eq!(verdict(n, [0; 6]), Action::KillProcess, "{n}");
        }
        let shm_exec = u64::from(SHM_EXEC);
        assert_eq!(
            verdict(libc::SYS_shmat, [1, 0, shm_exec, 0, 0, 0]),
            Action::KillProcess
        );
        assert_eq!(verdict(libc::SYS_shmat, [1, 0, 0, 0, 0, 0]), Action::Allow);
        assert_eq!(verdict(libc::SYS_read, [0, 0, rx, 0, 0, 0]), Action::Allow);
        assert_eq!(
            verdict(libc::SYS_munmap, [0, 4096, 0, 0, 0, 0]),
            Action::Allow
        );
        // x32 numbers and other architectures.
        let x32 = SeccompData::x86_64(nr(libc::SYS_read) | X32_SYSCALL_BIT, [0; 6]);
        assert_eq!(
            Action::from_ret(run(&no_new_code(), &x32).unwrap()),
            Action::KillProcess
        );
        let mut i386 = SeccompData::x86_64(nr(libc::SYS_read), [0; 6]);
        i386.arch = 0x4000_0003;
        assert_eq!(
            Action::from_ret(run(&no_new_code(), &i386).unwrap()),
            Action::KillProcess
        );
    }
}
