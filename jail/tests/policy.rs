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
        // minijail takes only the non-permissive actions as a default.
        let default = parse_str(&format!("@default {a}\nread: 1"), &ParseOptions::default());
        if matches!(a, "trace" | "log" | "allow") {
            let e = default.unwrap_err().to_string();
            assert!(e.contains("<string>:1:") && e.contains("permissive"), "{e}");
        } else {
            assert_eq!(
                verdict(&format!("@default {a}\nread: 1"), "write", a0(0)),
                want,
                "@default {a}"
            );
        }
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
        let f = c.sigsys_finding();
        let r = f
            .device_claim
            .as_ref()
            .unwrap_or_else(|| panic!("no SIGSYS record for {what}: {f}"));
        assert_eq!(r.name, name, "{what}");
        // The kernel's record, where its rate limit let it through, names the same call.
        if let Some(k) = &f.kernel_record {
            assert_eq!(k.name, name, "{what}: {f}");
        }
        assert!(
            r.args.is_some(),
            "{what}: the trap report carries the arguments"
        );
    }
}

fn parse_err(text: &str) -> String {
    match parse_str(text, &ParseOptions::default()) {
        Ok(_) => panic!("accepted: {text:?}"),
        Err(e) => e.to_string(),
    }
}

/// Issue 23 item 2: permissive defaults are refused with their line, as minijail refuses
/// them; the launcher's log mode (ParseOptions::default) is not a policy's.
#[test]
fn permissive_defaults_are_refused_with_their_line() {
    for a in ["allow", "log", "trace", "return EPERM", "1"] {
        let e = parse_err(&format!("read: 1\n@default {a}\n"));
        assert!(e.starts_with("<string>:2:"), "{a}: {e}");
        assert!(e.contains("permissive"), "{a}: {e}");
    }
    let log_mode = ParseOptions {
        default: Some(Action::Log),
        ..ParseOptions::default()
    };
    assert_eq!(
        parse_str("read: 1", &log_mode).unwrap().default,
        Action::Log
    );
}

/// Issue 23 item 3: nothing may follow an unconditional filter of a syscall (it could never
/// match); both lines are named. Conditional lines keep combining.
#[test]
fn rules_after_an_unconditional_one_are_refused_naming_both_lines() {
    for (text, first) in [
        ("read: 1\nread: arg0 == 1\n", 1),
        ("read: 1\n\nread: return EPERM\n", 1),
        ("read: arg0 == 0; return EPERM\nread: arg0 == 1\n", 1),
        ("write: 1\nread: kill\nread: 1\n", 2),
        ("{read, write}: 1\nwrite: arg0 == 2\n", 1),
        ("read: {return EPERM, arg0 == 1}\n", 1),
    ] {
        let e = parse_err(text);
        let last = text.trim_end().lines().count();
        assert!(e.starts_with(&format!("<string>:{last}:")), "{text:?}: {e}");
        assert!(
            e.contains(&format!("unconditional action at <string>:{first}")),
            "{e}"
        );
    }
    // Conditional lines combine in file order, then one unconditional line may end them.
    let p = "read: arg0 == 1\nread: arg0 == 2\nread: return EPERM\n";
    assert_eq!(verdict(p, "read", a0(2)), Action::Allow);
    assert_eq!(verdict(p, "read", a0(3)), Action::Errno(1));
}

/// Issue 23 item 4: negative constants mean their 64-bit two's complement, as in both
/// minijail compilers; below -2^63 is refused.
#[test]
fn negative_constants_are_twos_complement() {
    let p = "read: arg0 == -1\nwrite: arg2 == -4096 || arg2 == -0x8000000000000000\n";
    assert_eq!(verdict(p, "read", a0(u64::MAX)), Action::Allow);
    assert_eq!(verdict(p, "read", a0(1)), Action::KillProcess);
    assert_eq!(
        verdict(p, "write", [0, 0, (-4096i64) as u64, 0, 0, 0]),
        Action::Allow
    );
    assert_eq!(verdict(p, "write", [0, 0, 1 << 63, 0, 0, 0]), Action::Allow);
    assert_eq!(
        verdict(p, "write", [0, 0, 4096, 0, 0, 0]),
        Action::KillProcess
    );
    assert_eq!(
        verdict("read: arg0 == -010", "read", a0((-8i64) as u64)),
        Action::Allow
    );
    assert_eq!(verdict("read: arg0 in ~-2", "read", a0(1)), Action::Allow);
    assert!(parse_err("read: arg0 == -0x8000000000000001").contains("unknown constant"));
    assert!(parse_err("read: arg0 == --1").contains("unknown constant"));
}

/// Issue 23 item 6: filter lists, actions after an expression, `[arch=…]` metadata, read
/// with minijail's (Python compiler's) meaning; what is not supported says so.
#[test]
fn filter_lists_actions_and_arch_metadata() {
    let p = "read: {arg0 == 0, arg0 == 1; kill-thread, arg0 == 2; trap, return EBADF}\n";
    assert_eq!(verdict(p, "read", a0(0)), Action::Allow);
    assert_eq!(verdict(p, "read", a0(1)), Action::KillThread);
    assert_eq!(verdict(p, "read", a0(2)), Action::Trap);
    assert_eq!(verdict(p, "read", a0(3)), Action::Errno(9));
    for (a, want) in [
        ("log", Action::Log),
        ("user-notify", Action::UserNotify),
        ("kill", Action::KillProcess),
        ("allow", Action::Allow),
    ] {
        let p = format!("read: arg0 == 7; {a}\n");
        assert_eq!(verdict(&p, "read", a0(7)), want, "{a}");
        assert_eq!(verdict(&p, "read", a0(8)), Action::KillProcess, "{a}");
    }
    let p = "read[arch=x86_64]: 1\nwrite[arch=aarch64,arm]: 1\n{close, dup[arch=arm]}: 1\n";
    assert_eq!(verdict(p, "read", a0(0)), Action::Allow);
    assert_eq!(verdict(p, "write", a0(0)), Action::KillProcess);
    assert_eq!(verdict(p, "close", a0(0)), Action::Allow);
    assert_eq!(verdict(p, "dup", a0(0)), Action::KillProcess);
    assert_eq!(
        verdict("read[arch=x86_64,arm; foo=bar]: 1", "read", a0(0)),
        Action::Allow
    );
    assert!(parse_err("read: {arg0 == 0; return EPERM}").contains("not supported yet"));
    assert!(parse_err("read@default: 1").contains("not supported yet"));
    assert!(parse_err("read[arch]: 1").contains("key=value"));
    assert!(parse_err("read[arch=x86_64: 1").contains("unclosed"));
}

/// Issue 23 items 1 and 5: every constant name a shipped policy uses is one minijail knows
/// (the list kept from minijail's sources), and `policy lint` warns on what minijail would
/// read differently: `expr; return ERRNO` and names minijail lacks.
#[test]
fn shipped_policies_name_only_minijail_constants() {
    let known: std::collections::BTreeSet<String> =
        std::fs::read_to_string(root().join("jail/data/minijail-constants-x86_64.txt"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(String::from)
            .collect();
    assert!(known.len() > 1800 && known.contains("PROT_READ") && !known.contains("F_ADD_SEALS"));
    // The names our table says minijail lacks are indeed not minijail's, and are ours.
    for name in hostmem_jail::constants::MINIJAIL_LACKS {
        assert!(!known.contains(*name), "{name} is minijail's after all");
        assert!(hostmem_jail::constants::lookup(name).is_some(), "{name}");
    }
    let mut checked = 0;
    for e in std::fs::read_dir(root().join("jail-policies/x86_64"))
        .unwrap()
        .flatten()
    {
        let text = std::fs::read_to_string(e.path()).unwrap();
        for (i, line) in text.lines().enumerate() {
            let rule = line.split('#').next().unwrap();
            let Some((_, rhs)) = rule.split_once(':') else {
                continue;
            };
            for word in rhs.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with(|c: char| c.is_ascii_uppercase()) {
                    assert!(
                        known.contains(word),
                        "{}:{}: `{word}` is not a constant minijail knows",
                        e.path().display(),
                        i + 1
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 40, "{checked}");
    let dir = std::env::temp_dir().join(format!("hostmem-lint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("p.policy");
    std::fs::write(
        &f,
        "read: arg0 == 0; return EPERM\nfcntl: arg1 == F_ADD_SEALS\n",
    )
    .unwrap();
    let findings = hostmem_jail::tools::lint(&f, &CompileOptions::default());
    std::fs::remove_dir_all(&dir).unwrap();
    let text = format!("{:?}", findings.unwrap());
    assert!(
        text.contains("p.policy:1") && text.contains("Python"),
        "{text}"
    );
    assert!(
        text.contains("p.policy:2") && text.contains("F_ADD_SEALS"),
        "{text}"
    );
}
