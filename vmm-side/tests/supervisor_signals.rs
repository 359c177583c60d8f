//! Both supervisors leave nothing behind (issue 22 item 10): SIGTERM or SIGINT ends
//! `hostmem vhost-user` and `hostmem run` with the device stopped and its socket and memory
//! cgroup removed, with a one-line summary; SIGKILL of the supervisor ends the device
//! (PR_SET_PDEATHSIG after the jail's credential changes); the cgroup a killed supervisor
//! could not remove is removed by the next one at start.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const HOSTMEM: &str = env!("CARGO_BIN_EXE_hostmem");

/// A supervisor process, SIGKILLed (and its device and cgroups cleaned) if a test fails.
struct Supervisor {
    child: Option<Child>,
    out: Option<BufReader<std::process::ChildStdout>>,
}

impl Supervisor {
    fn vhost_user(socket: &Path) -> Supervisor {
        let mut child = Command::new(HOSTMEM)
            .args(["vhost-user", "--socket"])
            .arg(socket)
            .args(["--shmem-size", "16M", "--device-memory", "64M"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("hostmem vhost-user");
        let out = child.stdout.take().map(BufReader::new);
        Supervisor {
            child: Some(child),
            out,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The device pid from the ready line.
    fn ready(&mut self) -> i32 {
        let mut line = String::new();
        self.out
            .as_mut()
            .unwrap()
            .read_line(&mut line)
            .expect("ready line");
        assert!(line.contains("ready on"), "{line:?}");
        let pid = line
            .split("device pid ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no device pid in {line:?}"));
        assert!(alive(pid), "device {pid} runs");
        pid
    }

    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.pid()), s).unwrap();
    }

    /// Waits for the supervisor to exit; its status and the rest of its stdout.
    fn finish(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("the supervisor did not end within 20 s of the signal");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = String::new();
        let _ = self.out.take().unwrap().read_to_string(&mut rest);
        (status, rest)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as i32;
            let _ = c.kill();
            let _ = c.wait();
            for cg in cgroups_of(pid) {
                kill_and_remove(&cg);
            }
        }
    }
}

/// Kills what is left in supervisor `pid`'s device cgroups and removes them (a failed test
/// leaves nothing behind either).
struct CgroupsOf(i32);

impl Drop for CgroupsOf {
    fn drop(&mut self) {
        for cg in cgroups_of(self.0) {
            kill_and_remove(&cg);
        }
    }
}

/// Whether `pid` is a live process (a zombie waiting for its reaper counts as ended).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

fn wait_until(what: &str, t: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < t, "{what} within {t:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The memory cgroups of devices started by supervisor `pid` (`hostmem-device-<pid>-<n>`).
fn cgroups_of(pid: i32) -> Vec<PathBuf> {
    let prefix = format!("hostmem-device-{pid}-");
    let mut found = Vec::new();
    let mut dirs = vec![PathBuf::from("/sys/fs/cgroup/memory")];
    for _ in 0..3 {
        let mut next = Vec::new();
        for d in dirs {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if !p.is_dir() {
                    continue;
                }
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    found.push(p);
                } else {
                    next.push(p);
                }
            }
        }
        dirs = next;
    }
    found
}

fn kill_and_remove(cg: &Path) {
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
    for p in procs.lines().filter_map(|l| l.trim().parse().ok()) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    for _ in 0..100 {
        if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A socket path, removed when the test ends however it ends.
struct SocketPath(PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn socket_path(tag: &str) -> SocketPath {
    SocketPath(std::env::temp_dir().join(format!("hostmem-sig-{tag}-{}.sock", std::process::id())))
}

fn usable() -> bool {
    if !common::jail_works() {
        println!("skipped: the supervisors' jailed device needs user namespaces");
        return false;
    }
    true
}

fn stop_vhost_user_with(sig: Signal) {
    let _g = common::serial();
    if !usable() {
        return;
    }
    let guard = socket_path(sig.as_str());
    let socket = &guard.0;
    let mut sup = Supervisor::vhost_user(socket);
    let dev = sup.ready();
    let cgroups = cgroups_of(sup.pid());
    assert!(socket.exists(), "the socket is there while it serves");
    sup.signal(sig);
    let (status, rest) = sup.finish();
    assert!(
        status.success(),
        "{sig} ends it cleanly: {status:?}, {rest}"
    );
    assert!(
        rest.contains(&format!("stopped by {sig}")) && rest.contains("socket removed"),
        "one summary line: {rest:?}"
    );
    assert!(!alive(dev), "the device {dev} ended with its supervisor");
    assert!(!socket.exists(), "{} removed", socket.display());
    for cg in &cgroups {
        assert!(!cg.exists(), "{} removed", cg.display());
        assert!(
            rest.contains("memory cgroup") && rest.contains("removed"),
            "{rest}"
        );
    }
}

#[test]
fn sigterm_ends_vhost_user_supervisor_device_socket_and_cgroup() {
    stop_vhost_user_with(Signal::SIGTERM);
}

#[test]
fn sigint_ends_vhost_user_supervisor_device_socket_and_cgroup() {
    stop_vhost_user_with(Signal::SIGINT);
}

#[test]
fn a_killed_supervisors_device_dies_and_its_cgroup_is_removed_by_the_next() {
    let _g = common::serial();
    if !usable() {
        return;
    }
    let guard = socket_path("kill");
    let socket = &guard.0;
    let mut first = Supervisor::vhost_user(socket);
    let dev = first.ready();
    let first_pid = first.pid();
    let _clean = CgroupsOf(first_pid);
    let stale = cgroups_of(first_pid);
    first.signal(Signal::SIGKILL);
    let _ = first.finish();
    wait_until(
        "the device of a SIGKILLed supervisor ends",
        Duration::from_secs(10),
        || !alive(dev),
    );
    // A killed supervisor removes nothing: the next one at the same path does.
    let mut second = Supervisor::vhost_user(socket);
    let dev2 = second.ready();
    for cg in &stale {
        assert!(!cg.exists(), "stale {} removed at start", cg.display());
    }
    second.signal(Signal::SIGTERM);
    let (status, _) = second.finish();
    assert!(status.success());
    assert!(!alive(dev2));
    assert!(!socket.exists());
}

/// `hostmem run` with far more blobs than a test waits for (a signal ends it).
fn long_run() -> Command {
    let mut c = Command::new(HOSTMEM);
    c.args([
        "run",
        "--blobs",
        "1000000",
        "--json",
        "--device-memory",
        "64M",
    ]);
    c
}

#[test]
fn sigterm_ends_hostmem_run_with_its_device_and_cgroup() {
    let _g = common::serial();
    if !usable() || !common::kvm() {
        return;
    }
    let mut child = long_run()
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("hostmem run");
    let pid = child.id() as i32;
    let _clean = CgroupsOf(pid);
    let mut sup = Supervisor {
        child: None,
        out: None,
    };
    // The device is up when its cgroup has a process.
    let mut dev = 0;
    wait_until(
        "hostmem run's device starts",
        Duration::from_secs(30),
        || {
            dev = cgroups_of(pid)
                .iter()
                .filter_map(|cg| std::fs::read_to_string(cg.join("cgroup.procs")).ok())
                .find_map(|p| p.lines().next().and_then(|l| l.trim().parse().ok()))
                .unwrap_or(0);
            dev != 0
        },
    );
    let cgroups = cgroups_of(pid);
    std::thread::sleep(Duration::from_millis(500));
    sup.out = child.stdout.take().map(BufReader::new);
    sup.child = Some(child);
    sup.signal(Signal::SIGTERM);
    let (status, out) = sup.finish();
    let report: serde_json::Value = serde_json::from_str(&out).expect("the report, as JSON");
    assert_eq!(report["stopped_by"], "SIGTERM", "{out}");
    assert_eq!(status.code(), Some(1), "a stopped run is not a passing run");
    assert!(
        report["errors"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x == "stopped by SIGTERM")),
        "{out}"
    );
    assert!(!alive(dev), "the device {dev} ended with the run");
    assert!(!cgroups.is_empty(), "the device had a memory cgroup");
    for cg in &cgroups {
        assert!(!cg.exists(), "{} removed", cg.display());
    }
}

/// SIGUSR1 to `hostmem run --screenshot` is a screenshot request between guest events, not
/// a stop: the run takes it (logs it; mid-workload there is no frame yet), goes on, and a
/// SIGTERM still ends it as a stop.
#[test]
fn sigusr1_asks_hostmem_run_for_a_screenshot_and_the_run_goes_on() {
    let _g = common::serial();
    if !usable() || !common::kvm() {
        return;
    }
    let shot = std::env::temp_dir().join(format!("hostmem-sigusr1-{}.png", std::process::id()));
    let mut child = long_run()
        .arg("--screenshot")
        .arg(&shot)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hostmem run");
    let pid = child.id() as i32;
    let _clean = CgroupsOf(pid);
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().map(BufReader::new).unwrap();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            if line.contains("SIGUSR1") && tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut sup = Supervisor {
        child: None,
        out: child.stdout.take().map(BufReader::new),
    };
    sup.child = Some(child);
    wait_until(
        "hostmem run's device starts",
        Duration::from_secs(30),
        || !cgroups_of(pid).is_empty(),
    );
    std::thread::sleep(Duration::from_millis(500));
    sup.signal(Signal::SIGUSR1);
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the run logs the SIGUSR1 request");
    assert!(
        line.contains("no frame on scanout 0 yet") || line.contains("screenshot written"),
        "{line}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(pid), "SIGUSR1 is not a stop");
    sup.signal(Signal::SIGTERM);
    let (status, out) = sup.finish();
    let report: serde_json::Value = serde_json::from_str(&out).expect("the report, as JSON");
    assert_eq!(report["stopped_by"], "SIGTERM", "{out}");
    assert_eq!(status.code(), Some(1));
    let _ = std::fs::remove_file(&shot);
}
