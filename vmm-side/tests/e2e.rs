//! End to end across the two processes on real KVM: the jailed device places blobs, the
//! VMM repeats them, and a ring-3 KVM guest reads them through one memslot.

use std::sync::Arc;

use hostmem_vmm::device::Device;
use hostmem_vmm::hostmem::{Hostmem, Mode};
use hostmem_vmm::queue_driver::{CmdError, QueueDriver};
use hostmem_vmm::run::{run, Restart, RunOptions};

mod common;
use common::{device_config, hostmem, jail_works, kvm, serial, start_device};

fn options(mode: Mode, blobs: u32) -> RunOptions {
    RunOptions {
        transport: Default::default(),
        mode,
        window: 64 << 20,
        blobs,
        seed: 7,
        max_live: 16,
        device: device_config(),
        restart: Restart::OnFailure(2),
        kill_after: None,
        show_progress: false,
        command_timeout: hostmem_vmm::queue_driver::COMMAND_TIMEOUT,
        guest_event_flood: 0,
        screenshot: None,
    }
}

/// The device memory limit of [`options`].
fn o_limit() -> Option<u64> {
    device_config().memory_limit
}

#[test]
fn fixed_mode_guest_sees_blobs_with_one_memslot() {
    let _serial = serial();
    if !kvm() {
        return;
    }
    let r = run(&options(Mode::Fixed, 120)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.blobs_mapped, 120);
    assert_eq!(r.guest_mismatches, 0);
    assert_eq!(r.guest_holes, 0);
    // The driver's test pattern reached the VMM through a 2D resource on scanout 0, every
    // pixel as drawn.
    assert!(r.display.frames >= 1, "{:?}", r.display);
    assert_eq!(r.display.mismatches, Some(0), "{:?}", r.display);
    // The cursor the device reported is the one the driver sent (moved to its second
    // position, the hot spot and image of its UPDATE_CURSOR), and the blob the driver showed
    // with SET_SCANOUT_BLOB reached the VMM as the blob's bytes.
    let c = r.display.cursor.expect("a cursor");
    assert_eq!((c.scanout_id, c.x, c.y), (0, 210, 130), "{c:?}");
    assert_eq!((c.hot_x, c.hot_y), (3, 5), "{c:?}");
    assert_ne!(c.resource_id, 0, "{c:?}");
    assert_eq!(r.display.cursor_mismatches, Some(0), "{:?}", r.display);
    assert_eq!(r.display.cursor_updates, 2, "{:?}", r.display);
    assert_eq!(
        r.display.blob_scanout_mismatches,
        Some(0),
        "{:?}",
        r.display
    );
    assert!(r.display.frames >= 2, "{:?}", r.display);
    // One scanout by default: the device said so in its Ready, the transport's device
    // config said so to the driver.
    assert_eq!(r.device.num_scanouts, 1);
    assert_eq!(r.guest_driver.num_scanouts, 1);
    // Every blob read once, zeros after every unmap, and the guest writes seen by the device.
    assert!(r.guest_verified >= 240, "{}", r.guest_verified);
    assert_eq!(r.memslot_changes, 1, "fixed mode keeps exactly one memslot");
    assert!(r.max_live_placements > 1);
    // Blob memory is bounded on both sides by the device's memory limit, and reported.
    let limit = o_limit();
    let b = r.blob_memory;
    assert_eq!(b.device_budget, limit, "{b:?}");
    assert_eq!(b.vmm_placed_limit, limit, "{b:?}");
    assert!(b.vmm_placed_bytes_max > 0 && b.device_bytes_max >= b.vmm_placed_bytes_max);
    assert_eq!((b.device_refused, b.vmm_refused), (0, 0));
    assert_eq!(r.vmm_fds.0, r.vmm_fds.1, "VMM fd count back to baseline");
    // The whole workload under gpu_device_shm.policy with the kill action: no violation.
    assert!(
        r.seccomp_violations.is_empty(),
        "{:?}",
        r.seccomp_violations
    );
    if r.device.jailed {
        assert_eq!(r.device.seccomp, 2);
        assert!(r.device.no_new_privs);
        assert_eq!(r.device.cap_eff, "0000000000000000");
    }
}

#[test]
fn per_blob_slot_mode_guest_sees_blobs_and_slots_churn() {
    let _serial = serial();
    if !kvm() {
        return;
    }
    let r = run(&options(Mode::PerBlobSlot, 60)).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.blobs_mapped, 60);
    assert_eq!(r.guest_mismatches, 0);
    assert!(r.guest_verified >= 120);
    // The legacy way leaves guest-visible holes where blobs were.
    assert!(r.guest_holes > 0);
    // One add and one delete per blob (and the blob the driver shows on scanout 0); no
    // window slot.
    assert_eq!(r.memslot_changes, 2 * 61);
    assert_eq!(
        r.display.blob_scanout_mismatches,
        Some(0),
        "{:?}",
        r.display
    );
}

#[test]
fn device_killed_mid_run_restores_window_and_restarts() {
    let _serial = serial();
    if !kvm() {
        return;
    }
    let mut o = options(Mode::Fixed, 80);
    o.kill_after = Some(30);
    let r = run(&o).unwrap();
    assert_eq!(r.device_exits.len(), 1, "{:?}", r.device_exits);
    let exit = &r.device_exits[0];
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(exit.restored > 0, "live placements were restored: {exit:?}");
    assert_eq!(r.restarts, 1);
    // The guest read zeros where the dead device's blobs were (counted as verified, no
    // mismatch), and the run went on with new blobs.
    assert_eq!(r.guest_mismatches, 0);
    assert!(r.blobs_mapped >= 79, "{}", r.blobs_mapped);
    assert_eq!(r.memslot_changes, 1);
    assert_eq!(
        r.vmm_fds.0, r.vmm_fds.1,
        "VMM fds back to baseline after the death"
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

/// A device and a driver without KVM, for command-level checks.
fn start(extra: &[&str]) -> (Arc<Hostmem>, Device, QueueDriver) {
    let hm = hostmem(16 << 20);
    let mut cfg = device_config();
    cfg.extra_args = extra.iter().map(|s| s.to_string()).collect();
    let (dev, mut drv) = start_device(&cfg, &hm);
    drv.ctx_create(1, 0).unwrap();
    (hm, dev, drv)
}

fn code(r: Result<impl std::fmt::Debug, CmdError>) -> String {
    match r {
        Err(CmdError::Device(c)) => format!("{c:?}"),
        other => format!("unexpected {other:?}"),
    }
}

#[test]
fn num_scanouts_in_the_device_config_is_the_devices_display() {
    let _serial = serial();
    if !kvm() {
        return;
    }
    let mut o = options(Mode::Fixed, 8);
    o.device.extra_args = ["--display", "640x480,800x600"].map(String::from).to_vec();
    let r = run(&o).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.device.num_scanouts, 2, "from the device's Ready");
    assert_eq!(
        r.guest_driver.num_scanouts, 2,
        "what the driver read in virtio_gpu_config"
    );
    // Scanout 0 still shows what the driver drew.
    assert_eq!(r.display.mismatches, Some(0), "{:?}", r.display);
    assert_eq!(
        r.display.blob_scanout_mismatches,
        Some(0),
        "{:?}",
        r.display
    );
}

#[test]
fn the_native_device_is_told_where_the_window_is_and_refuses_backing_there() {
    let _serial = serial();
    let (hm, dev, mut d) = start(&[]);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", dev.pid())).unwrap();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args
        .iter()
        .position(|a| a == "--window-gpa")
        .expect("--window-gpa");
    let gpa = hm.window_gpa();
    assert_eq!(args.get(at + 1), Some(&gpa.to_string()), "{args:?}");
    use hostmem_device::wire::{Command, Response};
    let ok = |d: &mut QueueDriver, c: Command| {
        let resp = d.call(&c.encode()).unwrap();
        Response::parse(&resp).unwrap()
    };
    assert!(matches!(
        ok(&mut d, Command::create_2d(9, 2, 16, 16)),
        Response::OkNoData { .. }
    ));
    // A backing entry in the window (what the guest sees at BAR2): refused, nothing kept.
    let r = ok(
        &mut d,
        Command::attach_backing(9, &[(gpa + 4096, 16 * 16 * 4)]),
    );
    assert!(matches!(r, Response::Err { .. }), "{r:?}");
    // The device still serves.
    assert!(matches!(
        ok(&mut d, Command::unref(9)),
        Response::OkNoData { .. }
    ));
    drop(d);
    let exit = dev.finish("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

#[test]
fn bad_guest_commands_get_error_responses_and_device_keeps_serving() {
    let _serial = serial();
    let (hm, dev, mut d) = start(&[]);
    const P: u64 = 4096;
    assert_eq!(code(d.map_blob(1, 99, 0)), "InvalidResourceId");
    assert_eq!(code(d.create_blob(1, 0, 0, P)), "InvalidResourceId");
    assert_eq!(code(d.create_blob(1, 5, 0, 100)), "InvalidParameter");
    assert_eq!(code(d.create_blob(1, 5, 0, 0)), "InvalidParameter");
    d.create_blob(1, 5, 0, 2 * P).unwrap();
    assert_eq!(code(d.create_blob(1, 5, 0, P)), "InvalidResourceId");
    assert_eq!(code(d.map_blob(1, 5, 123)), "InvalidParameter");
    assert_eq!(code(d.map_blob(1, 5, (16 << 20) - P)), "InvalidParameter");
    assert_eq!(code(d.map_blob(1, 5, u64::MAX - P + 1)), "InvalidParameter");
    assert_eq!(code(d.unmap_blob(1, 5)), "InvalidParameter");
    d.map_blob(1, 5, 4 * P).unwrap();
    assert_eq!(code(d.map_blob(1, 5, 8 * P)), "InvalidParameter");
    // Garbage in a descriptor chain: an error response, not a crash.
    let resp = d.call(&[1, 2, 3]).unwrap();
    let parsed = hostmem_device::wire::Response::parse(&resp).unwrap();
    assert!(matches!(parsed, hostmem_device::wire::Response::Err { .. }));
    // Still serving.
    assert_eq!(hm.live(), 1);
    d.unmap_blob(1, 5).unwrap();
    d.unref(5).unwrap();
    assert_eq!(hm.live(), 0);
    assert_eq!(
        hm.counters().refused,
        0,
        "the device caught all of it before the VMM"
    );
    // Stopping shuts the transport tube down: EOF tells the device to exit cleanly.
    drop(d);
    let exit = dev.finish("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

#[test]
fn vma_headroom_refuses_with_out_of_memory_and_unmaps_still_succeed() {
    let _serial = serial();
    // VMM side: few VMAs left in the VMM's window; the VMM refuses.
    let (hm, dev, d) = start(&[]);
    let now = hostmem_base::procfs::vma_count().unwrap();
    hm.window().set_vma_limit(now + 8 + 12, 8);
    let refused_before = hm.counters().refused;
    map_until_refused_then_unmap_all(&hm, d);
    assert!(hm.counters().refused > refused_before, "the VMM refused");
    dev.finish("test done");

    // Device side: the mirror's VMA budget refuses. The Map event has already left (the
    // device overlaps its mirror placement with the VMM's), so the VMM places it and then
    // gets the take-back Unmap: it refuses nothing, and its window ends up empty.
    let (hm, dev, d) = start(&["--vma-limit", "20"]);
    map_until_refused_then_unmap_all(&hm, d);
    assert_eq!(hm.counters().refused, 0);
    assert_eq!(
        hm.live(),
        0,
        "the taken-back placement is gone from the VMM's window"
    );
    dev.finish("test done");
}

/// Maps one-page blobs until a map is refused (which must be ERR_OUT_OF_MEMORY after at
/// least one success), then unmaps every one of them: each unmap must still succeed.
fn map_until_refused_then_unmap_all(hm: &Hostmem, mut d: QueueDriver) {
    const P: u64 = 4096;
    let mut mapped = vec![];
    let mut refused = None;
    for res in 1..200u32 {
        d.create_blob(1, res, 0, P).unwrap();
        match d.map_blob(1, res, 2 * P * res as u64) {
            Ok(_) => mapped.push(res),
            Err(e) => {
                refused = Some(code(Err::<(), _>(e)));
                break;
            }
        }
    }
    assert_eq!(refused.as_deref(), Some("OutOfMemory"));
    assert!(!mapped.is_empty());
    for res in &mapped {
        d.unmap_blob(1, *res).unwrap();
    }
    assert_eq!(hm.live(), 0);
}

/// A policy folder like ours but without `memfd_create` (what the shm backend needs for
/// every blob).
fn policy_without_memfd_create() -> tempdir::Dir {
    let d = tempdir::Dir::new();
    let ours = hostmem_vmm::policy::default_dir();
    std::fs::copy(
        ours.join("common_device.policy"),
        d.path().join("common_device.policy"),
    )
    .unwrap();
    let shm = std::fs::read_to_string(ours.join("gpu_device_shm.policy")).unwrap();
    let cut: String = shm
        .lines()
        .filter(|l| !l.starts_with("memfd_create"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(d.path().join("gpu_device_shm.policy"), cut).unwrap();
    d
}

mod tempdir {
    /// A temporary folder removed on drop.
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!(
                "hostmem-e2e-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn missing_rule_kills_the_device_by_sigsys_and_the_vmm_names_it() {
    let _serial = serial();
    if !jail_works() {
        return;
    }
    if !kvm() {
        return;
    }
    let dir = policy_without_memfd_create();
    let mut o = options(Mode::Fixed, 5);
    o.restart = Restart::Never;
    o.device.policy = Some(dir.path().join("gpu_device_shm.policy"));
    let r = run(&o).unwrap();
    let exit = r.device_exits.first().expect("the device died");
    assert_eq!(exit.signal, Some(libc::SIGSYS), "{exit:?}");
    // The device's claim (its SIGSYS record) names it too, but only the kernel's record is
    // the fact.
    let claim = exit.sigsys.device_claim.as_ref().map(|c| c.name.as_str());
    assert_eq!(claim, Some("memfd_create"), "{exit:?}");
    match &exit.syscall {
        Some(name) => assert!(name.starts_with("memfd_create"), "{name}"),
        None => {
            assert!(exit.sigsys.kernel_record_unavailable.is_some(), "{exit:?}");
            println!("skipped: the kernel's seccomp audit record was not readable from /dev/kmsg")
        }
    }
    assert!(!r.errors.is_empty(), "the run says it lost the device");
}

#[test]
fn log_mode_reports_the_missing_rule_and_keeps_running() {
    let _serial = serial();
    if !jail_works() {
        return;
    }
    if !kvm() {
        return;
    }
    let dir = policy_without_memfd_create();
    let mut o = options(Mode::Fixed, 10);
    o.device.policy = Some(dir.path().join("gpu_device_shm.policy"));
    o.device.seccomp_log = true;
    let r = run(&o).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.blobs_mapped, 10, "log mode lets the call through");
    // The listener reports each distinct call with its arguments: memfd_create(name, flags)
    // with MFD_CLOEXEC | MFD_ALLOW_SEALING.
    let memfd: Vec<&String> = r
        .seccomp_violations
        .iter()
        .filter(|v| v.starts_with("memfd_create (nr 319) args "))
        .collect();
    assert!(!memfd.is_empty(), "{:?}", r.seccomp_violations);
    for v in memfd {
        let args: Vec<&str> = v.split("args ").nth(1).unwrap().split(", ").collect();
        assert_eq!(args[1], "0x3", "flags argument of {v}");
    }
}

/// The host-side driver on the real device's virtqueues: more commands in flight than it has
/// slots (it waits for completions), every response matched to its command, the device's
/// counters, and a transport reset after which the device serves a fresh context.
#[test]
fn queue_driver_many_in_flight_stats_and_reset() {
    let _serial = serial();
    let (hm, dev, mut d) = start(&[]);
    const P: u64 = 4096;
    let cmds: Vec<u64> = (1..=300u32)
        .map(|res| {
            let c = hostmem_device::wire::Command::create_blob(
                1,
                res,
                hostmem_device::wire::VIRTIO_GPU_BLOB_MEM_HOST3D,
                hostmem_device::wire::VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                0,
                P,
            );
            d.submit(&c.encode()).unwrap()
        })
        .collect();
    // Collected in reverse: earlier responses wait in the driver.
    for tag in cmds.into_iter().rev() {
        d.wait_ok(tag).unwrap();
    }
    assert_eq!(d.in_flight(), 0);
    d.map_blob(1, 7, 0).unwrap();
    assert_eq!(hm.live(), 1);
    let stats = d.device_stats().unwrap();
    assert!(stats.chains >= 302, "{stats:?}");
    assert_eq!(stats.bad_chains, 0, "{stats:?}");
    // Reset: the device drops its blobs (unmapping through the VMM first) and contexts.
    d.reset().unwrap();
    assert_eq!(hm.live(), 0, "the reset unmapped the blob");
    assert_eq!(
        code(d.map_blob(1, 7, 0)),
        "InvalidResourceId",
        "the blob is gone"
    );
    d.ctx_create(1, 0).unwrap();
    d.create_blob(1, 7, 0, P).unwrap();
    d.map_blob(1, 7, 0).unwrap();
    assert_eq!(hm.live(), 1);
    drop(d);
    let exit = dev.finish("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert_eq!(exit.restored, 1);
}

/// A driver that never polls (`--cpu-layout split`'s): each wait sleeps on the call
/// eventfd and says with `used_event` (VIRTIO_RING_F_EVENT_IDX) after which completion it
/// wants it, so waiting for the last of many commands in flight is about one wake-up and
/// the device signals about once, not once per command; the device's `avail_event` spares
/// the driver most kicks of the burst.
#[test]
fn a_sleeping_driver_is_woken_once_for_the_last_of_many() {
    let _serial = serial();
    let (_hm, dev, mut d) = start(&[]);
    d.set_lone_reply_spin(std::time::Duration::ZERO);
    d.set_multi_reply_spin(std::time::Duration::ZERO);
    const N: u32 = 64;
    let before = d.device_stats().unwrap();
    let (sleeps0, kicks0) = (d.stats().sleeps, d.stats().kicks);
    let tags: Vec<u64> = (1..=N)
        .map(|res| {
            let c = hostmem_device::wire::Command::create_blob(
                1,
                res,
                hostmem_device::wire::VIRTIO_GPU_BLOB_MEM_HOST3D,
                hostmem_device::wire::VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                0,
                4096,
            );
            d.submit(&c.encode()).unwrap()
        })
        .collect();
    // The last first: one wait for all of them; the others are then done.
    for tag in tags.into_iter().rev() {
        d.wait_ok(tag).unwrap();
    }
    assert_eq!(d.in_flight(), 0);
    // Event index both ways: the device, busy with the first chains of the burst, did
    // not move avail_event past them, so the driver kicked only a few times (and no
    // command was left unseen: every wait above returned).
    let kicks = d.stats().kicks - kicks0;
    eprintln!("{kicks} kicks for {N} commands");
    assert!(
        (1..=N as u64 / 2).contains(&kicks),
        "{kicks} kicks for {N} commands"
    );
    let sleeps = d.stats().sleeps - sleeps0;
    assert!(
        (1..=4).contains(&sleeps),
        "{sleeps} sleeps for {N} commands"
    );
    let after = d.device_stats().unwrap();
    let signalled = after.interrupts - before.interrupts;
    assert!(
        signalled <= 4,
        "{signalled} notifications for {N} commands ({after:?})"
    );
    // A lone command still completes through a sleep (used_event = the next completion).
    d.map_blob(1, 1, 0).unwrap();
    d.unmap_blob(1, 1).unwrap();
    drop(d);
    let exit = dev.finish("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// A burst of 16 MAP_BLOBs in one kick, then 16 UNMAP_BLOBs, through the real jailed device
/// with its idle poll off (`DeviceConfig::idle_poll_max` 0, passed as
/// `--idle-poll-max-us 0`: the loop sleeps as soon as it has nothing to do). The device
/// announces the run's maps and places its mirror copies afterwards; every map still
/// completes only with the VMM's placement made (the VMM's table holds all 16 at their
/// offsets when the last map is answered), every unmap only with the background back, and
/// the waits in command order each find their answer.
#[test]
fn a_burst_of_maps_and_unmaps_in_one_kick_with_the_idle_poll_off() {
    let _serial = serial();
    let hm = hostmem(16 << 20);
    let mut cfg = device_config();
    cfg.idle_poll_max = Some(std::time::Duration::ZERO);
    let (dev, mut d) = start_device(&cfg, &hm);
    let argv = std::fs::read(format!("/proc/{}/cmdline", dev.pid())).unwrap();
    let argv: Vec<&[u8]> = argv.split(|&b| b == 0).collect();
    assert!(
        argv.windows(2)
            .any(|w| w[0] == b"--idle-poll-max-us" && w[1] == b"0"),
        "the device was told: {argv:?}"
    );
    d.ctx_create(1, 0).unwrap();
    const N: u32 = 16;
    const P: u64 = 4096;
    let at = |res: u32| u64::from(res) * 4 * P;
    for res in 1..=N {
        d.create_blob(1, res, 0, 2 * P).unwrap();
    }
    let tags: Vec<u64> = (1..=N)
        .map(|res| d.submit_map(1, res, at(res)).unwrap())
        .collect();
    for tag in tags {
        d.wait_map(tag).unwrap();
    }
    let mut want: Vec<(u64, u64)> = (1..=N).map(|res| (at(res), 2 * P)).collect();
    want.sort_unstable();
    let mut live = hm.live_ranges();
    live.sort_unstable();
    assert_eq!(live, want, "the VMM placed every map of the burst");
    let stats = d.device_stats().unwrap();
    assert!(
        stats.chains >= u64::from(2 * N + 1),
        "the device took every chain: {stats:?}"
    );
    let tags: Vec<u64> = (1..=N).map(|res| d.submit_unmap(1, res).unwrap()).collect();
    for tag in tags {
        d.wait_ok(tag).unwrap();
    }
    assert_eq!(hm.live(), 0, "every unmap restored the background");
    // The burst again: the same offsets are free in both views.
    let tags: Vec<u64> = (1..=N)
        .map(|res| d.submit_map(1, res, at(res)).unwrap())
        .collect();
    for tag in tags {
        d.wait_map(tag).unwrap();
    }
    assert_eq!(hm.live(), N as usize);
    drop(d);
    let exit = dev.finish("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

/// Issue 22 item 5: a guest that raises its repeatable events without end (10,000 times
/// each: progress past the workload, the warm-up, a device loss) leaves a report of bounded
/// size: at most `Samples::MAX` RSS samples, repeated events counted by kind, the run
/// itself unharmed.
#[test]
fn a_guest_flooding_events_leaves_a_bounded_report() {
    let _serial = serial();
    if !kvm() {
        return;
    }
    let mut o = options(Mode::Fixed, 40);
    o.guest_event_flood = 10_000;
    let r = run(&o).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.blobs_mapped, 40);
    assert_eq!(r.guest_mismatches, 0);
    let samples = r.usage.vmm_rss_anon_kib_samples.len();
    assert!(
        samples <= hostmem_vmm::resources::Samples::MAX + 1,
        "{samples} RSS samples"
    );
    assert!(samples >= 2, "start and end are sampled");
    let w = &r.warnings.vmm;
    assert_eq!(w.get("guest warmed up again"), Some(&10_000), "{w:?}");
    assert_eq!(
        w.get("guest saw DEVICE_NEEDS_RESET"),
        Some(&10_000),
        "{w:?}"
    );
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.len() < 32 << 10, "report of {} bytes", json.len());
}
