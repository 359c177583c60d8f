//! The jailed launch, checked from outside.

use std::path::PathBuf;
use std::time::Duration;

use hostmem_jail::launch::{spawn, verify_jailed, ExitInfo, JailConfig};

fn stage() -> Option<(PathBuf, Vec<String>)> {
    // The `hostmem` binary provides the stage; cargo builds it for the workspace.
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("hostmem");
    if p.is_file() {
        Some((p, vec!["jail-stage".into()]))
    } else {
        println!("skipped: hostmem binary not built (run `cargo build --bins` or tools/test)");
        None
    }
}

fn loader() -> Vec<PathBuf> {
    ["/lib64", "/lib/x86_64-linux-gnu"]
        .iter()
        .map(PathBuf::from)
        .collect()
}

#[test]
fn true_runs_in_the_jail() {
    let Some(stage) = stage() else { return };
    let cfg = JailConfig {
        stage: Some(stage),
        program: "/usr/bin/true".into(),
        namespaces: true,
        ro_binds: loader(),
        ..JailConfig::default()
    };
    let mut c = spawn(cfg).unwrap();
    let x = c.wait_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(x, Some(ExitInfo::Exited(0)));
}

#[test]
fn sleeping_child_is_jailed() {
    let Some(stage) = stage() else { return };
    let cfg = JailConfig {
        stage: Some(stage),
        program: "/usr/bin/sleep".into(),
        args: vec!["5".into()],
        namespaces: true,
        ro_binds: loader(),
        ..JailConfig::default()
    };
    let mut c = spawn(cfg).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let st = hostmem_base::procfs::status_of(&c.pid().to_string()).unwrap();
    println!("{st:?}");
    let err = verify_jailed(c.pid()).unwrap_err().to_string();
    assert!(
        err.contains("seccomp: 0"),
        "no filter was installed, so not jailed: {err}"
    );
    c.kill(libc::SIGKILL);
    assert_eq!(
        c.wait().unwrap(),
        ExitInfo::Signaled {
            signal: libc::SIGKILL,
            core: false
        }
    );
}

#[test]
fn rust_program_runs_in_the_empty_root() {
    let Some(stage) = stage() else { return };
    let cfg = JailConfig {
        stage: Some(stage.clone()),
        program: stage.0.clone(),
        args: vec!["--version".into()],
        namespaces: true,
        ro_binds: loader(),
        ..JailConfig::default()
    };
    let mut c = spawn(cfg).unwrap();
    // Rust's runtime needs fds 0-2 open: the launcher provides them (/dev/null, stderr).
    assert_eq!(
        c.wait_timeout(Duration::from_secs(10)).unwrap(),
        Some(ExitInfo::Exited(0))
    );
}

fn probe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("hostmem-syscall-probe");
    if p.is_file() {
        Some(p)
    } else {
        println!("skipped: hostmem-syscall-probe not built (tools/test builds it)");
        None
    }
}

fn probe_exit(
    what: &str,
    keep: Vec<(std::os::fd::OwnedFd, i32)>,
    env: Vec<(&str, &str)>,
) -> Option<ExitInfo> {
    let (stage, probe) = (stage()?, probe()?);
    let cfg = JailConfig {
        stage: Some(stage),
        program: probe,
        args: vec![what.into()],
        keep_fds: keep,
        env: env.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        namespaces: true,
        ro_binds: loader(),
        ..JailConfig::default()
    };
    let mut c = spawn(cfg).unwrap();
    Some(
        c.wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("probe exits"),
    )
}

#[test]
fn root_is_empty_but_for_the_loader_and_proc() {
    // lib, lib64 (symlinks), usr (the bind mounts) and proc: nothing else of the host.
    if let Some(x) = probe_exit("count_root", vec![], vec![]) {
        assert_eq!(x, ExitInfo::Exited(4));
    }
}

#[test]
fn only_the_listed_fds_survive() {
    let (r, _w) = nix::unistd::pipe().unwrap();
    let _extra = std::fs::File::open("/proc/self/status").unwrap(); // must not leak in
                                                                    // 0, 1, 2 (always) + the one we keep at 7.
    if let Some(x) = probe_exit("count_fds", vec![(r, 7)], vec![]) {
        assert_eq!(x, ExitInfo::Exited(4));
    }
}

#[test]
fn network_is_unreachable() {
    if let Some(x) = probe_exit("connect_loopback", vec![], vec![]) {
        assert_eq!(x, ExitInfo::Exited(0), "loopback reachable from the jail");
    }
}

#[test]
fn environment_is_only_the_allowed_vars() {
    if let Some(x) = probe_exit("env_count", vec![], vec![("RUST_LOG", "info")]) {
        assert_eq!(x, ExitInfo::Exited(1));
    }
}

#[test]
fn missing_program_is_a_typed_error_naming_the_step() {
    let Some(stage) = stage() else { return };
    let cfg = JailConfig {
        stage: Some(stage),
        program: "/no/such/program".into(),
        namespaces: true,
        ..JailConfig::default()
    };
    let e = spawn(cfg).unwrap_err().to_string();
    assert!(e.contains("opening /no/such/program"), "{e}");
    // A bind mount that does not exist fails in the child, and the step is named.
    let Some(stage) = self::stage() else { return };
    let cfg = JailConfig {
        stage: Some(stage),
        program: "/usr/bin/true".into(),
        namespaces: true,
        ro_binds: vec!["/no/such/dir".into()],
        ..JailConfig::default()
    };
    let e = spawn(cfg).unwrap_err().to_string();
    assert!(e.contains("lstat bind path") && e.contains("ENOENT"), "{e}");
}

#[test]
fn spawning_leaks_no_fds_in_the_parent() {
    let Some(stage) = stage() else { return };
    // Count only fds that point at a memfd made for this test: other tests run in parallel.
    let marker = hostmem_base::shm::SharedMemory::new("leak-marker", 4096).unwrap();
    let mine = || {
        hostmem_base::procfs::open_fds()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.contains("leak-marker"))
            .count()
    };
    assert_eq!(mine(), 1);
    for _ in 0..20 {
        let fd = marker.try_clone_fd().unwrap();
        let cfg = JailConfig {
            stage: Some(stage.clone()),
            program: "/usr/bin/true".into(),
            keep_fds: vec![(fd, 5)],
            namespaces: true,
            ro_binds: loader(),
            seccomp: None,
            ..JailConfig::default()
        };
        let mut c = spawn(cfg).unwrap();
        assert_eq!(c.wait().unwrap(), ExitInfo::Exited(0));
    }
    assert_eq!(
        mine(),
        1,
        "every fd handed to a child was closed in the parent"
    );
}
