//! Fault injection and soak, through the real jailed device and the real mapping service:
//! the device killed at exact points of an event, the VMM at its fd limit (EMFILE, also for
//! a whole batch of events), the device's mirror placement or restore failing after its
//! event left (the device's `--test-fail-mirror-*` knobs), and a long map/unmap run whose
//! fd, VMA and RSS counts must come back. After every fault the
//! VMM's placement table must equal what `/proc/self/maps` shows in the window, and the
//! KVM guest must read what the table says.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use hostmem_base::kvm::Vm;
use hostmem_base::procfs::fd_count;
use hostmem_device::backend::shm::{encode_stream, pattern_bytes, ShmOp};
use hostmem_vmm::device::Device;
use hostmem_vmm::hostmem::{FaultPoint, Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA};
use hostmem_vmm::probe::{expected_hash, GuestProbe, ProbeRead};
use hostmem_vmm::queue_driver::{CmdError, QueueDriver};
use hostmem_vmm::run::{run, Restart, RunOptions};

mod common;
use common::{device_config, serial, start_device};

const P: u64 = 4096;
const CTX: u32 = 1;
const WINDOW: u64 = 16 << 20;

/// The VMM with its window, the guest probe when KVM works, and a device.
struct Vmm {
    hm: Arc<Hostmem>,
    probe: Option<GuestProbe>,
    dev: Option<Device>,
    drv: Option<QueueDriver>,
}

impl Vmm {
    fn new() -> Vmm {
        Vmm::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Vmm {
        let vm = match Vm::available() {
            Ok(()) => Some(Arc::new(Vm::open().unwrap())),
            Err(why) => {
                println!("skipped: guest checks, /dev/kvm unusable ({why})");
                None
            }
        };
        let hm = Arc::new(
            Hostmem::new(WINDOW, vm.clone(), DEFAULT_WINDOW_GPA, Mode::Fixed, limits).unwrap(),
        );
        let probe = vm.map(|vm| GuestProbe::new(vm, DEFAULT_WINDOW_GPA, WINDOW, 4 << 20).unwrap());
        Vmm {
            hm,
            probe,
            dev: None,
            drv: None,
        }
    }

    fn start_device(&mut self) {
        self.start_device_with(&[]);
    }

    /// Starts the device with `extra` arguments (its test knobs).
    fn start_device_with(&mut self, extra: &[&str]) {
        let mut cfg = device_config();
        cfg.extra_args = extra.iter().map(|s| s.to_string()).collect();
        let (dev, mut drv) = start_device(&cfg, &self.hm);
        drv.set_timeout(Duration::from_secs(5)).unwrap();
        drv.ctx_create(CTX, 0).unwrap();
        self.dev = Some(dev);
        self.drv = Some(drv);
    }

    fn drv(&mut self) -> &mut QueueDriver {
        self.drv.as_mut().unwrap()
    }

    /// Creates blob `res` filled with the pattern of `res` (the device writes it).
    fn create(&mut self, res: u32, size: u64) -> Result<(), CmdError> {
        self.drv().create_blob(CTX, res, 0, size)?;
        let fill = encode_stream(&[ShmOp::Fill {
            resource_id: res,
            offset: 0,
            len: size,
            seed: u64::from(res),
        }]);
        self.drv().submit_3d(CTX, fill).map(drop)
    }

    /// The guest reads `offset..+len`: the blob pattern of `res`, or zeros for `None`.
    fn guest_sees(&mut self, offset: u64, len: u64, res: Option<u32>) {
        let Some(p) = self.probe.as_mut() else {
            return;
        };
        let want = match res {
            Some(r) => pattern_bytes(u64::from(r), 0, len as usize),
            None => vec![0; len as usize],
        };
        assert_eq!(
            p.hash(offset, len).unwrap(),
            ProbeRead::Value(expected_hash(&want)),
            "guest at {offset:#x}+{len:#x} expected {res:?}"
        );
    }

    /// The window's mappings are exactly the placement table, background elsewhere.
    fn consistent(&self) {
        self.hm.audit().unwrap();
    }

    fn stop_device(&mut self, why: &str) -> hostmem_vmm::device::DeviceExit {
        drop(self.drv.take());
        self.dev.take().unwrap().stop(why)
    }
}

/// The device is SIGKILLed at `point` of the event for resource 3 (two other blobs live).
/// The guest command fails, the device's exit is reported, the window is all background
/// (the table is empty and `/proc/self/maps` agrees, the guest reads zeros), the VMM's fds
/// are back to baseline, and a new device maps at the same place.
fn kill_at(point: FaultPoint) {
    let mut v = Vmm::new();
    let baseline = fd_count().unwrap();
    v.start_device();
    for res in 1..=3u32 {
        v.create(res, 2 * P).unwrap();
    }
    let at = |res: u32| u64::from(res) * 4 * P;
    v.drv().map_blob(CTX, 1, at(1)).unwrap();
    v.drv().map_blob(CTX, 2, at(2)).unwrap();
    let is_map = matches!(point, FaultPoint::MapReceived | FaultPoint::MapPlaced);
    if !is_map {
        v.drv().map_blob(CTX, 3, at(3)).unwrap();
        v.guest_sees(at(3), 2 * P, Some(3));
    }
    v.guest_sees(at(1), 2 * P, Some(1));
    let pid = v.dev.as_ref().unwrap().pid();
    v.hm.set_fault_hook(Some(Box::new(move |p, res| {
        if p == point && res == 3 {
            // SIGKILL is delivered before kill(2) returns to us for a process that is not
            // blocked on anything uninterruptible; the device dies right here.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    })));
    let r = if is_map {
        v.drv().map_blob(CTX, 3, at(3)).map(drop)
    } else {
        v.drv().unmap_blob(CTX, 3)
    };
    v.hm.set_fault_hook(None);
    match r {
        Err(e) => assert!(e.device_lost(), "{point:?}: {e}"),
        Ok(()) => panic!("{point:?}: the guest command completed though the device died"),
    }
    let exit = v.stop_device("fault injection");
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{point:?}: {exit:?}");
    assert_eq!(v.hm.live(), 0, "{point:?}: placements survived the device");
    v.consistent();
    for res in 1..=3u32 {
        v.guest_sees(at(res), 2 * P, None);
    }
    assert_eq!(fd_count().unwrap(), baseline, "{point:?}: VMM fds leaked");

    // A new device serves the same range.
    v.start_device();
    v.create(3, 2 * P).unwrap();
    v.drv().map_blob(CTX, 3, at(3)).unwrap();
    v.consistent();
    v.guest_sees(at(3), 2 * P, Some(3));
    v.drv().unmap_blob(CTX, 3).unwrap();
    v.guest_sees(at(3), 2 * P, None);
    let exit = v.stop_device("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert_eq!(fd_count().unwrap(), baseline);
}

#[test]
fn device_killed_after_its_placement_before_the_vmms() {
    let _s = serial();
    kill_at(FaultPoint::MapReceived);
}

#[test]
fn device_killed_between_the_vmms_placement_and_the_reply() {
    let _s = serial();
    kill_at(FaultPoint::MapPlaced);
}

#[test]
fn device_killed_after_its_unmap_before_the_vmms() {
    let _s = serial();
    kill_at(FaultPoint::UnmapReceived);
}

#[test]
fn device_killed_between_the_vmms_unmap_and_the_reply() {
    let _s = serial();
    kill_at(FaultPoint::UnmapDone);
}

/// Lowers our RLIMIT_NOFILE to the fds we hold and fills every free number below it, so
/// the next fd the VMM would get fails with EMFILE. Dropping the guard restores both.
struct FdLimit {
    old: (u64, u64),
    _fillers: Vec<OwnedFd>,
}

impl FdLimit {
    fn exhaust() -> FdLimit {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let old = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let max_fd = hostmem_base::procfs::open_fds()
            .unwrap()
            .iter()
            .map(|(fd, _)| *fd)
            .max()
            .unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, (max_fd + 1) as u64, old.1).unwrap();
        let mut fillers = vec![];
        while let Ok(f) = std::fs::File::open("/dev/null") {
            fillers.push(f.into());
        }
        FdLimit {
            old,
            _fillers: fillers,
        }
    }
}

impl Drop for FdLimit {
    fn drop(&mut self) {
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            self.old.0,
            self.old.1,
        );
    }
}

/// At its fd limit the VMM cannot receive a blob's fd (the kernel drops it: MSG_CTRUNC).
/// The event is still answered — refused — so the device restores its mirror and the guest
/// gets ERR_OUT_OF_MEMORY at once, not a hang; nothing is mapped; once fds are free again
/// the same blob maps.
#[test]
fn vmm_at_its_fd_limit_refuses_the_map_and_recovers() {
    let _s = serial();
    let mut v = Vmm::new();
    v.start_device();
    v.create(1, 2 * P).unwrap();
    v.create(2, 2 * P).unwrap();
    v.drv().map_blob(CTX, 1, 0).unwrap();
    let refused_before = v.hm.counters().refused + v.hm.counters().protocol_errors;
    let baseline = fd_count().unwrap();
    {
        let _limit = FdLimit::exhaust();
        assert!(
            std::fs::File::open("/dev/null").is_err(),
            "the limit is reached"
        );
        let r = v.drv().map_blob(CTX, 2, 8 * P);
        match r {
            Err(CmdError::Device(c)) => assert_eq!(format!("{c:?}"), "OutOfMemory"),
            other => panic!("expected ERR_OUT_OF_MEMORY, got {other:?}"),
        }
        assert_eq!(v.hm.live(), 1, "nothing placed for the refused event");
        // Unmapping needs no new fd: it works at the limit.
        v.drv().unmap_blob(CTX, 1).unwrap();
        assert_eq!(v.hm.live(), 0);
    }
    let c = v.hm.counters();
    assert!(
        c.refused + c.protocol_errors > refused_before,
        "the VMM counted it: {c:?}"
    );
    v.consistent();
    v.guest_sees(8 * P, 2 * P, None);
    assert_eq!(
        fd_count().unwrap(),
        baseline,
        "fds of the lost event closed"
    );
    v.drv().map_blob(CTX, 2, 8 * P).unwrap();
    v.consistent();
    v.guest_sees(8 * P, 2 * P, Some(2));
    v.drv().unmap_blob(CTX, 2).unwrap();
    let exit = v.stop_device("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// Map/unmap cycles through the jailed device with the guest reading every one: the fds
/// and VMAs of both processes come back, the VMM's anonymous RSS stays flat, no mismatch.
/// `HOSTMEM_SOAK_CYCLES` (default 2,000) sets the length; the full soak is 100,000
/// (`HOSTMEM_SOAK_CYCLES=100000 cargo test --release -p hostmem-vmm --test faults soak`,
/// or `hostmem run --blobs 100000`).
#[test]
fn soak_map_unmap_cycles_return_every_resource() {
    let _s = serial();
    let cycles: u32 = std::env::var("HOSTMEM_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let o = RunOptions {
        transport: Default::default(),
        mode: Mode::Fixed,
        window: 64 << 20,
        blobs: cycles,
        seed: 11,
        max_live: 16,
        device: device_config(),
        restart: Restart::Never,
        kill_after: None,
        show_progress: false,
        command_timeout: hostmem_vmm::queue_driver::COMMAND_TIMEOUT,
        guest_event_flood: 0,
        screenshot: None,
    };
    let r = run(&o).unwrap();
    let u = &r.usage;
    println!(
        "soak: {} cycles in {:.1} s, {} guest checks, VMM fds {}→{} VMAs {}→{} RssAnon KiB {:?}, device fds {}→{} VMAs {}→{}",
        r.blobs_mapped,
        r.seconds,
        r.guest_verified,
        u.vmm_start.fds,
        u.vmm_end.fds,
        u.vmm_start.vmas,
        u.vmm_end.vmas,
        u.vmm_rss_anon_kib_samples.values(),
        u.device_start.fds,
        u.device_end.fds,
        u.device_start.vmas,
        u.device_end.vmas
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.guest_mismatches, 0);
    assert!(
        r.blobs_mapped as u32 >= cycles * 9 / 10,
        "{}",
        r.blobs_mapped
    );
    assert_eq!(u.vmm_start.fds, u.vmm_end.fds);
    assert_eq!(u.vmm_start.vmas, u.vmm_end.vmas);
    assert_eq!(u.device_start.fds, u.device_end.fds);
    assert_eq!(u.device_start.vmas, u.device_end.vmas);
    assert!(u.device_start.fds > 0 && u.vmm_start.vmas > 0, "{u:?}");
    if r.kvm {
        assert!(
            r.guest_verified >= r.blobs_mapped,
            "the guest read every blob"
        );
    } else {
        println!("skipped: guest reads in the soak, no KVM");
    }
}

/// Pipelined MAP_BLOBs (the device starts each placement and takes the next command while
/// the VMM works on the event), with the VMM refusing the last two (its live limit): the
/// first four complete, the refused two answer ERR_OUT_OF_MEMORY in order, and the device
/// undid their mirror placements and blob state: once room is made, the very same maps
/// succeed. Window == table throughout, and the guest reads what the table says.
#[test]
fn pipelined_maps_with_refusals_in_the_middle_are_undone() {
    let _s = serial();
    let mut v = Vmm::with_limits(Limits {
        max_live: 4,
        ..Limits::default()
    });
    v.start_device();
    let at = |res: u32| u64::from(res) * 4 * P;
    for res in 1..=6u32 {
        v.create(res, 2 * P).unwrap();
    }
    let tags: Vec<u64> = (1..=6u32)
        .map(|res| v.drv().submit_map(CTX, res, at(res)).unwrap())
        .collect();
    let results: Vec<String> = tags
        .iter()
        .map(|t| match v.drv().wait_map(*t) {
            Ok(_) => "ok".to_string(),
            Err(CmdError::Device(c)) => format!("{c:?}"),
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert_eq!(
        results,
        ["ok", "ok", "ok", "ok", "OutOfMemory", "OutOfMemory"],
        "the VMM's live limit of 4 refuses the last two"
    );
    assert_eq!(v.hm.live(), 4);
    // Pipelined again: an unmap and a map of another blob in flight together.
    let unmap_tag = v.drv().submit_unmap(CTX, 1).unwrap();
    let remap_tag = v.drv().submit_map(CTX, 5, at(5)).unwrap();
    v.drv().wait_ok(unmap_tag).unwrap();
    match v.drv().wait_map(remap_tag) {
        Err(CmdError::Device(c)) => assert_eq!(
            format!("{c:?}"),
            "OutOfMemory",
            "4 still live when it arrived? {c:?}"
        ),
        Ok(_) => {
            // The VMM handled the unmap first: then the map had room.
            v.drv().unmap_blob(CTX, 5).unwrap();
        }
        Err(e) => panic!("{e}"),
    }
    assert_eq!(v.hm.live(), 3);
    v.consistent();
    v.guest_sees(at(1), 2 * P, None);
    for res in 2..=4 {
        v.guest_sees(at(res), 2 * P, Some(res));
    }
    for res in 5..=6 {
        v.guest_sees(at(res), 2 * P, None);
    }
    // Room for the refused two: the device undid them, so the same maps work now.
    v.drv().unmap_blob(CTX, 2).unwrap();
    for res in 5..=6u32 {
        v.drv().map_blob(CTX, res, at(res)).unwrap();
        v.guest_sees(at(res), 2 * P, Some(res));
    }
    v.consistent();
    let exit = v.stop_device("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// The device's mirror placement fails after its Map event left (the device's
/// `--test-fail-mirror-place 2`: the second placement fails as if MAP_FIXED had returned
/// ENOMEM). The VMM placed the blob meanwhile; the device takes it back with an Unmap
/// before the guest hears ERR_OUT_OF_MEMORY: the VMM's window is without it (table, maps
/// and the guest agree), and the same map works afterwards, so the mirror is free there.
#[test]
fn a_mirror_placement_failing_after_its_map_left_is_taken_back() {
    let _s = serial();
    let mut v = Vmm::new();
    v.start_device_with(&["--test-fail-mirror-place", "2"]);
    let at = |res: u32| u64::from(res) * 4 * P;
    v.create(1, 2 * P).unwrap();
    v.create(2, 2 * P).unwrap();
    v.drv().map_blob(CTX, 1, at(1)).unwrap();
    let before = v.hm.counters();
    match v.drv().map_blob(CTX, 2, at(2)) {
        Err(CmdError::Device(c)) => assert_eq!(format!("{c:?}"), "OutOfMemory"),
        other => panic!("expected ERR_OUT_OF_MEMORY, got {other:?}"),
    }
    let after = v.hm.counters();
    assert_eq!(
        (
            after.maps_ok - before.maps_ok,
            after.unmaps_ok - before.unmaps_ok
        ),
        (1, 1),
        "the VMM placed it and took it back: {after:?}"
    );
    assert_eq!(v.hm.live(), 1, "only blob 1 is placed");
    v.consistent();
    v.guest_sees(at(1), 2 * P, Some(1));
    v.guest_sees(at(2), 2 * P, None);
    // The knob fires once: the mirror is free at at(2), the same map works.
    v.drv().map_blob(CTX, 2, at(2)).unwrap();
    v.consistent();
    v.guest_sees(at(2), 2 * P, Some(2));
    v.drv().unmap_blob(CTX, 2).unwrap();
    v.drv().unmap_blob(CTX, 1).unwrap();
    assert_eq!(v.hm.live(), 0);
    let exit = v.stop_device("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// The device's mirror restore fails after its Unmap event left
/// (`--test-fail-mirror-restore 1`): the VMM restored its range, the mirror still holds the
/// blob, so the views differ and the device gives up: the guest's UNMAP fails, the device
/// exits with its tube-failure code on its own, the VMM restores its whole window (table,
/// maps and guest: all background), and a new device maps at the same places.
#[test]
fn a_mirror_restore_failing_after_its_unmap_left_ends_the_device() {
    let _s = serial();
    let mut v = Vmm::new();
    let baseline = fd_count().unwrap();
    v.start_device_with(&["--test-fail-mirror-restore", "1"]);
    let at = |res: u32| u64::from(res) * 4 * P;
    for res in 1..=2u32 {
        v.create(res, 2 * P).unwrap();
        v.drv().map_blob(CTX, res, at(res)).unwrap();
    }
    v.guest_sees(at(2), 2 * P, Some(2));
    match v.drv().unmap_blob(CTX, 1) {
        Err(CmdError::Device(c)) => assert_eq!(format!("{c:?}"), "Unspec"),
        Err(e) => assert!(e.device_lost(), "{e}"),
        Ok(()) => panic!("the UNMAP completed though the mirror kept the blob"),
    }
    // The device exits by itself (exit code 3: the mapping tube failed).
    let pid = v.dev.as_ref().unwrap().pid();
    let t0 = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the device did not exit"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let exit = v.stop_device("after the failed restore");
    assert_eq!(exit.code, Some(3), "{exit:?}");
    assert_eq!(v.hm.live(), 0, "the VMM restored its whole window");
    v.consistent();
    for res in 1..=2u32 {
        v.guest_sees(at(res), 2 * P, None);
    }
    assert_eq!(fd_count().unwrap(), baseline, "VMM fds leaked");
    v.start_device();
    v.create(1, 2 * P).unwrap();
    v.drv().map_blob(CTX, 1, at(1)).unwrap();
    v.guest_sees(at(1), 2 * P, Some(1));
    v.drv().unmap_blob(CTX, 1).unwrap();
    v.consistent();
    let exit = v.stop_device("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// A batch arrives while the VMM is at its fd limit: the kernel drops its fds
/// (MSG_CTRUNC). Its Maps are refused, its Unmap is still done, and the device's mirror
/// follows: the guest gets OK for the unmap and ERR_OUT_OF_MEMORY for both maps, the
/// VMM's window and table agree, and once fds are free the same maps (and a map where the
/// unmapped blob was) work, so the mirror is background at all three places.
///
/// How the batch is made: the VMM's fault hook holds it at blob X's Map while the test
/// queues MAP B, UNMAP A, MAP C, MAP D; the device then sends B alone (the VMM owes it
/// nothing), and the VMM, held again at B (where the hook exhausts the fds), lets
/// UNMAP A, MAP C and MAP D pile up in the device's outbox: they leave as one batch.
#[test]
fn a_batch_whose_fds_are_lost_refuses_its_maps_and_does_its_unmaps() {
    use std::sync::Mutex;
    let _s = serial();
    let mut v = Vmm::new();
    v.start_device();
    let (x, a, b, c, d) = (1u32, 2u32, 3u32, 4u32, 5u32);
    let at = |res: u32| u64::from(res) * 4 * P;
    for res in [x, a, b, c, d] {
        v.create(res, 2 * P).unwrap();
    }
    v.drv().map_blob(CTX, a, at(a)).unwrap();
    let before = v.hm.counters();
    let limit: Arc<Mutex<Option<FdLimit>>> = Arc::new(Mutex::new(None));
    let held_x = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (l, h) = (limit.clone(), held_x.clone());
    v.hm.set_fault_hook(Some(Box::new(move |p, res| {
        if p != FaultPoint::MapReceived {
            return;
        }
        if res == x {
            h.store(true, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
        } else if res == b {
            // B's fd arrived; the batch behind it will find no free fd.
            *l.lock().unwrap() = Some(FdLimit::exhaust());
            std::thread::sleep(Duration::from_millis(150));
        }
    })));
    let tx = v.drv().submit_map(CTX, x, at(x)).unwrap();
    let t0 = std::time::Instant::now();
    while !held_x.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "X never reached the VMM"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The device now waits for X's verdict: these four are in the ring together.
    std::thread::sleep(Duration::from_millis(100));
    let tb = v.drv().submit_map(CTX, b, at(b)).unwrap();
    let ta = v.drv().submit_unmap(CTX, a).unwrap();
    let tc = v.drv().submit_map(CTX, c, at(c)).unwrap();
    let td = v.drv().submit_map(CTX, d, at(d)).unwrap();
    let mut verdict = |tag: u64, map: bool| -> String {
        let r = if map {
            v.drv().wait_map(tag).map(drop)
        } else {
            v.drv().wait_ok(tag).map(drop)
        };
        match r {
            Ok(()) => "ok".into(),
            Err(CmdError::Device(c)) => format!("{c:?}"),
            Err(e) => panic!("{e}"),
        }
    };
    let got = [
        verdict(tx, true),
        verdict(tb, true),
        verdict(ta, false),
        verdict(tc, true),
        verdict(td, true),
    ];
    v.hm.set_fault_hook(None);
    let fds_were_exhausted = limit.lock().unwrap().take().is_some();
    assert!(fds_were_exhausted, "the hook ran at B");
    assert_eq!(
        got,
        ["ok", "ok", "ok", "OutOfMemory", "OutOfMemory"],
        "X, B placed; A unmapped; C and D refused"
    );
    let after = v.hm.counters();
    assert_eq!(
        after.protocol_errors - before.protocol_errors,
        1,
        "C and D (and A) came in one message whose fds were lost: {after:?}"
    );
    assert_eq!(after.unmaps_ok - before.unmaps_ok, 1, "A's unmap was done");
    assert_eq!(v.hm.live(), 2, "X and B");
    v.consistent();
    v.guest_sees(at(x), 2 * P, Some(x));
    v.guest_sees(at(b), 2 * P, Some(b));
    for res in [a, c, d] {
        v.guest_sees(at(res), 2 * P, None);
    }
    // The mirror agrees: C, D and A map where they were refused or unmapped.
    for res in [c, d, a] {
        v.drv().map_blob(CTX, res, at(res)).unwrap();
        v.guest_sees(at(res), 2 * P, Some(res));
    }
    v.consistent();
    let exit = v.stop_device("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}
