//! The hostile device as a separate process, started by the real VMM code (`Device::start`,
//! the host-side virtio driver `QueueDriver`, the mapping service, `run::run`) in place of the
//! real device.
//! One scenario per test; the device attacks on the guest's second MAP_BLOB (the first one
//! gives the overlap attack a live placement to aim at).
//!
//! For every scenario: the VMM answers with an error (the guest's command fails, the refusal
//! is counted) or takes the protocol error and goes on, or declares the device lost, stops
//! it and a restarted device works; no thread of the VMM panics; the window's mappings in
//! `/proc/self/maps` equal the VMM's placement table; the VMM's fd count is back to its
//! baseline; and with KVM a real vCPU reads the right bytes (blob patterns, zeros after
//! unmap or device death). A watchdog turns a hung VMM into a failure.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hostmem_base::kvm::Vm;
use hostmem_base::procfs::{fd_count, open_fds};
use hostmem_device::backend::shm::{encode_stream, pattern_bytes, ShmOp};
use hostmem_device::wire::{
    Command, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE, VIRTIO_GPU_BLOB_MEM_HOST3D,
};
use hostmem_vmm::device::{Device, DeviceConfig, DEFAULT_DEVICE_MEMORY};
use hostmem_vmm::hostmem::{Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA};
use hostmem_vmm::probe::{expected_hash, GuestProbe, ProbeRead};
use hostmem_vmm::queue_driver::{CmdError, QueueDriver};
use hostmem_vmm::run::{run, Restart, RunOptions};

const P: u64 = 4096;
const WINDOW: u64 = 16 << 20;
const CTX: u32 = 1;
/// How long the stand-in guest waits for one command before declaring the device hung.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(1500);
/// A scenario that takes longer than this means the VMM hung.
const WATCHDOG: Duration = Duration::from_secs(60);

/// The scenarios compare the process-wide fd count: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Panics in VMM threads (the mapping service), counted by a panic hook.
static VMM_PANICS: AtomicUsize = AtomicUsize::new(0);

/// The VMM's warnings and errors, kept so that a scenario can check it logged one clear line
/// (and the first [`ECHO_LIMIT`] of each scenario passed on to stderr).
static LOG: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
/// Lines of the running scenario passed on to stderr so far (reset by [`serial`]).
static ECHOED: AtomicUsize = AtomicUsize::new(0);
/// A flood scenario logs a refusal per bogus event (thousands); its output shows the first
/// ones, the checks see them all.
const ECHO_LIMIT: usize = 20;

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}: {}", r.level(), r.target(), r.args());
            match ECHOED.fetch_add(1, Ordering::Relaxed) {
                n if n < ECHO_LIMIT => eprintln!("{line}"),
                ECHO_LIMIT => eprintln!("… further lines of this scenario are checked, not shown"),
                _ => {}
            }
            LOG.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    }
    fn flush(&self) {}
}

/// Log lines since line `from` that contain `what`.
fn logged_since(from: usize, what: &str) -> Vec<String> {
    LOG.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .skip(from)
        .filter(|l| l.contains(what))
        .cloned()
        .collect()
}

/// Log lines so far.
fn log_len() -> usize {
    LOG.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// Log lines so far that contain `what`.
fn logged(what: &str) -> usize {
    LOG.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|l| l.contains(what))
        .count()
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        static CAPTURE: Capture = Capture;
        let _ = log::set_logger(&CAPTURE);
        log::set_max_level(log::LevelFilter::Warn);
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().map(str::to_string);
            if name.is_some_and(|n| n.starts_with("mapping-service")) {
                VMM_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    ECHOED.store(0, Ordering::Relaxed);
    guard
}

/// Runs `f` under a watchdog: a VMM that hangs fails the whole binary with a clear line
/// instead of hanging the suite.
fn with_watchdog(name: &'static str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(()) => t.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The scenario panicked: re-raise its failure.
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            eprintln!("hostile scenario {name}: the VMM hung for {WATCHDOG:?}");
            std::process::exit(101);
        }
    }
}

struct Vmm {
    hm: Arc<Hostmem>,
    probe: Option<GuestProbe>,
    /// Fds of the VMM once the window (and VM, probe) exist.
    baseline_fds: usize,
    /// Start the device in the jail (namespaces, empty root, seccomp).
    jailed: bool,
    /// Another policy than the real shm one (the loose-policy fd attacks).
    policy: Option<PathBuf>,
    /// The device's memory limit (default [`DEFAULT_DEVICE_MEMORY`]).
    memory: Option<u64>,
}

fn vmm(name: &str) -> Vmm {
    let vm = match Vm::available() {
        Ok(()) => Some(Arc::new(Vm::open().unwrap())),
        Err(why) => {
            println!("skipped: /dev/kvm unusable ({why}): no guest probe in scenario {name}");
            None
        }
    };
    let hm = Arc::new(
        Hostmem::new(
            WINDOW,
            vm.clone(),
            DEFAULT_WINDOW_GPA,
            Mode::Fixed,
            Limits::default(),
        )
        .unwrap(),
    );
    let probe = vm.map(|vm| GuestProbe::new(vm, DEFAULT_WINDOW_GPA, WINDOW, 8 << 20).unwrap());
    Vmm {
        hm,
        probe,
        baseline_fds: fd_count().unwrap(),
        jailed: false,
        policy: None,
        memory: Some(DEFAULT_DEVICE_MEMORY),
    }
}

/// True if the device can be jailed here (user namespaces).
fn jail_works() -> bool {
    std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim() != "0")
        .unwrap_or(false)
}

/// The hostile device, attacking on the guest's second MAP_BLOB. `once`: a file that only
/// the first device can create (so that `run::run`'s restarted device behaves). Jailed under
/// the real shm policy, or unjailed: the fd attacks need sockets, pipes and /dev/zero, which
/// the jail forbids.
fn config(scenario: &str, once: Option<&Path>, jailed: bool) -> DeviceConfig {
    let mut pre_args: Vec<String> = vec![
        "--scenario".into(),
        scenario.into(),
        "--attack-on".into(),
        "2".into(),
    ];
    if let Some(p) = once {
        pre_args.extend(["--once".into(), p.display().to_string()]);
    }
    DeviceConfig {
        program: PathBuf::from(env!("CARGO_BIN_EXE_hostmem-hostile-device")),
        pre_args,
        extra_args: vec![],
        backend: hostmem_device::backend::BackendKind::Shm,
        jailed,
        policy: jailed.then(|| hostmem_vmm::policy::default_dir().join("gpu_device_shm.policy")),
        seccomp_log: false,
        ro_binds: if jailed {
            hostmem_vmm::policy::loader_ro_binds()
        } else {
            vec![]
        },
        log_filter: Some(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())),
        // Short, so that the silent-device scenarios take seconds; a good device is ready in
        // milliseconds.
        start_timeout: Duration::from_secs(3),
        render_server: None,
        memory_limit: Some(DEFAULT_DEVICE_MEMORY),
        device_cpus: vec![],
        service_cpus: vec![],
        idle_poll_max: None,
    }
}

struct Session {
    dev: Device,
    drv: QueueDriver,
}

fn connect(v: &Vmm, scenario: &str) -> Session {
    let mut cfg = config(scenario, None, v.jailed);
    if v.jailed {
        if let Some(p) = &v.policy {
            cfg.policy = Some(p.clone());
        }
    }
    cfg.memory_limit = v.memory;
    let dev = Device::start(&cfg, v.hm.clone()).unwrap();
    if v.jailed {
        assert!(
            dev.facts().jailed && dev.facts().seccomp == 2,
            "{:?}",
            dev.facts()
        );
    }
    let mut drv = QueueDriver::new(dev.transport(), &v.hm).unwrap();
    drv.set_timeout(COMMAND_TIMEOUT).unwrap();
    drv.ctx_create(CTX, 0).unwrap();
    Session { dev, drv }
}

/// Creates blob `res` of `size` bytes filled by the renderer; returns its bytes.
fn blob(s: &mut Session, res: u32, size: u64) -> Vec<u8> {
    s.drv.create_blob(CTX, res, 0, size).unwrap();
    let seed = u64::from(res) * 7919;
    let fill = encode_stream(&[ShmOp::Fill {
        resource_id: res,
        offset: 0,
        len: size,
        seed,
    }]);
    s.drv.submit_3d(CTX, fill).unwrap();
    pattern_bytes(seed, 0, size as usize)
}

impl Vmm {
    /// The window's mappings equal the placement table: background everywhere else.
    fn consistent(&self, when: &str) {
        if let Err(e) = self.hm.audit() {
            panic!("{when}: {e:#}");
        }
    }

    /// With KVM, the guest reads exactly `expected` at `offset`.
    fn guest_reads(&mut self, offset: u64, expected: &[u8], what: &str) {
        let Some(p) = self.probe.as_mut() else { return };
        match p.hash(offset, expected.len() as u64).unwrap() {
            ProbeRead::Value(h) => assert_eq!(h, expected_hash(expected), "guest: {what}"),
            hole => panic!("guest hit {hole:?}: {what}"),
        }
    }

    fn guest_zeros(&mut self, offset: u64, len: u64, what: &str) {
        self.guest_reads(offset, &vec![0u8; len as usize], what);
    }

    /// After the device is gone: no placement left, the table equals the maps, fds back to
    /// the baseline, no VMM thread panicked.
    fn clean(&self, when: &str) {
        assert_eq!(self.hm.live(), 0, "{when}: placements survived the device");
        self.consistent(when);
        let now = fd_count().unwrap();
        assert_eq!(
            now,
            self.baseline_fds,
            "{when}: VMM fds not back to baseline: {:?}",
            open_fds().unwrap()
        );
        assert_eq!(
            VMM_PANICS.load(Ordering::SeqCst),
            0,
            "a VMM thread panicked"
        );
    }
}

/// What the VMM must do with the attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The event is refused with a reply: the guest's MAP_BLOB fails, `refused` counts it,
    /// and the reason the device got names the check that must refuse it (not merely the
    /// last check, that the guest asked for something else).
    Refused(&'static str),
    /// A message that is not a valid event: this many protocol errors, no reply; the device's
    /// next (good) event is served, so the guest's MAP_BLOB succeeds.
    ProtocolErrors(u64),
    /// This many bogus events, each refused with a reply; then the good one succeeds.
    Flood(u64),
    /// The device is declared lost (timeout, hang-up, bad tag): stopped, window restored,
    /// restarted, and the restarted device works.
    Lost,
    /// The guest gets an unparsable response: that command fails, the device keeps serving.
    BadResponse,
    /// Responses out of order: the driver matches them by descriptor; everything succeeds.
    Ok,
    /// A valid placement no guest command asked for: the VMM cannot know (the commands are
    /// in the device's virtqueues) and accepts it; the guest sees the blob; it is restored
    /// to background when the device ends.
    Accepted,
    /// Attacker code on the fds the device holds, then good behaviour: the guest's command
    /// succeeds (the device fails it if an operation that must fail succeeded), the guest
    /// reads the blob; then the device is stopped and the VMM must restore its window
    /// (a read/write mapping of the window memfd) and serve a restarted device.
    Survives,
    /// The jail's policy kills the device for this syscall (SIGSYS, named by the VMM from
    /// the kernel's record; the device's own record agrees); the device is lost, the window
    /// restored, a restarted device works.
    KilledBySeccomp(&'static str),
    /// As [`Verdict::KilledBySeccomp`] for `call`, but the device wrote a forged record
    /// claiming `claim` to its SIGSYS pipe: the VMM names `call` (the kernel's word) and
    /// shows `claim` only as the device's claim, with a warning that the two disagree.
    KilledBySeccompForging {
        call: &'static str,
        claim: &'static str,
    },
    /// The kernel's OOM killer kills the device at its memory limit; the VMM reports it as
    /// out of memory, restores the window and a restarted device works.
    OomKilled,
}

/// A death by SIGSYS as the VMM reports it (the exit's JSON, as in `hostmem run --json`):
/// `call` named by the kernel's audit record, or, where that record cannot be read here,
/// no call named at all (`syscall` and `kernel_record` null, with the reason). The device's
/// SIGSYS record is only `device_claim`: `call` for an honest device, `forged` for a lying
/// one, whose lie appears nowhere as the fact and is warned about when the kernel's record
/// contradicts it.
fn killed_by_seccomp(
    name: &str,
    exit: &hostmem_vmm::device::DeviceExit,
    call: &str,
    forged: Option<&str>,
    log0: usize,
) {
    assert_eq!(exit.signal, Some(libc::SIGSYS), "{name}: {exit:?}");
    let j = serde_json::to_value(exit).unwrap();
    let ended: Vec<String> = logged_since(log0, " ended (");
    let ended = ended.last().cloned().unwrap_or_default();
    let kernel = !j["kernel_record"].is_null();
    if kernel {
        assert_eq!(j["kernel_record"]["name"], call, "{name}: {j}");
        let named = j["syscall"].as_str().unwrap_or_default();
        assert!(named.starts_with(call), "{name}: named {named:?}: {j}");
        assert!(
            ended.contains(&format!("seccomp: {call} (nr ")),
            "{name}: {ended}"
        );
    } else {
        // No fact here (no /dev/kmsg, or the kernel's rate limit dropped the record): the
        // call is unknown, and the device's word is not promoted to it.
        assert!(
            j["syscall"].is_null(),
            "{name}: named without the kernel: {j}"
        );
        let why = j["kernel_record_unavailable"].as_str();
        assert!(why.is_some_and(|w| !w.is_empty()), "{name}: no reason: {j}");
        assert!(
            ended.contains("seccomp: syscall unknown"),
            "{name}: {ended}"
        );
        println!(
            "{name}: the kernel's record is unavailable here: {}",
            why.unwrap()
        );
    }
    match forged {
        None => assert_eq!(j["device_claim"]["name"], call, "{name}: {j}"),
        Some(lie) => {
            assert_eq!(
                j["device_claim"]["name"], lie,
                "{name}: the claim is kept: {j}"
            );
            assert_eq!(j["device_claim"]["ip"], 0x4141_4141_4141u64, "{name}: {j}");
            let as_fact = format!("{lie} (nr ");
            assert!(
                !j["syscall"].as_str().unwrap_or_default().contains(&as_fact),
                "{name}: the device's claim reported as the fact: {j}"
            );
            for v in j["seccomp_violations"].as_array().unwrap() {
                let v = v.as_str().unwrap_or_default();
                assert!(
                    !v.contains(&as_fact),
                    "{name}: the claim as a violation: {j}"
                );
            }
            assert!(
                ended.contains(&format!("its own claim disagrees: {lie} (nr "))
                    || ended.contains(&format!("its own claim, unverified: {lie} (nr ")),
                "{name}: the claim shown as a claim: {ended}"
            );
            if kernel {
                let warned = logged_since(log0, "disagrees with the kernel");
                assert_eq!(warned.len(), 1, "{name}: one warning: {warned:?}");
                assert!(warned[0].contains(&as_fact), "{name}: {warned:?}");
            }
        }
    }
}

fn scenario(name: &'static str, verdict: Verdict) {
    let _serial = serial();
    with_watchdog(name, move || scenario_body(name, verdict, false));
}

/// The same attack from a device in the real jail under the real shm policy.
fn scenario_jailed(name: &'static str, verdict: Verdict) {
    let _serial = serial();
    if !jail_works() {
        println!("skipped: user namespaces unavailable, jailed scenario {name} not run");
        return;
    }
    with_watchdog(name, move || scenario_body(name, verdict, true));
}

/// A jailed scenario with another policy folder and memory limit.
fn scenario_jailed_with(
    name: &'static str,
    verdict: Verdict,
    policy: Option<PathBuf>,
    memory: Option<u64>,
) {
    let _serial = serial();
    if !jail_works() {
        println!("skipped: user namespaces unavailable, jailed scenario {name} not run");
        return;
    }
    with_watchdog(name, move || {
        scenario_body_with(name, verdict, true, policy, memory)
    });
}

fn scenario_body(name: &'static str, verdict: Verdict, jailed: bool) {
    scenario_body_with(name, verdict, jailed, None, Some(DEFAULT_DEVICE_MEMORY));
}

fn scenario_body_with(
    name: &'static str,
    verdict: Verdict,
    jailed: bool,
    policy: Option<PathBuf>,
    memory: Option<u64>,
) {
    let mut v = vmm(name);
    v.jailed = jailed;
    v.policy = policy;
    v.memory = memory;
    let mut s = connect(&v, name);
    let a = blob(&mut s, 1, 4 * P);
    s.drv.map_blob(CTX, 1, 0).unwrap();
    v.guest_reads(0, &a, "first blob");
    let b = blob(&mut s, 2, 4 * P);
    let before = v.hm.counters();
    let (refusals0, protocol0) = (logged("refused map"), logged("mapping tube:"));
    let log0 = log_len();

    // The attack, on the guest's second MAP_BLOB.
    let result = if verdict == Verdict::Ok {
        // Two commands in flight: the device answers the second first.
        let tag_map = s.drv.submit_map(CTX, 2, 16 * P).unwrap();
        let create = Command::create_blob(
            CTX,
            3,
            VIRTIO_GPU_BLOB_MEM_HOST3D,
            VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
            0,
            4 * P,
        );
        let tag_create = s.drv.submit(&create.encode()).unwrap();
        let r = s.drv.wait_map(tag_map).map(drop);
        s.drv.wait_ok(tag_create).unwrap();
        r
    } else {
        s.drv.map_blob(CTX, 2, 16 * P).map(drop)
    };
    let after = v.hm.counters();
    let (refusals, protocol) = (
        logged("refused map") - refusals0,
        logged("mapping tube:") - protocol0,
    );
    v.consistent(&format!("{name}: after the attack"));
    assert_eq!(
        VMM_PANICS.load(Ordering::SeqCst),
        0,
        "a VMM thread panicked"
    );

    match verdict {
        Verdict::Refused(why) => {
            // The VMM's log line names the check that refused the event.
            let lines = logged_since(log0, "refused map");
            assert!(
                lines.iter().any(|l| l.contains(why)),
                "{name}: refused for the wrong reason: {lines:?}, expected {why:?}"
            );
            assert!(
                matches!(result, Err(CmdError::Device(_))),
                "{name}: the guest must get an error response, got {result:?}"
            );
            assert!(
                after.refused > before.refused,
                "{name}: the VMM did not refuse the event ({before:?} -> {after:?})"
            );
            assert_eq!(after.maps_ok, before.maps_ok, "{name}: nothing mapped");
            assert_eq!(refusals, 1, "{name}: one log line for the refusal");
            assert_eq!(v.hm.live(), 1);
            v.guest_zeros(16 * P, 4 * P, "refused placement not visible");
            // The device goes on serving: the same blob maps fine now.
            s.drv.map_blob(CTX, 2, 16 * P).unwrap();
            v.guest_reads(16 * P, &b, "blob 2 after the refusal");
        }
        Verdict::ProtocolErrors(n) => {
            result.unwrap_or_else(|e| panic!("{name}: the good event after the bad one: {e}"));
            assert_eq!(
                after.protocol_errors - before.protocol_errors,
                n,
                "{name}: protocol errors counted"
            );
            assert_eq!(after.refused, before.refused, "{name}: nothing to refuse");
            assert_eq!(
                protocol as u64, n,
                "{name}: one log line per protocol error"
            );
            v.guest_reads(16 * P, &b, "blob 2 after the protocol error");
        }
        Verdict::Flood(n) => {
            result.unwrap_or_else(|e| panic!("{name}: the good event after the flood: {e}"));
            assert_eq!(after.refused - before.refused, n, "{name}: each refused");
            // Each answered and counted, logged the 1st, 2nd, 4th, … time only.
            let lines = logged_since(log0, "refused unmap").len();
            assert_eq!(
                lines,
                (64 - n.leading_zeros()) as usize,
                "{name}: log lines"
            );
            assert_eq!(
                v.hm.warnings().get("unmap refused: invalid parameter"),
                Some(&n),
                "{name}: counted by kind"
            );
            v.guest_reads(16 * P, &b, "blob 2 after the flood");
        }
        Verdict::BadResponse => {
            assert!(
                matches!(result, Err(CmdError::BadResponse(_))),
                "{name}: {result:?}"
            );
        }
        Verdict::Ok => {
            result.unwrap_or_else(|e| panic!("{name}: out-of-order responses: {e}"));
            v.guest_reads(16 * P, &b, "blob 2 answered out of order");
        }
        Verdict::Accepted => {
            result.unwrap_or_else(|e| panic!("{name}: the unsolicited placement: {e}"));
            assert_eq!(after.maps_ok, before.maps_ok + 1, "{name}: accepted");
            assert_eq!(after.refused, before.refused, "{name}: nothing refused");
            assert_eq!(v.hm.live(), 2);
            v.guest_reads(16 * P, &b, "the unsolicited placement is visible");
        }
        Verdict::Survives
        | Verdict::KilledBySeccomp(_)
        | Verdict::KilledBySeccompForging { .. }
        | Verdict::OomKilled
        | Verdict::Lost => {
            let cause = match verdict {
                Verdict::Survives => {
                    result.unwrap_or_else(|e| panic!("{name}: after the fd attack: {e}"));
                    v.guest_reads(16 * P, &b, "blob 2 after the fd attack");
                    v.guest_reads(0, &a, "blob 1 after the fd attack");
                    if let Some(p) = v.probe.as_mut() {
                        // The guest still writes anywhere in the window (background).
                        p.fill(48 * P, 4 * P, 77).unwrap();
                        p.fill(48 * P, 4 * P, 0).unwrap();
                    }
                    "stopped after the fd attack".to_string()
                }
                _ => {
                    let err = result.expect_err("the device must be declared lost");
                    assert!(err.device_lost(), "{name}: {err} must mean device lost");
                    err.to_string()
                }
            };
            let Session { dev, drv } = s;
            drop(drv);
            let t = std::time::Instant::now();
            let ended = logged(" ended (");
            let oom_lines = logged("out of memory: killed by the kernel's OOM killer");
            let exit = dev.stop(&cause);
            match verdict {
                Verdict::KilledBySeccomp(call) => killed_by_seccomp(name, &exit, call, None, log0),
                Verdict::KilledBySeccompForging { call, claim } => {
                    killed_by_seccomp(name, &exit, call, Some(claim), log0)
                }
                Verdict::OomKilled => {
                    assert_eq!(exit.signal, Some(libc::SIGKILL), "{name}: {exit:?}");
                    assert!(exit.oom_killed, "{name}: {exit:?}");
                    assert!(exit.cause.contains("out of memory"), "{name}: {exit:?}");
                    assert_eq!(
                        logged("out of memory: killed by the kernel's OOM killer") - oom_lines,
                        1,
                        "{name}: the VMM logs the OOM kill by name"
                    );
                    let limit = v.memory.unwrap_or(0);
                    assert!(
                        exit.max_memory <= limit && exit.max_memory + (4 << 20) >= limit,
                        "{name}: the group peaked at {} of {limit}",
                        exit.max_memory
                    );
                }
                Verdict::Survives => {
                    assert!(
                        !exit.oom_killed && exit.signal != Some(libc::SIGSYS),
                        "{exit:?}"
                    )
                }
                _ => {}
            }
            assert_eq!(
                logged(" ended (") - ended,
                1,
                "{name}: one line for the device's end"
            );
            // 2 s of grace for a clean exit, then SIGKILL: stopping must never wait on the
            // device (a full tube, a child that keeps the tube open).
            assert!(
                t.elapsed() < Duration::from_secs(8),
                "{name}: stopping the device took {:?}",
                t.elapsed()
            );
            assert!(
                exit.code.is_some() || exit.signal.is_some(),
                "{name}: {exit:?}"
            );
            if verdict == Verdict::Lost {
                // Lost to its own misbehaviour, not killed by its seccomp policy.
                assert!(
                    exit.signal != Some(libc::SIGSYS) && exit.syscall.is_none(),
                    "{name}: {exit:?}"
                );
            }
            v.clean(&format!("{name}: after the device was stopped"));
            v.guest_zeros(0, 4 * P, "blob 1 gone with the device");
            v.guest_zeros(16 * P, 4 * P, "blob 2 gone with the device");
            // Restart with a device that behaves; it must work.
            s = connect(&v, "none");
            let a2 = blob(&mut s, 1, 4 * P);
            s.drv.map_blob(CTX, 1, 0).unwrap();
            v.guest_reads(0, &a2, "blob 1 from the restarted device");
            let b2 = blob(&mut s, 2, 4 * P);
            s.drv.map_blob(CTX, 2, 16 * P).unwrap();
            v.guest_reads(16 * P, &b2, "blob 2 from the restarted device");
        }
    }

    // Whatever happened, the device (or its successor) still serves and unmaps correctly.
    let c = blob(&mut s, 5, 8 * P);
    s.drv.map_blob(CTX, 5, 32 * P).unwrap();
    v.guest_reads(32 * P, &c, "blob 5");
    v.consistent(&format!("{name}: end"));
    s.drv.unmap_blob(CTX, 5).unwrap();
    v.guest_zeros(32 * P, 8 * P, "after unmap");
    let Session { dev, drv } = s;
    drop(drv);
    let ended = logged(" ended (");
    let exit = dev.finish("scenario finished");
    assert_eq!(
        exit.code,
        Some(0),
        "{name}: the device exits cleanly: {exit:?}"
    );
    // A normal end is not a warning (this log keeps warn and above).
    assert_eq!(
        logged(" ended (") - ended,
        0,
        "{name}: a clean end logged at warn"
    );
    v.clean(&format!("{name}: end"));
    v.guest_zeros(0, WINDOW, "the whole window is background again");
}

macro_rules! scenarios {
    ($($test:ident: $name:literal => $verdict:expr;)*) => {
        $(
            #[test]
            fn $test() {
                scenario($name, $verdict);
            }
        )*
    };
}

scenarios! {
    placement_outside_the_window: "outside-window" => Verdict::Refused("is outside 0..");
    placement_ending_past_the_window: "end-past-window" => Verdict::Refused("is outside 0..");
    placement_offset_plus_len_overflows: "overflow" => Verdict::Refused("is outside 0..");
    placement_misaligned: "misaligned" => Verdict::Refused("not page-aligned");
    placement_zero_length: "zero-length" => Verdict::Refused("zero length");
    placement_overlapping_a_live_one: "overlap" => Verdict::Refused("overlaps live placement");
    placement_with_prot_exec: "exec" => Verdict::Refused("not allowed");
    placement_for_a_resource_no_command_asked_for: "unrequested" => Verdict::Accepted;
    placement_of_a_live_resource_id_again: "same-resource-twice" => Verdict::Refused("is already placed");
    fd_is_a_socket: "socket" => Verdict::Refused("not a regular mappable file");
    fd_is_a_directory: "directory" => Verdict::Refused("not a regular mappable file");
    fd_is_a_pipe: "pipe" => Verdict::Refused("not a regular mappable file");
    fd_is_dev_zero: "dev-zero" => Verdict::Refused("not a regular mappable file");
    fd_is_a_short_memfd: "short-memfd" => Verdict::Refused("placement needs");
    fd_can_shrink_and_is_truncated_after_sending: "unsealed-truncate" => Verdict::Refused("F_SEAL_SHRINK");
    fd_is_guest_ram_given_by_the_vmm: "guest-ram-as-blob" => Verdict::Refused("the VMM's own guest RAM");
    fd_is_the_window_memfd_given_by_the_vmm: "window-as-blob" => Verdict::Refused("the VMM's own window memfd");
    fd_is_a_read_only_reopen_of_the_blob: "read-only-reopen" => Verdict::Refused("opened O_RDONLY");
    fd_is_an_o_path_reopen_of_the_blob: "path-reopen" => Verdict::Refused("O_PATH");
    map_without_its_fd: "no-fd" => Verdict::ProtocolErrors(1);
    map_with_two_fds: "two-fds" => Verdict::ProtocolErrors(1);
    malformed_json: "malformed" => Verdict::ProtocolErrors(1);
    oversized_message: "oversized" => Verdict::ProtocolErrors(1);
    hello_and_ready_mid_stream: "unexpected" => Verdict::ProtocolErrors(2);
    flood_of_bogus_events: "flood" => Verdict::Flood(5000);
    flood_without_reading_replies: "flood-unread" => Verdict::Lost;
    reply_that_never_comes: "no-reply" => Verdict::Lost;
    response_for_an_unknown_tag: "unknown-tag" => Verdict::Lost;
    response_without_a_tag: "untagged" => Verdict::Lost;
    garbage_response: "garbage-response" => Verdict::BadResponse;
    responses_out_of_order: "reorder" => Verdict::Ok;
    device_exits_after_sending_a_placement: "exit-after-place" => Verdict::Lost;
    tube_closed_mid_message: "close-mid-message" => Verdict::Lost;
    device_hangs_and_a_forked_child_holds_the_tube: "fork-hold" => Verdict::Lost;
}

macro_rules! jailed_scenarios {
    ($($test:ident: $name:literal => $verdict:expr;)*) => {
        $(
            #[test]
            fn $test() {
                scenario_jailed($name, $verdict);
            }
        )*
    };
}

// The attacks a device can make from inside the jail, under gpu_device_shm.policy: the
// VMM's answers must be the same as for the unjailed device (and the policy must not be
// what stops them: a SIGSYS would show up as a lost device, failing the refusal cases).
jailed_scenarios! {
    jailed_placement_outside_the_window: "outside-window" => Verdict::Refused("is outside 0..");
    jailed_placement_misaligned: "misaligned" => Verdict::Refused("not page-aligned");
    jailed_placement_overlapping_a_live_one: "overlap" => Verdict::Refused("overlaps live placement");
    jailed_placement_with_prot_exec: "exec" => Verdict::Refused("not allowed");
    jailed_placement_unrequested: "unrequested" => Verdict::Accepted;
    jailed_placement_of_a_live_resource_id_again: "same-resource-twice" => Verdict::Refused("is already placed");
    jailed_fd_is_a_short_memfd: "short-memfd" => Verdict::Refused("placement needs");
    jailed_fd_can_shrink_and_is_truncated: "unsealed-truncate" => Verdict::Refused("F_SEAL_SHRINK");
    jailed_fd_is_guest_ram_given_by_the_vmm: "guest-ram-as-blob" => Verdict::Refused("the VMM's own guest RAM");
    jailed_fd_is_the_window_memfd_given_by_the_vmm: "window-as-blob" => Verdict::Refused("the VMM's own window memfd");
    jailed_malformed_json: "malformed" => Verdict::ProtocolErrors(1);
    jailed_oversized_message: "oversized" => Verdict::ProtocolErrors(1);
    jailed_flood_of_bogus_events: "flood" => Verdict::Flood(5000);
    jailed_reply_that_never_comes: "no-reply" => Verdict::Lost;
    jailed_tube_closed_mid_message: "close-mid-message" => Verdict::Lost;
    jailed_flood_without_reading_replies: "flood-unread" => Verdict::Lost;
    jailed_response_for_an_unknown_tag: "unknown-tag" => Verdict::Lost;
    jailed_device_exits_after_sending_a_placement: "exit-after-place" => Verdict::Lost;
}

/// A device that fails the start (no hello, a hello of another version or of the VMM's own
/// role, an event instead of Ready): `Device::start` refuses it promptly, kills and reaps it,
/// and leaves nothing behind.
fn refused_at_start(name: &'static str) {
    let _serial = serial();
    with_watchdog(name, move || {
        let v = vmm(name);
        let t = std::time::Instant::now();
        let err = Device::start(&config(name, None, false), v.hm.clone())
            .expect_err("the device must be refused");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name}: refusing took {:?}",
            t.elapsed()
        );
        let chain = format!("{err:#}");
        assert!(chain.contains("failed to start"), "{name}: {chain}");
        v.clean(name);
        // And a good device starts and works on the same window afterwards.
        let mut v = v;
        let mut s = connect(&v, "none");
        let a = blob(&mut s, 1, 4 * P);
        s.drv.map_blob(CTX, 1, 0).unwrap();
        v.guest_reads(0, &a, "blob from the device started after the refusal");
        let Session { dev, drv } = s;
        drop(drv);
        assert_eq!(dev.finish("done").code, Some(0));
        v.clean(name);
    });
}

#[test]
fn device_exits_before_hello() {
    refused_at_start("exit-before-hello");
}

#[test]
fn device_never_says_hello() {
    refused_at_start("silent");
}

#[test]
fn device_takes_the_window_and_never_gets_ready() {
    refused_at_start("no-ready");
}

#[test]
fn device_speaks_another_protocol_version() {
    refused_at_start("bad-version");
}

#[test]
fn device_claims_the_vmm_role() {
    refused_at_start("vmm-role");
}

#[test]
fn device_sends_an_event_instead_of_ready() {
    refused_at_start("not-ready");
}

/// The whole `hostmem run` path (`run::run`) with a device that stops answering: the run's
/// own timeout declares it hung, kills and restarts it, and the run completes.
#[test]
fn run_times_out_kills_and_restarts_a_silent_device() {
    let _serial = serial();
    with_watchdog("run no-reply", || {
        let marker = std::env::temp_dir().join(format!(
            "hostmem-hostile-run-no-reply-{}-once",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&marker);
        let opts = RunOptions {
            transport: Default::default(),
            mode: Mode::Fixed,
            window: 32 << 20,
            blobs: 30,
            seed: 11,
            max_live: 8,
            device: config("no-reply", Some(&marker), false),
            restart: Restart::OnFailure(1),
            kill_after: None,
            show_progress: false,
            command_timeout: COMMAND_TIMEOUT,
            guest_event_flood: 0,
            screenshot: None,
        };
        let t = std::time::Instant::now();
        let r = run(&opts).unwrap();
        let _ = std::fs::remove_file(&marker);
        if !r.kvm {
            println!("skipped: /dev/kvm unusable: the run's guest checks did not run");
        }
        assert_eq!(r.restarts, 1, "{r:?}");
        assert_eq!(r.device_exits.len(), 1, "{:?}", r.device_exits);
        let exit = &r.device_exits[0];
        assert!(exit.cause.contains("timed out"), "{exit:?}");
        assert_eq!(exit.signal, Some(libc::SIGKILL), "a hung device is killed");
        assert!(exit.restored >= 1, "its placement was restored: {exit:?}");
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.guest_mismatches, 0);
        assert_eq!(r.vmm_fds.0, r.vmm_fds.1, "VMM fds back to baseline");
        assert!(r.blobs_mapped >= 29, "{}", r.blobs_mapped);
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        assert_eq!(VMM_PANICS.load(Ordering::SeqCst), 0);
    });
}

/// Issue 22 item 2: `hostmem run` with a device that stays busy across the guest's reset
/// (it places a blob at offset 0 when the Reset comes and never answers). The reset is not
/// reported done: the transport declares the device lost, the run kills it and restores the
/// window before the guest's status write completes, the guest reads DEVICE_NEEDS_RESET
/// (not 0) and resets again on the restarted device, whose completed reset leaves the
/// window's first page zero (the guest checks), and the run completes. Mutation-checked: with
/// the old reset (log "device reset failed", clear the state) the guest reads status 0 with
/// the stale blob in BAR2 (a mismatch at offset 0) and never sees DEVICE_NEEDS_RESET.
#[test]
fn run_stops_a_device_that_does_not_complete_a_reset() {
    let _serial = serial();
    with_watchdog("run stall-reset", || {
        let marker = std::env::temp_dir().join(format!(
            "hostmem-hostile-run-stall-reset-{}-once",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&marker);
        let opts = RunOptions {
            transport: Default::default(),
            mode: Mode::Fixed,
            window: 32 << 20,
            blobs: 20,
            seed: 11,
            max_live: 8,
            device: config("stall-reset", Some(&marker), false),
            restart: Restart::OnFailure(1),
            kill_after: None,
            show_progress: false,
            command_timeout: COMMAND_TIMEOUT,
            guest_event_flood: 0,
            screenshot: None,
        };
        if let Err(why) = hostmem_base::kvm::Vm::available() {
            println!("skipped: /dev/kvm unusable ({why}): no guest, so no guest reset to stall");
            return;
        }
        let r = run(&opts);
        let _ = std::fs::remove_file(&marker);
        let r = r.unwrap();
        assert_eq!(
            r.guest_mismatches, 0,
            "the window read zeros after the reset"
        );
        assert_eq!(
            r.guest_driver.resets_refused, 1,
            "the guest read DEVICE_NEEDS_RESET, not 0, and reset again"
        );
        assert_eq!(r.device_exits.len(), 1, "{:?}", r.device_exits);
        let exit = &r.device_exits[0];
        assert!(exit.cause.contains("reset not completed"), "{exit:?}");
        assert_eq!(
            exit.signal,
            Some(libc::SIGKILL),
            "the busy device is killed"
        );
        assert_eq!(exit.restored, 1, "its blob was restored: {exit:?}");
        assert_eq!(r.restarts, 1, "{r:?}");
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.blobs_mapped, 20);
        assert_eq!(r.vmm_fds.0, r.vmm_fds.1, "VMM fds back to baseline");
        assert_eq!(VMM_PANICS.load(Ordering::SeqCst), 0);
    });
}

/// `hostmem run` with a device that floods the VMM with 5,000 bogus unmaps on the guest's
/// second MAP_BLOB: the run completes, and its report (`--json`) has the exact count by kind
/// under `warnings.vmm` while the log got ⌊log2 5000⌋ + 1 lines (issue 22 item 4).
#[test]
fn run_reports_a_flood_by_kind_and_logs_it_log_n_times() {
    let _serial = serial();
    with_watchdog("run flood", || {
        let marker = std::env::temp_dir().join(format!(
            "hostmem-hostile-run-flood-{}-once",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&marker);
        let opts = RunOptions {
            transport: Default::default(),
            mode: Mode::Fixed,
            window: 32 << 20,
            blobs: 20,
            seed: 12,
            max_live: 8,
            device: config("flood", Some(&marker), false),
            restart: Restart::Never,
            kill_after: None,
            show_progress: false,
            command_timeout: Duration::from_secs(10),
            guest_event_flood: 0,
            screenshot: None,
        };
        let log0 = log_len();
        let r = run(&opts).unwrap();
        let _ = std::fs::remove_file(&marker);
        if !r.kvm {
            println!("skipped: /dev/kvm unusable: the run's guest checks did not run");
        }
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.refused_events, 5000);
        assert_eq!(
            r.warnings.vmm.get("unmap refused: invalid parameter"),
            Some(&5000),
            "{:?}",
            r.warnings
        );
        assert_eq!(logged_since(log0, "refused unmap").len(), 13);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["warnings"]["vmm"]["unmap refused: invalid parameter"],
            5000
        );
    });
}

/// `hostmem run` with a device that forges five `DeviceMsg::Frame`s on its mapping tube at
/// the guest's second MAP_BLOB (guest RAM's memfd as the frame, an unsealed memfd, a short
/// memfd, width 0, a stride whose end overflows) and then serves normally: the run
/// completes with no error, every forged frame is refused before a byte is read and
/// counted (`display.refused`), the log has fewer lines than refusals (1st, 2nd, 4th, …),
/// and the guest's own frames, cursor and blob scanout still check out.
fn run_with_forged_frames(jailed: bool) {
    let _serial = serial();
    if jailed && !jail_works() {
        println!("skipped: user namespaces unavailable, jailed forged-frames run not run");
        return;
    }
    if let Err(why) = hostmem_base::kvm::Vm::available() {
        println!("skipped: /dev/kvm unusable ({why}): hostmem run needs its guest");
        return;
    }
    with_watchdog("run forged-frames", move || {
        // No restart, so no --once marker (which the jail could not create anyway).
        let opts = RunOptions {
            transport: Default::default(),
            mode: Mode::Fixed,
            window: 32 << 20,
            blobs: 20,
            seed: 13,
            max_live: 8,
            device: config("forged-frames", None, jailed),
            restart: Restart::Never,
            kill_after: None,
            show_progress: false,
            command_timeout: Duration::from_secs(10),
            guest_event_flood: 0,
            screenshot: None,
        };
        let log0 = log_len();
        let r = run(&opts).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.restarts, 0, "{r:?}");
        let d = &r.display;
        assert!(d.refused >= 5, "{d:?}");
        assert_eq!(d.refused, 5, "exactly the forged ones: {d:?}");
        assert_eq!(d.refusals.get("frame invalid"), Some(&5), "{d:?}");
        let lines = logged_since(log0, "frame refused");
        assert!(
            !lines.is_empty() && lines.len() < 5,
            "rate-limited: {lines:?}"
        );
        // What the log names, where a line was written: each a reason, not a crash.
        for l in &lines {
            assert!(
                ["guest RAM", "shrinking", "past the fd", "size 0x16"]
                    .iter()
                    .any(|w| l.contains(w)),
                "{l}"
            );
        }
        // The device's real frames were taken and check out.
        assert_eq!(d.mismatches, Some(0), "{d:?}");
        assert_eq!(d.cursor_mismatches, Some(0), "{d:?}");
        assert_eq!(d.blob_scanout_mismatches, Some(0), "{d:?}");
        assert_eq!(r.blobs_mapped, 20);
        assert_eq!(r.guest_mismatches, 0);
        assert_eq!(r.vmm_fds.0, r.vmm_fds.1, "VMM fds back to baseline");
        assert_eq!(VMM_PANICS.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn run_refuses_and_counts_forged_frames() {
    run_with_forged_frames(false);
}

#[test]
fn jailed_run_refuses_and_counts_forged_frames() {
    run_with_forged_frames(true);
}

// Attacker code on the fds the VMM gave the device (issue 14), from the real jail under the
// real policy: every operation the policy allows on the window memfd, guest RAM and the
// eventfds must fail or be harmless (Survives: the VMM's window and guest keep working, also
// after the device is stopped and restarted); what the policy forbids kills the device by
// SIGSYS, named by the VMM.
jailed_scenarios! {
    jailed_fd_attacks_on_the_window_guest_ram_and_eventfds: "fd-shared" => Verdict::Survives;
    jailed_write_seal_on_the_window_is_killed: "fd-write-seal-window" => Verdict::KilledBySeccomp("fcntl");
    jailed_fallocate_is_killed: "fd-fallocate" => Verdict::KilledBySeccomp("fallocate");
    jailed_memfd_hugetlb_is_killed: "memfd-hugetlb" => Verdict::KilledBySeccomp("memfd_create");
    // W^X: the launch policy lets the loader map code from any file; the run-time filter the
    // device stacks at the end of start-up kills an executable mapping of a memfd it wrote.
    jailed_run_time_code_is_killed: "run-code" => Verdict::KilledBySeccomp("mmap");
    // Issue 22 item 8: the device forges its SIGSYS record (ptrace) before the real call
    // (fcntl): the kernel's record names the call, the forgery stays the device's claim.
    jailed_forged_sigsys_record_is_only_a_claim: "forge-sigsys" => Verdict::KilledBySeccompForging { call: "fcntl", claim: "ptrace" };
    jailed_read_only_placement: "read-only" => Verdict::Refused("only READ|WRITE");
}

/// A policy folder in the temporary directory, removed when the test ends (also when it
/// fails).
struct TempPolicy(PathBuf);

impl TempPolicy {
    fn policy(&self) -> Option<PathBuf> {
        Some(self.0.join("gpu_device_shm.policy"))
    }
}

impl Drop for TempPolicy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of our policy folder where `fcntl` and `fallocate` are allowed with any
/// arguments: what the VMM's own defences must hold against if the policy were looser.
fn loose_policy(test: &str) -> TempPolicy {
    let ours = hostmem_vmm::policy::default_dir();
    let dir = std::env::temp_dir().join(format!(
        "hostmem-loose-policy-{}-{test}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["common_device.policy", "gpu_device_shm.policy"] {
        let text = std::fs::read_to_string(ours.join(f)).unwrap();
        let loose: String = text
            .lines()
            .map(|l| {
                if l.starts_with("fcntl:") {
                    "fcntl: 1".to_string()
                } else if l.starts_with("fallocate:") {
                    "fallocate: 1".to_string()
                } else {
                    l.to_string()
                }
            })
            .map(|l| l + "\n")
            .collect();
        // Our policy has no fallocate at all: the loose one allows every mode.
        let loose = if f == "gpu_device_shm.policy" {
            loose + "fallocate: 1\n"
        } else {
            loose
        };
        std::fs::write(dir.join(f), loose).unwrap();
    }
    TempPolicy(dir)
}

/// Every seal of every kind and every fallocate mode on the window and guest RAM, allowed by
/// a loose policy: the seals fail (the VMM sealed both with F_SEAL_SEAL before the device got
/// them), so the VMM can still map its window read/write, e.g. to restore it after the
/// device is stopped. (Mutation-checked: without F_SEAL_SEAL the device's
/// F_SEAL_FUTURE_WRITE succeeds and the test fails.)
#[test]
fn jailed_any_seal_on_the_window_under_a_loose_policy() {
    let loose = loose_policy("fd-any-seal");
    scenario_jailed_with(
        "fd-any-seal",
        Verdict::Survives,
        loose.policy(),
        Some(DEFAULT_DEVICE_MEMORY),
    );
}

/// A blob sealed against writes, for a read/write placement: refused before the VMM's
/// MAP_FIXED (which would fail), as an invalid parameter.
#[test]
fn jailed_write_sealed_blob_under_a_loose_policy() {
    let loose = loose_policy("write-sealed-blob");
    scenario_jailed_with(
        "write-sealed-blob",
        Verdict::Refused("sealed against writes"),
        loose.policy(),
        Some(DEFAULT_DEVICE_MEMORY),
    );
}

/// A device that allocates heap without end is stopped by the kernel at its memory limit
/// (its cgroup), reported by the VMM as out of memory, and restarted; the VMM and the guest
/// are undisturbed.
#[test]
fn jailed_device_allocating_without_end_is_oom_killed() {
    if !memory_cgroup_works() {
        return;
    }
    scenario_jailed_with("oom", Verdict::OomKilled, None, Some(64 << 20));
}

/// The same with memfd pages (what blobs are made of): shmem is charged to the device too.
#[test]
fn jailed_device_hoarding_memfds_is_oom_killed() {
    if !memory_cgroup_works() {
        return;
    }
    scenario_jailed_with("oom-memfd", Verdict::OomKilled, None, Some(64 << 20));
}

fn memory_cgroup_works() -> bool {
    let ok = std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    if !ok {
        println!("skipped: no cgroup v1 memory controller here (the device gets rlimits)");
    }
    ok
}
