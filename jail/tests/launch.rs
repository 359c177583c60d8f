//! The jailed launch, checked from outside (and from inside through the probe payload).
//! The tests run one at a time (a lock): the fd-hygiene test counts this process's fds.

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hostmem_base::seccomp::{program_to_bytes, SockFilter};
use hostmem_jail::launch::{jail_facts, spawn, verify_jailed, ExitInfo, JailConfig, Rlimits};
use hostmem_jail::Error;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PROBE: &str = env!("CARGO_BIN_EXE_hostmem-jail-probe");

fn loader() -> Vec<PathBuf> {
    ["/lib64", "/lib/x86_64-linux-gnu"]
        .iter()
        .map(PathBuf::from)
        .collect()
}

/// Removes a test's folder however the test ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `None` (and a `skipped:` line) when this machine cannot create the namespaces.
fn jail_works() -> bool {
    let cfg = JailConfig {
        program: "/usr/bin/true".into(),
        namespaces: true,
        ro_binds: loader(),
        ..JailConfig::default()
    };
    match spawn(cfg) {
        Ok(mut c) => {
            let x = c.wait().unwrap();
            assert_eq!(x, ExitInfo::Exited(0));
            true
        }
        Err(Error::LaunchStep { step, errno })
            if ["clone", "uid_map", "gid_map", "setgroups"].contains(&step.as_str()) =>
        {
            println!("skipped: user namespaces unavailable ({step}: {errno})");
            false
        }
        Err(e) => panic!("{e}"),
    }
}

/// Spawns the probe with stdin/stdout pipes; returns the child, the facts line (parsed) and
/// the stdin writer (drop it to let a `facts` probe exit).
fn probe(
    what: &str,
    mut cfg: JailConfig,
) -> (
    hostmem_jail::launch::JailedChild,
    serde_json::Value,
    OwnedFd,
) {
    let (in_r, in_w) = nix::unistd::pipe().unwrap();
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    cfg.program = PROBE.into();
    cfg.args.insert(0, what.into());
    cfg.keep_fds.push((in_r, 0));
    cfg.keep_fds.push((out_w, 1));
    let c = spawn(cfg).unwrap();
    let mut line = String::new();
    BufReader::new(std::fs::File::from(out_r))
        .read_line(&mut line)
        .unwrap();
    let v = serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
    (c, v, in_w)
}

fn filter(nr: i64, action: SeccompAction) -> Vec<u8> {
    let f = SeccompFilter::new(
        [(nr, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        action,
        TargetArch::x86_64,
    )
    .unwrap();
    let prog: BpfProgram = f.try_into().unwrap();
    let prog: Vec<SockFilter> = prog
        .iter()
        .map(|i| SockFilter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    program_to_bytes(&prog)
}

/// Whether `pid` is blocked in `clock_nanosleep`/`nanosleep` (from `/proc/PID/syscall`).
fn in_nanosleep(pid: i32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else {
        return false;
    };
    let nr: i64 = s
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1);
    nr == libc::SYS_clock_nanosleep || nr == libc::SYS_nanosleep
}

fn proc_fds(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

#[test]
fn jail_facts_from_outside_and_inside() {
    let _s = serial();
    if !jail_works() {
        return;
    }
    // A read-only bind under /tmp: the new root's tmpfs is mounted over /tmp in the child,
    // so this also checks that bind sources are opened before.
    let dir = std::env::temp_dir().join(format!("hostmem-jail-ro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _gone = RemoveOnDrop(dir.clone());
    std::fs::write(dir.join("hello"), "hi").unwrap();
    // World-writable, so only the read-only mount can refuse the write.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.join("hello"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let _not_kept = std::fs::File::open("/proc/self/status").unwrap();
    let (keep_r, _keep_w) = nix::unistd::pipe().unwrap();
    let marker = hostmem_base::shm::SharedMemory::new("kept", 4096).unwrap();
    let mut binds = loader();
    binds.push(dir.clone());
    let cfg = JailConfig {
        args: vec!["--ro".into(), dir.clone().into()],
        keep_fds: vec![(keep_r, 7), (marker.try_clone_fd().unwrap(), 9)],
        env: vec![("RUST_LOG".into(), "info".into())],
        namespaces: true,
        ro_binds: binds,
        rlimits: Rlimits {
            nofile: 77,
            core: 0,
            fsize: 1 << 30,
            address_space: Some(8 << 30),
            data: None,
        },
        ..JailConfig::default()
    };
    let (mut c, v, stdin) = probe("facts", cfg);
    let pid = c.pid();
    println!("inside: {v}");

    // From outside.
    let f = jail_facts(pid).unwrap();
    assert_eq!(f.new_namespaces.len(), 6, "{f:?}");
    assert_eq!(
        (f.cap_eff, f.cap_prm, f.cap_bnd, f.cap_amb),
        (0, 0, 0, 0),
        "{f:?}"
    );
    assert!(f.no_new_privs);
    assert_eq!(f.seccomp, 0);
    let e = verify_jailed(pid).unwrap_err().to_string();
    assert!(
        e.contains("seccomp: 0"),
        "no filter yet, so not jailed: {e}"
    );
    assert_eq!(proc_fds(pid), vec![0, 1, 2, 7, 9], "exactly the kept fds");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = |k: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("Max open files"), "Max open files 77 77 files");
    assert_eq!(line("Max core file size"), "Max core file size 0 0 bytes");
    assert_eq!(
        line("Max file size"),
        "Max file size 1073741824 1073741824 bytes"
    );
    assert_eq!(
        line("Max address space"),
        "Max address space 8589934592 8589934592 bytes"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "root inside is nobody outside: {uid}"
    );

    // From inside.
    assert_eq!(v["uid"], 0, "{v}");
    assert_eq!(v["pid"], 1, "pid 1 of its own pid namespace");
    let root: Vec<String> = serde_json::from_value(v["root"].clone()).unwrap();
    // Only what was bound (lib, lib64 as symlinks into usr; tmp for the test dir) and proc.
    assert_eq!(root, ["lib", "lib64", "proc", "tmp", "usr"], "{v}");
    assert_eq!(v["fds"], serde_json::json!([0, 1, 2, 7, 9]), "{v}");
    assert_eq!(v["env"], serde_json::json!(["RUST_LOG=info"]), "{v}");
    assert_eq!(
        v["connect_loopback"],
        libc::ENETUNREACH,
        "network reachable: {v}"
    );
    assert_eq!(v["ro_read"], "hi");
    assert_eq!(v["ro_write_existing"], libc::EROFS);
    assert_eq!(v["ro_create"], libc::EROFS);
    assert_eq!(v["hostname"], "hostmem-jail");
    assert_eq!(
        v["pdeathsig"],
        libc::SIGKILL,
        "the jailed program dies with its parent: PR_SET_PDEATHSIG survives the jail's credential changes and the exec: {v}"
    );
    let caps: Vec<String> = serde_json::from_value(v["caps"].clone()).unwrap();
    for k in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let l = caps.iter().find(|l| l.starts_with(k)).unwrap();
        assert!(l.ends_with("0000000000000000"), "{l}");
    }

    drop(stdin);
    assert_eq!(
        c.wait_timeout(Duration::from_secs(10)).unwrap(),
        Some(ExitInfo::Exited(0))
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!dir.exists());
}

#[test]
fn without_namespaces_only_fd_and_env_hygiene() {
    let _s = serial();
    let (keep_r, _keep_w) = nix::unistd::pipe().unwrap();
    let _not_kept = std::fs::File::open("/proc/self/status").unwrap();
    let cfg = JailConfig {
        keep_fds: vec![(keep_r, 5)],
        namespaces: false,
        ..JailConfig::default()
    };
    let (mut c, v, stdin) = probe("facts", cfg);
    let f = jail_facts(c.pid()).unwrap();
    assert!(f.new_namespaces.is_empty(), "{f:?}");
    assert!(f.no_new_privs);
    assert_eq!(proc_fds(c.pid()), vec![0, 1, 2, 5]);
    assert_eq!(v["env"], serde_json::json!([]), "{v}");
    drop(stdin);
    assert_eq!(c.wait().unwrap(), ExitInfo::Exited(0));
}

#[test]
fn seccomp_is_verified_and_a_kill_names_the_syscall_with_its_args() {
    let _s = serial();
    if !jail_works() {
        return;
    }
    let base = || JailConfig {
        namespaces: true,
        ro_binds: loader(),
        ..JailConfig::default()
    };
    // Filter on: verify_jailed passes, and the report fd is all that was added.
    let cfg = JailConfig {
        seccomp: Some(filter(libc::SYS_getppid, SeccompAction::KillProcess)),
        ..base()
    };
    let (mut c, v, stdin) = probe("facts", cfg);
    let facts = verify_jailed(c.pid()).unwrap();
    assert_eq!(facts.seccomp, 2);
    assert_eq!(
        proc_fds(c.pid()),
        vec![0, 1, 2, 4],
        "seccomp memfd (3) closed, report pipe (4) kept"
    );
    assert_eq!(v["env"], serde_json::json!(["HOSTMEM_SIGSYS_FD=4"]), "{v}");
    drop(stdin);
    assert_eq!(c.wait().unwrap(), ExitInfo::Exited(0));

    for (what, nr, arg0) in [
        ("getppid", libc::SYS_getppid, None),
        ("umask", libc::SYS_umask, Some(0o027u64)),
    ] {
        let cfg = JailConfig {
            seccomp: Some(filter(nr, SeccompAction::KillProcess)),
            ..base()
        };
        let (mut c, v, _stdin) = probe(what, cfg);
        assert_eq!(v, serde_json::Value::Null, "{what} survived: {v}");
        assert_eq!(
            c.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitInfo::Signaled {
                signal: libc::SIGSYS,
                core: false
            }),
            "{what}"
        );
        let f = c.sigsys_finding();
        println!("{what}: {f}");
        // The handler's record: the program's claim, with the arguments.
        let r = f.device_claim.as_ref().expect("the handler's record");
        assert_eq!(r.name, what);
        assert_eq!(r.nr as i64, nr);
        let args = r.args.expect("the handler reports the arguments");
        if let Some(a) = arg0 {
            assert_eq!(args[0], a);
        }
        // The fact: the kernel's audit record (the filter is installed with FLAG_LOG), where
        // the kernel's rate limit let it through.
        match &f.kernel_record {
            Some(k) => {
                assert_eq!(k.name, what, "{f}");
                assert_eq!(f.claim_agrees(), Some(true), "an honest claim: {f}");
            }
            None => println!(
                "{what}: no kernel record here: {:?}",
                f.kernel_record_unavailable.as_deref().expect("a reason")
            ),
        }
    }
}

#[test]
fn log_mode_lets_the_call_through_and_reports_it_with_arguments() {
    let _s = serial();
    if !jail_works() {
        return;
    }
    let cfg = JailConfig {
        namespaces: true,
        ro_binds: loader(),
        seccomp: Some(filter(libc::SYS_umask, SeccompAction::Log)),
        seccomp_log: true,
        ..JailConfig::default()
    };
    let (mut c, v, _stdin) = probe("umask", cfg);
    assert_eq!(v["survived"], "umask", "{v}");
    assert_eq!(v["old"], 0o022, "umask ran and returned the old mask: {v}");
    assert_eq!(c.wait().unwrap(), ExitInfo::Exited(0));
    // The listener thread records the call before it answers, so the record is there.
    let log = c.seccomp_log();
    let r = log
        .iter()
        .find(|r| r.name == "umask")
        .unwrap_or_else(|| panic!("umask not reported: {log:?}"));
    println!("log mode reported: {r}");
    assert_eq!(r.code, 0x7fc0_0000, "reported by the listener");
    assert_eq!(r.args.expect("arguments")[0], 0o027);
    assert!(
        !log.iter()
            .any(|r| r.name == "write" || r.name == "exit_group"),
        "only the logged call is reported: {log:?}"
    );
}

#[test]
fn failures_are_typed_errors_naming_the_step() {
    let _s = serial();
    if !jail_works() {
        return;
    }
    let t0 = Instant::now();
    let step = |cfg: JailConfig| match spawn(cfg) {
        Err(Error::LaunchStep { step, errno }) => (step, errno),
        Err(e) => panic!("untyped error {e}"),
        Ok(_) => panic!("spawn succeeded"),
    };
    let (s, e) = step(JailConfig {
        program: "/no/such/program".into(),
        namespaces: true,
        ..JailConfig::default()
    });
    assert_eq!(
        (s.as_str(), e),
        ("open program /no/such/program", nix::errno::Errno::ENOENT)
    );
    let (s, e) = step(JailConfig {
        program: "/usr/bin/true".into(),
        namespaces: true,
        ro_binds: vec!["/no/such/dir".into()],
        ..JailConfig::default()
    });
    assert_eq!(
        (s.as_str(), e),
        ("lstat bind path /no", nix::errno::Errno::ENOENT)
    );
    // In the child: a limit above the kernel's nr_open, and an exec of a non-executable.
    let (s, e) = step(JailConfig {
        program: "/usr/bin/true".into(),
        namespaces: true,
        rlimits: Rlimits {
            nofile: 1 << 40,
            ..Rlimits::default()
        },
        ..JailConfig::default()
    });
    assert_eq!(s, "setrlimit RLIMIT_NOFILE", "{e}");
    let not_exec = std::env::temp_dir().join(format!("hostmem-jail-noexec-{}", std::process::id()));
    std::fs::write(&not_exec, "data").unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (s, e) = step(JailConfig {
        program: not_exec.clone(),
        namespaces: true,
        ..JailConfig::default()
    });
    assert_eq!((s.as_str(), e), ("execveat", nix::errno::Errno::EACCES));
    std::fs::remove_file(&not_exec).unwrap();
    // And a dynamic binary without its loader in the empty root.
    let (s, e) = step(JailConfig {
        program: "/usr/bin/true".into(),
        namespaces: true,
        ..JailConfig::default()
    });
    assert_eq!((s.as_str(), e), ("execveat", nix::errno::Errno::ENOENT));
    assert!(t0.elapsed() < Duration::from_secs(5), "no hang");
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn fifty_spawns_leak_no_fds_and_spawn_time() {
    let _s = serial();
    if !jail_works() {
        return;
    }
    // Extra fds open in the parent (not CLOEXEC), which must neither reach the children
    // nor be lost.
    let _extra: Vec<OwnedFd> = (0..5).map(|_| nix::unistd::pipe().unwrap().0).collect();
    let before = hostmem_base::procfs::fd_count().unwrap();
    let mut times = vec![];
    for i in 0..50 {
        let marker = hostmem_base::shm::SharedMemory::new("leak-marker", 4096).unwrap();
        let cfg = JailConfig {
            program: "/usr/bin/true".into(),
            keep_fds: vec![(marker.try_clone_fd().unwrap(), 5 + i % 3)],
            namespaces: true,
            ro_binds: loader(),
            seccomp: Some(filter(libc::SYS_getppid, SeccompAction::KillProcess)),
            ..JailConfig::default()
        };
        let t0 = Instant::now();
        let mut c = spawn(cfg).unwrap();
        times.push(t0.elapsed());
        assert_eq!(c.wait().unwrap(), ExitInfo::Exited(0));
    }
    let after = hostmem_base::procfs::fd_count().unwrap();
    assert_eq!(before, after, "fds leaked over 50 spawns");
    let mut plain = vec![];
    for _ in 0..50 {
        let t0 = Instant::now();
        let mut c = spawn(JailConfig {
            program: "/usr/bin/true".into(),
            ..JailConfig::default()
        })
        .unwrap();
        plain.push(t0.elapsed());
        assert_eq!(c.wait().unwrap(), ExitInfo::Exited(0));
    }
    println!(
        "spawn-to-exec p50 over 50: jailed {:?}, plain fork+exec {:?}",
        p50(times),
        p50(plain)
    );
    assert_eq!(before, hostmem_base::procfs::fd_count().unwrap());
}

#[test]
fn spawning_from_a_busy_multithreaded_parent() {
    let _s = serial();
    if !jail_works() {
        return;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let v: Vec<String> = (0..64).map(|i| i.to_string()).collect();
                    n += v.len();
                    log::trace!("{n}");
                }
            })
        })
        .collect();
    for _ in 0..30 {
        let mut c = spawn(JailConfig {
            program: "/usr/bin/true".into(),
            namespaces: true,
            ro_binds: loader(),
            ..JailConfig::default()
        })
        .unwrap();
        assert_eq!(
            c.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitInfo::Exited(0))
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn a_filter_installed_before_exec_binds_a_program_that_installs_none() {
    let _s = serial();
    if !jail_works() {
        return;
    }
    let base = |program: &str, nr: i64| JailConfig {
        program: program.into(),
        namespaces: true,
        ro_binds: loader(),
        seccomp: Some(filter(nr, SeccompAction::KillProcess)),
        seccomp_at_exec: true,
        ..JailConfig::default()
    };
    // The filter is on from the first instruction, and nothing is added to the program's
    // arguments or fds (no --seccomp-fd, no report pipe).
    let mut cfg = base("/usr/bin/sleep", libc::SYS_getppid);
    cfg.args = vec!["5".into()];
    let mut c = spawn(cfg).unwrap();
    let facts = verify_jailed(c.pid()).unwrap();
    assert_eq!(facts.seccomp, 2);
    // The child may not have reached execveat yet (its cmdline is then still ours): wait.
    let want: &[u8] = b"/usr/bin/sleep\x005\x00";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let cmdline = loop {
        let got = std::fs::read(format!("/proc/{}/cmdline", c.pid())).unwrap();
        if got == want || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(cmdline, want, "arguments untouched");
    // The dynamic loader holds libc open for a moment right after the exec, and the fd table
    // is `[0, 1, 2]` just before it opens it too: look only once `sleep` sleeps in
    // clock_nanosleep (or nanosleep), when the loader is done.
    let t0 = std::time::Instant::now();
    while !in_nanosleep(c.pid()) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(in_nanosleep(c.pid()), "sleep never reached its sleep");
    let fds: Vec<(i32, Option<PathBuf>)> = proc_fds(c.pid())
        .into_iter()
        .map(|fd| {
            let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", c.pid())).ok();
            (fd, link)
        })
        .collect();
    assert_eq!(
        fds.iter().map(|(fd, _)| *fd).collect::<Vec<_>>(),
        vec![0, 1, 2],
        "{fds:?}"
    );
    c.kill(libc::SIGKILL);
    c.wait().unwrap();

    // It also binds the dynamic loader: a filter without mprotect (RELRO) kills the program
    // before main.
    let mut c = spawn(base("/usr/bin/true", libc::SYS_mprotect)).unwrap();
    assert_eq!(
        c.wait_timeout(Duration::from_secs(10)).unwrap(),
        Some(ExitInfo::Signaled {
            signal: libc::SIGSYS,
            core: false
        })
    );
    // A filter that allows what it runs: it just runs.
    let mut c = spawn(base("/usr/bin/true", libc::SYS_getppid)).unwrap();
    assert_eq!(c.wait().unwrap(), ExitInfo::Exited(0));

    // Log mode: the launcher's child installs the filter with a listener and hands it over
    // before the exec, so even a program that installs nothing is served: a logged call (here
    // sleep's clock_nanosleep) is let through and reported with its arguments.
    let mut cfg = JailConfig {
        program: "/usr/bin/sleep".into(),
        args: vec!["0.01".into()],
        namespaces: true,
        ro_binds: loader(),
        seccomp: Some(filter(libc::SYS_clock_nanosleep, SeccompAction::Log)),
        seccomp_at_exec: true,
        seccomp_log: true,
        ..JailConfig::default()
    };
    cfg.env = vec![];
    let mut c = spawn(cfg).unwrap();
    assert_eq!(
        c.wait_timeout(Duration::from_secs(10)).unwrap(),
        Some(ExitInfo::Exited(0)),
        "log mode lets the call run"
    );
    let log = c.seccomp_log();
    let r = log
        .iter()
        .find(|r| r.name == "clock_nanosleep")
        .unwrap_or_else(|| panic!("{log:?}"));
    assert!(r.args.is_some(), "the listener reports the arguments: {r}");
    assert_eq!(r.code, 0x7fc0_0000, "a user notification");
}

/// With the SIGSYS reporter asked for, kills become traps and the filter is installed with
/// SECCOMP_FILTER_FLAG_LOG: a call the program's start-up makes before any handler exists
/// still dies by SIGSYS and is named, from the kernel's audit record. The kernel log is
/// rate-limited and shared with everything else on the machine: a missing record counts
/// only if the kernel did not say it suppressed records meanwhile (then: skipped).
#[test]
fn a_trap_before_the_programs_handler_is_named_by_the_kernel() {
    let _s = serial();
    if !jail_works() {
        return;
    }
    if std::fs::File::open("/dev/kmsg").is_err() {
        println!("skipped: /dev/kmsg is not readable here, the kernel's record cannot be read");
        return;
    }
    let mut suppressed = false;
    for _attempt in 0..5 {
        let mut log = kmsg_at_end();
        let mut c = spawn(JailConfig {
            program: "/usr/bin/true".into(),
            namespaces: true,
            ro_binds: loader(),
            seccomp: Some(filter(libc::SYS_mprotect, SeccompAction::KillProcess)),
            seccomp_at_exec: true,
            sigsys_reporter: true,
            ..JailConfig::default()
        })
        .unwrap();
        assert_eq!(
            c.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitInfo::Signaled {
                signal: libc::SIGSYS,
                core: false
            })
        );
        if let Some(r) = c.sigsys_finding().kernel_record {
            assert_eq!(r.name, "mprotect", "{r}");
            assert_eq!(r.code, 0x0003_0000, "a trap: {r}");
            return;
        }
        suppressed |= kmsg_says_suppressed(&mut log);
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        suppressed,
        "no audit record of the trap, and none was suppressed"
    );
    println!("skipped: the kernel suppressed its audit records (rate limit) in every attempt");
}

/// `/dev/kmsg` at the end of the log.
fn kmsg_at_end() -> std::fs::File {
    use std::io::Seek;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .unwrap();
    f.seek(std::io::SeekFrom::End(0)).unwrap();
    f
}

/// Whether the kernel logged that it suppressed records since `f`'s position.
fn kmsg_says_suppressed(f: &mut std::fs::File) -> bool {
    use std::io::Read;
    let mut buf = vec![0u8; 8192];
    let mut seen = false;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen |= String::from_utf8_lossy(&buf[..n]).contains("suppressed"),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    seen
}
