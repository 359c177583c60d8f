//! Policy tools behind `hostmem policy`: check, explain, lint.

use std::path::Path;
use std::time::Instant;

use crate::compiler::{compile, CompileOptions};
use crate::error::Result;
use crate::interp::{run, SeccompData};
use crate::policy::{parse_file, syscall_nr, Action, Op, Policy};

/// Result of checking one file.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Syscalls listed.
    pub syscalls: usize,
    /// BPF instructions.
    pub instructions: usize,
    /// Parse + compile time in µs.
    pub micros: u128,
}

/// Parses and compiles `path`.
pub fn check(path: &Path, opts: &CompileOptions) -> Result<CheckReport> {
    let t = Instant::now();
    let p = parse_file(path, &opts.parse)?;
    let prog = compile(&p, opts)?;
    Ok(CheckReport {
        syscalls: p.syscalls.len(),
        instructions: prog.len(),
        micros: t.elapsed().as_micros(),
    })
}

/// What the compiled filter of `path` does for `syscall(args)`.
pub fn explain(
    path: &Path,
    opts: &CompileOptions,
    syscall: &str,
    args: [u64; 6],
) -> Result<String> {
    let p = parse_file(path, &opts.parse)?;
    let prog = compile(&p, opts)?;
    let Some(nr) = syscall_nr(syscall).or_else(|| syscall.parse().ok()) else {
        return Ok(format!("unknown syscall {syscall}"));
    };
    let verdict = match run(&prog, &SeccompData::x86_64(nr, args)) {
        Ok(r) => format!("{:?}", Action::from_ret(r)),
        Err(e) => format!("filter error: {e}"),
    };
    Ok(format!("{syscall} (nr {nr}) {args:#x?} -> {verdict}"))
}

/// A dangerous rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The syscall.
    pub syscall: String,
    /// What is wrong.
    pub what: String,
}

fn allows_unconditionally(p: &Policy, nr: u32) -> bool {
    p.syscalls.get(&nr).is_some_and(|rules| {
        rules
            .iter()
            .any(|r| r.expr.is_none() && r.action == Action::Allow)
    })
}

/// Whether some argument value with bits of `bits` in `arg` passes the syscall's rules
/// (checked with the interpreter on a few probe values).
fn can_pass_with(
    p: &Policy,
    prog: &[hostmem_base::seccomp::SockFilter],
    nr: u32,
    arg: usize,
    bits: u64,
) -> bool {
    let probes = [
        bits,
        bits | 0x1,
        bits | 0x2,
        bits | 0x3,
        bits | 0x20,
        bits | 0x22,
        bits | 0x21,
        bits | 0x23,
    ];
    let _ = p;
    probes.iter().any(|v| {
        let mut args = [0u64; 6];
        args[arg] = *v;
        matches!(
            run(prog, &SeccompData::x86_64(nr, args)).map(Action::from_ret),
            Ok(Action::Allow | Action::Log)
        )
    })
}

/// Flags dangerous rules.
pub fn lint(path: &Path, opts: &CompileOptions) -> Result<Vec<Finding>> {
    let p = parse_file(path, &opts.parse)?;
    let prog = compile(
        &p,
        &CompileOptions {
            log_violations: false,
            ..opts.clone()
        },
    )?;
    let mut out = Vec::new();
    let mut add = |s: &str, w: String| {
        out.push(Finding {
            syscall: s.into(),
            what: w,
        })
    };
    let allowed = |name: &str| syscall_nr(name).is_some_and(|nr| p.syscalls.contains_key(&nr));
    for s in [
        "execve",
        "execveat",
        "ptrace",
        "process_vm_writev",
        "process_vm_readv",
    ] {
        if allowed(s) {
            add(
                s,
                "allowed at all: a compromised device can run or inspect other code".into(),
            );
        }
    }
    if let Some(nr) = syscall_nr("clone3") {
        if allows_unconditionally(&p, nr) {
            add(
                "clone3",
                "unconstrained: its flags live in memory seccomp cannot read, so it voids any `clone` flag check (answer `return ENOSYS` so libc falls back to clone)".into(),
            );
        }
    }
    for s in ["mmap", "mprotect", "pkey_mprotect"] {
        let Some(nr) = syscall_nr(s) else { continue };
        if !p.syscalls.contains_key(&nr) {
            continue;
        }
        let (exec, write) = (libc::PROT_EXEC as u64, libc::PROT_WRITE as u64);
        if can_pass_with(&p, &prog, nr, 2, exec | write) {
            add(
                s,
                "allows PROT_WRITE|PROT_EXEC together (W^X broken)".into(),
            );
        } else if can_pass_with(&p, &prog, nr, 2, exec) {
            add(
                s,
                "allows PROT_EXEC (fine only for a loader; say who needs it)".into(),
            );
        }
    }
    if let Some(nr) = syscall_nr("socket") {
        if let Some(rules) = p.syscalls.get(&nr) {
            let family_checked = rules.iter().all(|r| {
                r.expr.as_ref().is_some_and(|e| {
                    e.iter()
                        .all(|c| c.iter().any(|a| a.arg == 0 && a.op == Op::Eq))
                }) || r.action != Action::Allow
            });
            if !family_checked {
                add(
                    "socket",
                    "allowed without an arg0 == AF_* family check".into(),
                );
            }
        }
    }
    if let Some(nr) = syscall_nr("ioctl") {
        if let Some(rules) = p.syscalls.get(&nr) {
            if allows_unconditionally(&p, nr) {
                add("ioctl", "unconstrained: every ioctl of every fd".into());
            }
            for r in rules {
                for c in r.expr.iter().flatten() {
                    for a in c {
                        if a.arg == 1 && a.op == Op::MaskAny {
                            add(
                                "ioctl",
                                format!(
                                    "`arg1 & {:#x}` admits any request with one of those bits (e.g. TCGETS 0x5401): list the requests with ==",
                                    a.value
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    // What minijail would read differently (see the policy module's docs).
    for note in &p.notes {
        let (at, what) = note.split_once(": ").unwrap_or(("", note));
        add(at, what.to_string());
    }
    if allowed("clone") && syscall_nr("clone3").is_some_and(|nr| allows_unconditionally(&p, nr)) {
        add(
            "clone",
            "the `clone` check is void while `clone3` is allowed unconditionally".into(),
        );
    }
    Ok(out)
}
