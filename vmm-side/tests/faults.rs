//! Fault injection and soak, through the real jailed device and the real mapping service:
//! the device killed at exact points of an event, the VMM at its fd limit (EMFILE), and a
//! long map/unmap run whose fd, VMA and RSS counts must come back. After every fault the
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
        let (dev, mut drv) = start_device(&device_config(), &self.hm);
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
        use_kvm: true,
        command_timeout: hostmem_vmm::queue_driver::COMMAND_TIMEOUT,
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
        u.vmm_rss_anon_kib_samples,
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
    let mut v = Vmm::with_limits(Limits { max_live: 4 });
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
