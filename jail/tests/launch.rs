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
