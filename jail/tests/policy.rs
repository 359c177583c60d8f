//! The seccomp policy suite: every policy parses and compiles, the kernel loads the result,
//! and the interpreter gives each operator and action its minijail meaning.

use std::path::{Path, PathBuf};

use hostmem_jail::compiler::{compile, compile_file, CompileOptions};
use hostmem_jail::interp::{run, SeccompData, AUDIT_ARCH_X86_64};
use hostmem_jail::policy::{parse_str, syscall_nr, Action, ParseOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn conformance() -> Option<PathBuf> {
    let d = root().join("../shared/conformance/crosvm-seccomp-x86_64");
    if d.is_dir() {
        Some(d)
    } else {
        println!("skipped: ../shared not present");
        None
    }
}

fn crosvm_opts(dir: &Path) -> CompileOptions {
    CompileOptions {
        parse: ParseOptions {
            rewrite_prefix: Some(("/usr/share/policy/crosvm/".into(), dir.to_path_buf())),
            default: None,
        },
        log_violations: false,
    }
}

fn verdict(text: &str, nr: &str, args: [u64; 6]) -> Action {
    let p = parse_str(text, &ParseOptions::default()).unwrap();
    let prog = compile(&p, &CompileOptions::default()).unwrap();
    let nr = syscall_nr(nr).unwrap();
    Action::from_ret(run(&prog, &SeccompData::x86_64(nr, args)).unwrap())
}

fn a0(v: u64) -> [u64; 6] {
    [v, 0, 0, 0, 0, 0]
}

/// The probe helper (a bin of hostmem-base), built by `cargo build --bins`.
fn probe_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("hostmem-syscall-probe");
    if p.is_file() {
        Some(p)
    } else {
        println!("skipped: hostmem-syscall-probe not built (tools/test builds it)");
        None
    }
}

#[test]
fn every_policy_parses_compiles_and_loads_in_the_kernel() {
    let mut files: Vec<(PathBuf, CompileOptions)> =
        std::fs::read_dir(root().join("jail-policies/x86_64"))
            .unwrap()
            .flatten()
            .map(|e| (e.path(), CompileOptions::default()))
            .collect();
    if let Some(dir) = conformance() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "policy") {
                files.push((e.path(), crosvm_opts(&dir)));
            }
        }
        assert!(files.len() > 30, "{}", files.len());
    }
    let probe = probe_bin();
    for (f, opts) in &files {
        let prog = compile_file(f, opts).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            prog.len() > 4 && prog.len() <= 4096,
            "{}: {}",
            f.display(),
            prog.len()
        );
        // The kernel accepts it: a child installs it (exit 3 would mean the kernel refused).
        if let Some(p) = &probe {
            let cfg = hostmem_jail::launch::JailConfig {
                program: p.clone(),
                args: vec!["none".into()],
                seccomp: Some(hostmem_base::seccomp::program_to_bytes(&prog)),
                ..Default::default()
            };
            let mut c = hostmem_jail::launch::spawn(cfg).unwrap();
            let x = c.wait().unwrap();
            assert_ne!(
                x,
                hostmem_jail::launch::ExitInfo::Exited(3),
                "kernel refused {}",
                f.display()
            );
        }
    }
}

#[test]
fn operators_with_64_bit_boundaries() {
    let big = 0x1_0000_0000u64;
    let t = |expr: &str, v: u64| verdict(&format!("read: {expr}"), "read", a0(v)) == Action::Allow;
    assert!(t("arg0 == 4294967296", big));
    assert!(!t("arg0 == 4294967296", 0)); // same low word, hi differs
    assert!(!t("arg0 == 0", big));
    assert!(t("arg0 != 0", big));
    assert!(!t("arg0 != 5", 5));
    assert!(t("arg0 < 4294967296", 0xffff_ffff));
    assert!(!t("arg0 < 4294967296", big));
    assert!(t("arg0 <= 4294967296", big));
    assert!(!t("arg0 <= 4294967295", big));
    assert!(t("arg0 > 4294967295", big));
    assert!(!t("arg0 > 4294967296", big));
    assert!(t("arg0 > 1", 0x2_0000_0000));
    assert!(t("arg0 >= 4294967296", big));
    assert!(!t("arg0 >= 4294967297", big));
    assert!(t("arg0 & 0x100000000", big | 1));
    assert!(!t("arg0 & 0x100000000", 0xffff_ffff));
    assert!(t("arg0 in 0xff", 0x7f));
    assert!(!t("arg0 in 0xff", 0x1ff));
    assert!(!t("arg0 in 0xff", big));
    // `in ~PROT_EXEC`: anything without PROT_EXEC.
    assert!(t("arg0 in ~PROT_EXEC", 3));
    assert!(!t("arg0 in ~PROT_EXEC", 5));
    // `|` of constants and parentheses.
    assert!(t("arg0 == PROT_READ|PROT_WRITE", 3));
    assert!(t("arg0 == (PROT_READ|PROT_WRITE)", 3));
    assert!(!t("arg0 == PROT_READ|PROT_WRITE", 1));
    // && binds tighter than ||.
    let e = "arg0 == 1 && arg1 == 2 || arg0 == 3";
    let v = |a: u64, b: u64| verdict(&format!("read: {e}"), "read", [a, b, 0, 0, 0, 0]);
    assert_eq!(v(1, 2), Action::Allow);
    assert_eq!(v(1, 3), Action::KillProcess);
    assert_eq!(v(3, 9), Action::Allow);
}

#[test]
fn actions_errno_and_merged_lines() {
    assert_eq!(verdict("read: 1", "read", a0(0)), Action::Allow);
    assert_eq!(verdict("read: 1", "write", a0(0)), Action::KillProcess);
    assert_eq!(
        verdict("read: return EPERM", "read", a0(0)),
        Action::Errno(1)
    );
    assert_eq!(verdict("read: return 22", "read", a0(0)), Action::Errno(22));
    assert_eq!(
        verdict("read: arg0 == 0; return ENOENT", "read", a0(1)),
        Action::Errno(2)
    );
    assert_eq!(
        verdict("read: arg0 == 0; return ENOENT", "read", a0(0)),
        Action::Allow
    );
    for (a, want) in [
        ("kill", Action::KillProcess),
        ("kill-process", Action::KillProcess),
        ("kill-thread", Action::KillThread),
        ("trap", Action::Trap),
        ("trace", Action::Trace(0)),
        ("log", Action::Log),
        ("user-notify", Action::UserNotify),
        ("allow", Action::Allow),
    ] {
        assert_eq!(verdict(&format!("read: {a}"), "read", a0(0)), want, "{a}");
        assert_eq!(
            verdict(&format!("@default {a}\nread: 1"), "write", a0(0)),
            want,
            "@default {a}"
        );
    }
    // Repeated lines merge as OR, in file order.
    let p = "ioctl: arg1 == 1\nioctl: arg1 == 2\n";
    assert_eq!(verdict(p, "ioctl", [0, 2, 0, 0, 0, 0]), Action::Allow);
    assert_eq!(verdict(p, "ioctl", [0, 3, 0, 0, 0, 0]), Action::KillProcess);
    // {a, b} lists, continuations, comments, denylist.
    let p = "{read, write}: \\\n  arg0 == 1 # stdout\n";
    assert_eq!(verdict(p, "write", a0(1)), Action::Allow);
    assert_eq!(verdict(p, "read", a0(2)), Action::KillProcess);
    assert_eq!(
        verdict("@denylist\nptrace: kill", "read", a0(0)),
        Action::Allow
    );
    assert_eq!(
        verdict("@denylist\nptrace: kill", "ptrace", a0(0)),
        Action::KillProcess
    );
}

#[test]
fn architecture_x32_and_long_jumps() {
    let p = parse_str("read: 1", &ParseOptions::default()).unwrap();
    let prog = compile(&p, &CompileOptions::default()).unwrap();
    let mut d = SeccompData::x86_64(0, [0; 6]);
    assert_eq!(Action::from_ret(run(&prog, &d).unwrap()), Action::Allow);
    d.arch = 0x4000_0003; // i386
    assert_eq!(
        Action::from_ret(run(&prog, &d).unwrap()),
        Action::KillProcess
    );
    d.arch = AUDIT_ARCH_X86_64;
    d.nr = 0x4000_0000; // x32 read
    assert_eq!(
        Action::from_ret(run(&prog, &d).unwrap()),
        Action::KillProcess
    );
    // 400 rules on one syscall: jumps beyond 255 instructions must still be right.
    let mut text = String::new();
    for i in 0..400 {
        text.push_str(&format!("ioctl: arg1 == {}\n", 0x1000 + i * 7));
    }
    text.push_str("read: 1\nwrite: 1\n");
    let p = parse_str(&text, &ParseOptions::default()).unwrap();
    let prog = compile(&p, &CompileOptions::default()).unwrap();
    assert!(prog.len() > 1000, "{}", prog.len());
    let ioctl = syscall_nr("ioctl").unwrap();
    for (arg, want) in [
        (0x1000, Action::Allow),
        (0x1000 + 399 * 7, Action::Allow),
        (0x1001, Action::KillProcess),
    ] {
        let got = run(&prog, &SeccompData::x86_64(ioctl, [0, arg, 0, 0, 0, 0])).unwrap();
        assert_eq!(Action::from_ret(got), want, "{arg:#x}");
    }
    let write = syscall_nr("write").unwrap();
    assert_eq!(
        Action::from_ret(run(&prog, &SeccompData::x86_64(write, [0; 6])).unwrap()),
        Action::Allow
    );
    // Log mode turns kills into log.
    let opts = CompileOptions {
        log_violations: true,
        ..Default::default()
    };
    let prog = compile(&p, &opts).unwrap();
    let got = run(&prog, &SeccompData::x86_64(ioctl, [0, 1, 0, 0, 0, 0])).unwrap();
    assert_eq!(Action::from_ret(got), Action::Log);
}

#[test]
fn errors_name_file_line_and_column() {
    for bad in [
        "read: arg9 == 1",
        "nosuchcall: 1",
        "read: arg0 == NO_SUCH_CONST",
        "read arg0",
        "@frobnicate",
        "read: arg0 ?? 1",
    ] {
        let e = parse_str(bad, &ParseOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("<string>:1:"), "{bad}: {e}");
    }
    let e = parse_str(
        "read: 1\n\nwrite: arg0 == BOGUS\n",
        &ParseOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("<string>:3:"), "{e}");
}

#[test]
fn lint_flags_what_crosvm_allows_and_ours_does_not() {
    let ours = root().join("jail-policies/x86_64/gpu_device_shm.policy");
    let f = hostmem_jail::tools::lint(&ours, &CompileOptions::default()).unwrap();
    // The filter is installed before the exec (seccomp at exec), so it must allow the exec
    // itself and the loader's READ|EXEC code mappings; nothing else, and never W^X broken.
    let mut found: Vec<(String, String)> = f
        .iter()
        .map(|x| (x.syscall.clone(), x.what.clone()))
        .collect();
    found.sort();
    assert_eq!(found.len(), 2, "{f:?}");
    assert_eq!(found[0].0, "execveat", "{f:?}");
    assert_eq!(found[1].0, "mmap", "{f:?}");
    assert!(found[1].1.contains("fine only for a loader"), "{f:?}");
    if let Some(dir) = conformance() {
        let f =
            hostmem_jail::tools::lint(&dir.join("gpu_device.policy"), &crosvm_opts(&dir)).unwrap();
        let text = format!("{f:?}");
        assert!(text.contains("clone3"), "{text}");
        assert!(text.contains("0x6400") || text.contains("ioctl"), "{text}");
    }
}

/// A forbidden call in a really jailed child ends in SIGSYS and is reported by name.
#[test]
fn forbidden_calls_die_by_sigsys_and_are_named() {
    let Some(probe) = probe_bin() else {
        return;
    };
    let policy = root().join("jail-policies/x86_64/gpu_device_shm.policy");
    let mut prog = compile_file(&policy, &CompileOptions::default()).unwrap();
    // As child_install_seccomp does for the device: kills become traps, so the reporter
    // names the call (and its arguments) before the process dies by SIGSYS.
    assert!(hostmem_jail::launch::kills_to_traps(&mut prog) > 0);
    let bytes = hostmem_base::seccomp::program_to_bytes(&prog);
    let loader = ["/lib64", "/lib/x86_64-linux-gnu"]
        .iter()
        .map(PathBuf::from)
        .collect::<Vec<_>>();
    for (what, name) in [
        ("execve", "execve"),
        ("socket_inet", "socket"),
        ("ptrace", "ptrace"),
        ("mmap_exec", "mmap"),
        ("mprotect_exec", "mprotect"),
        ("open_host_path", "open"),
        ("kill_parent", "kill"),
        ("clone_process", "clone"),
    ] {
        let cfg = hostmem_jail::launch::JailConfig {
            program: probe.clone(),
            args: vec![what.into()],
            namespaces: true,
            ro_binds: loader.clone(),
            seccomp: Some(bytes.clone()),
            ..Default::default()
        };
        let mut c = hostmem_jail::launch::spawn(cfg).unwrap();
        let x = c.wait().unwrap();
        assert_eq!(
            x,
            hostmem_jail::launch::ExitInfo::Signaled {
                signal: libc::SIGSYS,
                core: false
            },
            "{what}"
        );
        let r = c
            .sigsys_report()
            .unwrap_or_else(|| panic!("no SIGSYS report for {what}"));
        assert_eq!(r.name, name, "{what}");
        assert!(
            r.args.is_some(),
            "{what}: the trap report carries the arguments"
        );
    }
}
