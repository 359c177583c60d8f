//! `hostmem vhost-user`'s supervisor ([`hostmem_vmm::vhost_user::supervise`]) with the
//! jailed device (namespaces, empty root, no capabilities, seccomp under
//! `gpu_device_vhost_user.policy`, checked from /proc before it serves): a frontend built on
//! the `vhost` crate negotiates, maps a blob through `SHMEM_MAP` (so the policy covers a
//! whole session), the device is killed, the supervisor restarts it on the same socket and
//! a new frontend is served from a fresh state.
//!
//! And the other side: `hostmem run --transport vhost-user` (our VMM as the frontend of the
//! same jailed device, [`hostmem_vmm::vhost_frontend`]) on real KVM — one memslot, every
//! blob checked by the guest, a kill mid-run — and its `SHMEM_MAP` handler against every
//! check the mapping service makes.

mod common;

#[path = "../../device/tests/common/frontend.rs"]
mod frontend;

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::Duration;

use frontend::{assert_ok, blob, Fe, PAGE};
use hostmem_base::shm::SharedMemory;
use hostmem_device::backend::shm::SHM_CAPSET_ID;
use hostmem_device::backend::shm::{encode_stream, ShmOp};
use hostmem_device::vhost_user::SHMEM_ID;
use hostmem_device::wire::*;
use hostmem_vmm::vhost_user::{
    bind_socket, start_backend, supervise, vhost_user_device, SuperviseOptions,
};
use vhost::vhost_user::message::VhostUserMMap;

const REGION: u64 = 64 << 20;

#[test]
fn jailed_backend_serves_a_frontend_and_is_restarted() {
    let _g = common::serial();
    let cfg = vhost_user_device(common::device_config());
    let path = std::env::temp_dir().join(format!("hostmem-vu-sup-{}.sock", std::process::id()));
    let opts = SuperviseOptions {
        socket: path.clone(),
        shmem_size: REGION,
        max_starts: Some(2),
        backoff: Duration::from_millis(50),
        frames: None,
        screenshot: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let sup = std::thread::spawn(move || {
        supervise(&cfg, &opts, None, |n, facts| {
            tx.send((n, facts.clone())).unwrap();
        })
    });
    let (n, facts) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("device ready");
    assert_eq!(n, 1);
    if facts.jailed {
        assert_eq!((facts.seccomp, facts.no_new_privs), (2, true), "{facts:?}");
        assert_eq!(facts.cap_eff, "0000000000000000");
    }
    let mut fe = Fe::new(&path);
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    blob(&mut fe, 1, 7, 2 * PAGE);
    let r = fe.roundtrip(&Command::map_blob(1, 7, 4 * PAGE));
    assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
    let maps = fe.maps();
    assert_eq!(maps.len(), 1);
    let (m, _) = maps[0];
    let (shmid, off, len) = (m.shmid, m.shm_offset, m.len);
    assert_eq!((shmid, off, len), (SHMEM_ID, 4 * PAGE, 2 * PAGE));
    assert_ok(&fe.roundtrip(&Command::unmap_blob(1, 7)));
    // A crash: the supervisor restarts the device on the same socket.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(facts.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(fe);
    let (n, facts2) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("device restarted");
    assert_eq!(n, 2);
    assert_ne!(facts2.pid, facts.pid);
    let mut fe = Fe::new(&path);
    // Fresh state: resource 7 is unknown to the new device.
    let r = fe.roundtrip(&Command::map_blob(1, 7, 0));
    assert_eq!(r.error(), Some(ErrorCode::InvalidResourceId), "{r:?}");
    drop(fe);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(facts2.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    sup.join().unwrap().expect("supervisor");
    let _ = std::fs::remove_file(path);
}

// ---- hostmem run --transport vhost-user ----

use hostmem_vmm::hostmem::Mode;
use hostmem_vmm::run::{run, Restart, RunOptions, Transport};
use hostmem_vmm::vhost_frontend::ShmemService;
use std::os::unix::fs::FileExt;
use vhost::vhost_user::message::VhostUserMMapFlags;
use vhost::vhost_user::VhostUserFrontendReqHandler;

/// A copy of our policies with the rule for `syscall` removed from `file`, and the shm
/// device config pointing at it (the vhost-user launch takes the vhost-user policy from the
/// same folder).
fn policies_without(file: &str, syscall: &str) -> (PathBuf, hostmem_vmm::device::DeviceConfig) {
    let ours = hostmem_vmm::policy::default_dir();
    let dir = std::env::temp_dir().join(format!(
        "hostmem-vu-policy-{}-{syscall}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "common_device.policy",
        "gpu_device_shm.policy",
        "gpu_device_vhost_user.policy",
    ] {
        let text = std::fs::read_to_string(ours.join(f)).unwrap();
        let kept: String = text
            .lines()
            .filter(|l| f != file || !l.starts_with(&format!("{syscall}:")))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(f != file || kept != text, "{file} has no {syscall} rule");
        std::fs::write(dir.join(f), kept).unwrap();
    }
    let mut cfg = common::device_config();
    cfg.policy = Some(dir.join("gpu_device_shm.policy"));
    cfg.start_timeout = Duration::from_secs(5);
    (dir, vhost_user_device(cfg))
}

/// The vhost-user device is jailed like `Device::start`'s: its filter is installed by the
/// launcher right before the exec, so the loader and the runtime's start-up run filtered (a
/// policy without `sigaltstack`, which Rust's start-up calls before `main`, kills it before
/// it says hello), and a call refused later (`accept4`, once it serves) is named by the
/// kernel's audit record, with the device's SIGSYS record (arguments and all) kept apart as
/// its claim.
#[test]
fn the_vhost_user_device_is_filtered_from_its_first_instruction() {
    let _g = common::serial();
    if !common::jail_works() {
        return;
    }
    let (dir, cfg) = policies_without("common_device.policy", "sigaltstack");
    let path = dir.join("gpu.sock");
    let listener = bind_socket(&path).unwrap();
    let err = start_backend(&cfg, &listener, REGION).expect_err("dies in its start-up");
    let chain = format!("{err:#}");
    assert!(chain.contains("SIGSYS"), "{chain}");
    // Named from the kernel's audit record; where that is unreadable the call is unknown
    // (and the device, dead before its handler existed, claims nothing).
    assert!(
        chain.contains("seccomp: sigaltstack")
            || chain.contains("seccomp: syscall unknown: no kernel record"),
        "named another call: {chain}"
    );
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);

    let (dir, cfg) = policies_without("gpu_device_vhost_user.policy", "accept4");
    let path = dir.join("gpu.sock");
    let listener = bind_socket(&path).unwrap();
    let mut dev = start_backend(&cfg, &listener, REGION).expect("starts; accept4 comes later");
    let info = dev.wait().unwrap();
    assert!(
        matches!(info, hostmem_jail::launch::ExitInfo::Signaled { signal, .. } if signal == libc::SIGSYS),
        "{info:?}"
    );
    let end = dev.end();
    // The device's own record (its SIGSYS handler's) has the arguments (the listening
    // socket is fd 3), but it is only a claim; the fact is the kernel's audit record, which
    // has none, where the kernel's rate limit let it through.
    let claim = end
        .sigsys
        .device_claim
        .clone()
        .expect("the reporter's record");
    assert_eq!(claim.name, "accept4", "{}", end.sigsys);
    assert_eq!(claim.args.map(|a| a[0]), Some(3), "{}", end.sigsys);
    match &end.sigsys.kernel_record {
        Some(k) => {
            assert_eq!(k.name, "accept4", "{}", end.sigsys);
            let syscall = end.syscall.clone().unwrap_or_default();
            assert!(syscall.starts_with("accept4 (nr 288)"), "{syscall:?}");
            assert_eq!(end.sigsys.claim_agrees(), Some(true), "{}", end.sigsys);
        }
        None => {
            assert_eq!(end.syscall, None, "no fact without the kernel's record");
            println!("no kernel record here: {}", end.sigsys);
        }
    }
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The vhost-user device runs under its memory limit like `Device::start`'s: its own memory
/// cgroup, the device alone in it; filling a blob past the limit gets it OOM-killed, which
/// the supervisor's check names, and the group goes with the device.
#[test]
fn the_vhost_user_device_is_oom_killed_at_its_memory_limit() {
    let _g = common::serial();
    let mut cfg = vhost_user_device(common::device_config());
    cfg.memory_limit = Some(32 << 20);
    let dir = std::env::temp_dir().join(format!("hostmem-vu-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gpu.sock");
    let listener = bind_socket(&path).unwrap();
    let mut dev = start_backend(&cfg, &listener, REGION).unwrap();
    let m = dev.facts().memory_limit.clone();
    assert_eq!(m.bytes, 32 << 20);
    if m.how != "cgroup-v1" {
        println!("skipped: no memory cgroup here ({:?})", m.fallback_reason);
        assert_eq!(m.how, "rlimit");
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", dev.facts().pid)).unwrap();
        assert!(limits.contains(&(32u64 << 20).to_string()), "{limits}");
        dev.end();
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let group = m.cgroup.clone().unwrap();
    let limit = std::fs::read_to_string(group.join("memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (32u64 << 20).to_string());
    let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap();
    assert_eq!(
        procs.trim(),
        dev.facts().pid.to_string(),
        "the device alone"
    );
    let mut fe = Fe::new(&path);
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    // Blobs up to the device's blob budget (its memory limit; one more byte is refused,
    // issue 22) and the device writes every page of them: with its own memory on top, that
    // is past the limit of its group.
    let size = 8 << 20;
    for r in 7..11 {
        blob(&mut fe, 1, r, size);
    }
    let past = fe.roundtrip(&Command::create_blob(
        1,
        11,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
        0,
        4096,
    ));
    assert!(
        matches!(
            past,
            Response::Err {
                code: ErrorCode::OutOfMemory,
                ..
            }
        ),
        "past the budget: {past:?}"
    );
    for r in 7..11 {
        let fill = encode_stream(&[ShmOp::Fill {
            resource_id: r,
            offset: 0,
            len: size,
            seed: 1,
        }]);
        fe.post(&Command::submit_3d(1, fill));
    }
    let info = dev.wait().unwrap();
    assert!(
        matches!(info, hostmem_jail::launch::ExitInfo::Signaled { signal, .. } if signal == libc::SIGKILL),
        "{info:?}"
    );
    assert!(dev.oom_killed(&info), "the group counted an OOM kill");
    let end = dev.end();
    assert!(end.oom_killed, "{end:?}");
    assert!(
        end.max_memory <= 32 << 20 && end.max_memory + (4 << 20) >= 32 << 20,
        "peak {} bytes",
        end.max_memory
    );
    assert!(!group.exists(), "the cgroup goes with the device");
    drop(fe);
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}

fn vu_options(blobs: u32) -> RunOptions {
    RunOptions {
        transport: Transport::VhostUser,
        mode: Mode::Fixed,
        window: 64 << 20,
        blobs,
        seed: 11,
        max_live: 16,
        device: common::device_config(),
        restart: Restart::OnFailure(2),
        kill_after: None,
        show_progress: false,
        command_timeout: hostmem_vmm::queue_driver::COMMAND_TIMEOUT,
        guest_event_flood: 0,
        screenshot: None,
    }
}

#[test]
fn run_over_vhost_user_places_every_shmem_map_in_one_memslot() {
    let _g = common::serial();
    if !common::kvm() {
        return;
    }
    let mut o = vu_options(120);
    // --device-memory reaches the vhost-user device as it does the native one.
    o.device.memory_limit = Some(192 << 20);
    let r = run(&o).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.transport, "vhost-user");
    assert_eq!(r.device_memory_limit.bytes, 192 << 20);
    assert_eq!(r.device.memory_limit, r.device_memory_limit);
    assert!(
        ["cgroup-v1", "rlimit"].contains(&r.device_memory_limit.how.as_str()),
        "{:?}",
        r.device_memory_limit
    );
    assert_eq!(r.device_oom_kills, 0);
    assert_eq!(r.blobs_mapped, 120);
    assert_eq!(r.guest_mismatches, 0);
    assert_eq!(r.guest_holes, 0);
    // Every blob read once, zeros after every unmap, guest writes seen by the device.
    assert!(r.guest_verified >= 240, "{}", r.guest_verified);
    // QEMU and crosvm would have added and removed a memslot per SHMEM_MAP here.
    assert_eq!(r.memslot_changes, 1);
    assert!(r.max_live_placements > 1);
    assert_eq!(r.refused_events, 0);
    assert_eq!(r.guest_driver.errors, 0);
    assert_eq!(r.vmm_fds.0, r.vmm_fds.1, "VMM fd count back to baseline");
    assert!(
        r.seccomp_violations.is_empty(),
        "{:?}",
        r.seccomp_violations
    );
    if r.device.jailed {
        assert_eq!((r.device.seccomp, r.device.no_new_privs), (2, true));
        assert_eq!(r.device.cap_eff, "0000000000000000");
    }
    assert_eq!(r.device.num_capsets, 1, "GET_CONFIG's num_capsets");
}

#[test]
fn run_over_vhost_user_survives_a_device_kill() {
    let _g = common::serial();
    if !common::kvm() {
        return;
    }
    let mut o = vu_options(80);
    o.kill_after = Some(30);
    let r = run(&o).unwrap();
    assert_eq!(r.device_exits.len(), 1, "{:?}", r.device_exits);
    let exit = &r.device_exits[0];
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(exit.restored > 0, "live placements restored: {exit:?}");
    assert!(!exit.oom_killed, "our SIGKILL is not an OOM kill: {exit:?}");
    assert_eq!(r.restarts, 1);
    assert_eq!(
        r.guest_driver.device_resets, 1,
        "the guest reset the device"
    );
    // The guest read zeros where the dead device's blobs were, and went on.
    assert_eq!(r.guest_mismatches, 0);
    assert!(r.blobs_mapped >= 79, "{}", r.blobs_mapped);
    assert_eq!(r.memslot_changes, 1);
    assert_eq!(r.vmm_fds.0, r.vmm_fds.1, "VMM fds back after the death");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

fn mmap_req(shmid: u8, shm_offset: u64, len: u64, fd_offset: u64) -> VhostUserMMap {
    VhostUserMMap {
        shmid,
        shm_offset,
        len,
        fd_offset,
        flags: VhostUserMMapFlags::WRITABLE.bits(),
        ..Default::default()
    }
}

fn errno(r: std::io::Result<u64>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn shmem_map_goes_through_every_check_of_the_mapping_service() {
    // Serial: the run tests here compare the process's fd count.
    let _g = common::serial();
    let hm = common::hostmem(REGION);
    let svc = ShmemService::new(hm.clone());
    let sealed = SharedMemory::new("blob", 4 * PAGE).unwrap();
    std::fs::File::from(sealed.try_clone_fd().unwrap())
        .write_all_at(b"vhost-user", PAGE)
        .unwrap();
    sealed.seal_size().unwrap();
    let fd = sealed.as_fd();
    let einval = Some(libc::EINVAL);
    // Another region, misaligned fields, past the end, zero length.
    assert_eq!(errno(svc.shmem_map(&mmap_req(2, 0, PAGE, 0), &fd)), einval);
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, 100, PAGE, 0), &fd)),
        einval
    );
    assert_eq!(errno(svc.shmem_map(&mmap_req(1, 0, 100, 0), &fd)), einval);
    assert_eq!(errno(svc.shmem_map(&mmap_req(1, 0, PAGE, 1), &fd)), einval);
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, REGION, PAGE, 0), &fd)),
        einval
    );
    assert_eq!(errno(svc.shmem_map(&mmap_req(1, 0, 0, 0), &fd)), einval);
    // Longer than the file.
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, 0, 8 * PAGE, 0), &fd)),
        einval
    );
    // A file that can shrink under the mapping.
    let unsealed = SharedMemory::new("unsealed", PAGE).unwrap();
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, 0, PAGE, 0), &unsealed.as_fd())),
        einval
    );
    // Not a regular file.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, 0, PAGE, 0), &a.as_fd())),
        einval
    );
    // Files the VMM gave the device (issue 22): the window itself, guest RAM; and a
    // read-only reopen of a good blob.
    let refused0 = hm.counters().refused;
    let ram = SharedMemory::new("guest-ram", 4 * PAGE).unwrap();
    ram.seal_for_sharing().unwrap();
    hm.note_given("guest RAM", ram.as_fd()).unwrap();
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, 0, PAGE, 0), &ram.as_fd())),
        einval
    );
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, 0, PAGE, 0), &hm.window().memfd().as_fd())),
        einval
    );
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, 0, PAGE, 0), &ro.as_fd())),
        einval
    );
    assert_eq!(
        hm.counters().refused,
        refused0 + 3,
        "refused by the mapping service"
    );
    assert_eq!(hm.live(), 0, "nothing placed by a refused request");
    // A good one is placed in the window before the ack.
    assert_eq!(
        svc.shmem_map(&mmap_req(1, 8 * PAGE, 2 * PAGE, PAGE), &fd)
            .unwrap(),
        0
    );
    let mut b = [0u8; 10];
    hm.window().read(8 * PAGE, &mut b).unwrap();
    assert_eq!(&b, b"vhost-user");
    // Overlap with it.
    assert_eq!(
        errno(svc.shmem_map(&mmap_req(1, 9 * PAGE, PAGE, 0), &fd)),
        einval
    );
    // Unmap must name exactly the placement.
    assert_eq!(
        errno(svc.shmem_unmap(&mmap_req(1, 8 * PAGE, PAGE, 0))),
        einval
    );
    assert_eq!(
        errno(svc.shmem_unmap(&mmap_req(1, 9 * PAGE, PAGE, 0))),
        einval
    );
    assert_eq!(
        errno(svc.shmem_unmap(&mmap_req(2, 8 * PAGE, 2 * PAGE, 0))),
        einval
    );
    assert_eq!(
        svc.shmem_unmap(&mmap_req(1, 8 * PAGE, 2 * PAGE, 0))
            .unwrap(),
        0
    );
    hm.window().read(8 * PAGE, &mut b).unwrap();
    assert_eq!(b, [0u8; 10], "background again before the ack");
    assert_eq!(hm.live(), 0);
    hm.audit().unwrap();
    let c = hm.counters();
    assert_eq!((c.maps_ok, c.unmaps_ok), (1, 1));
}

#[test]
fn bench_runs_the_vhost_user_case_with_one_memslot() {
    let _g = common::serial();
    if !common::kvm() {
        return;
    }
    use hostmem_vmm::bench::{self, BenchOptions, CaseKind};
    let mut o = BenchOptions::tiny(common::device_config());
    o.cases = vec![CaseKind::Floor, CaseKind::FixedSandboxed];
    o.vhost_user = true;
    o.cold_starts = 1;
    let r = bench::run(&o).expect("bench");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let c = r
        .case(hostmem_vmm::bench::vhost_user::NAME)
        .expect("the case ran");
    assert!(c.failed.is_none(), "{:?}", c.failed);
    let per_level = (o.rounds * o.batch) as u64;
    assert_eq!(c.cycles, per_level);
    let cycles: u64 = c.sweep.iter().map(|p| p.cycles).sum();
    assert_eq!(cycles, per_level * o.levels.len() as u64);
    let ch = &c.checks;
    assert_eq!(
        (ch.guest_mismatches, ch.stale_reads, ch.host_mismatches),
        (0, 0, 0)
    );
    assert_eq!(c.guest_holes, 0);
    // Warm-up: 2 guest reads per blob, then 2 per timed cycle; the host saw the warm-up.
    assert_eq!(ch.guest_verified, 2 * o.blobs as u64 + 2 * cycles, "{ch:?}");
    assert_eq!(ch.host_verified, 2 * o.blobs as u64);
    assert_eq!(c.memslot_changes, 1);
    assert!(c.peak_live > *o.levels.iter().max().unwrap());
    let cyc = |n: &str| r.case(n).unwrap().cycle_us.p50;
    assert_eq!(
        r.ratios["vhost_user_vs_floor"],
        cyc(hostmem_vmm::bench::vhost_user::NAME) / cyc("floor")
    );
    assert_eq!(
        r.ratios["vhost_user_vs_fixed_sandboxed"],
        cyc(hostmem_vmm::bench::vhost_user::NAME) / cyc("fixed-sandboxed")
    );
    assert!(bench::render(&r).contains("vhost-user-sandboxed"));
}

// ---- issue 22 item 3: every wait on the backend is bounded ----

/// Binds nothing (no KVM needed: the transport's eventfds stay unbound).
#[derive(Debug)]
struct NoBinder;

impl hostmem_vmm::virtio_pci::EventBinder for NoBinder {
    fn bind_kick(
        &self,
        _: &hostmem_base::kvm::EventFd,
        _: u64,
    ) -> Result<(), hostmem_base::kvm::KvmError> {
        Ok(())
    }
    fn unbind_kick(
        &self,
        _: &hostmem_base::kvm::EventFd,
        _: u64,
    ) -> Result<(), hostmem_base::kvm::KvmError> {
        Ok(())
    }
    fn bind_call(
        &self,
        _: &hostmem_base::kvm::EventFd,
        _: u32,
    ) -> Result<(), hostmem_base::kvm::KvmError> {
        Ok(())
    }
    fn unbind_call(
        &self,
        _: &hostmem_base::kvm::EventFd,
        _: u32,
    ) -> Result<(), hostmem_base::kvm::KvmError> {
        Ok(())
    }
}

/// A vhost-user backend that never answers (the real jailed device, stopped with SIGSTOP
/// as if busy in a long `SUBMIT_3D`): the guest's reset (`RESET_DEVICE`, acked) returns
/// within a bound although `vhost`'s `wait_for_ack` retries on `EAGAIN`; the reset is not
/// done (the guest reads DEVICE_NEEDS_RESET), the device is declared lost as a native
/// device that misses its reply timeout is, and stopping it restores the window.
/// Mutation-checked: without the deadline (`Watchdog::bounded` calling straight through)
/// the reset does not return within 15 s and the test fails.
#[test]
fn a_backend_that_never_acks_is_lost_within_a_bound() {
    use hostmem_vmm::hostmem::DEFAULT_WINDOW_GPA;
    use hostmem_vmm::vhost_frontend::VhostUserDevice;
    use hostmem_vmm::virtio_pci::{status, PciLayout, VirtioPciGpu};
    let _g = common::serial();
    let deadline = Duration::from_secs(2);
    let window = 64 << 20;
    let hm = common::hostmem(window);
    let mut dev = VhostUserDevice::start(&common::device_config(), hm.clone(), deadline)
        .expect("vhost-user device");
    let ram = SharedMemory::new("guest-ram", 2 << 20).unwrap();
    ram.seal_for_sharing().unwrap();
    let region = hostmem_ipc::protocol::GuestRegion {
        gpa: 0,
        size: 2 << 20,
        fd_offset: 0,
    };
    let mut gpu = VirtioPciGpu::with_binder(
        std::sync::Arc::new(NoBinder),
        PciLayout::new(DEFAULT_WINDOW_GPA, window),
        vec![(region, ram.try_clone_fd().unwrap())],
    )
    .unwrap();
    gpu.watch_window(hm.clone());
    let n = dev.facts().num_capsets;
    gpu.attach_link(dev.take_link().unwrap(), n).unwrap();
    let status_gpa = gpu.layout().bar0_gpa + 0x14;
    // Memory decoding on (PCI command register of bus 0, device 1).
    assert!(gpu.pio_write(0xcf8, &(0x8000_0000u32 | (1 << 11) | 0x04).to_le_bytes()));
    assert!(gpu.pio_write(0xcfc, &0x6u16.to_le_bytes()));
    // A reset the device answers completes.
    assert!(gpu.mmio_write(status_gpa, &[0]));
    let mut st = [0xffu8];
    assert!(gpu.mmio_read(status_gpa, &mut st));
    assert_eq!(st[0], 0);
    // The device stops answering.
    dev.kill(libc::SIGSTOP);
    let (tx, rx) = std::sync::mpsc::channel();
    let guest = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        assert!(gpu.mmio_write(status_gpa, &[0]));
        tx.send(t0.elapsed()).unwrap();
        gpu
    });
    let took = rx.recv_timeout(Duration::from_secs(15));
    let Ok(took) = took else {
        let exit = dev.stop("the test gave up");
        let _ = guest.join();
        panic!("the reset did not return within 15 s for a {deadline:?} deadline ({exit:?})");
    };
    let mut gpu = guest.join().unwrap();
    assert!(took >= deadline, "{took:?}");
    let mut st = [0u8];
    assert!(gpu.mmio_read(status_gpa, &mut st));
    assert_eq!(st[0], status::DEVICE_NEEDS_RESET, "the reset is not done");
    let why = gpu.lost().expect("declared lost").to_string();
    assert!(
        why.contains("RESET_DEVICE") && why.contains("no answer within"),
        "{why}"
    );
    assert!(!gpu.is_attached());
    // What the supervisor does with a lost device: kill it, restore the window.
    let exit = dev.stop(&why);
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    assert_eq!(hm.live(), 0);
    gpu.detach();
    assert!(gpu.mmio_write(status_gpa, &[0]));
    assert!(gpu.mmio_read(status_gpa, &mut st));
    assert_eq!(
        st[0], 0,
        "after the supervisor stopped it, the driver's reset completes"
    );
}

// ---- issue 25 item 3: several placements in flight over our frontend ----

#[test]
fn several_placements_in_flight_over_our_frontend_each_answered_after_its_verdict() {
    use hostmem_device::backend::shm::pattern_qword;
    use hostmem_vmm::queue_driver::QueueDriver;
    use hostmem_vmm::vhost_frontend::VhostUserDevice;
    let _g = common::serial();
    let hm = common::hostmem(REGION);
    let mut dev = VhostUserDevice::start(
        &common::device_config(),
        hm.clone(),
        Duration::from_secs(10),
    )
    .expect("vhost-user device");
    let mut d = QueueDriver::new(dev.transport().unwrap(), &hm).unwrap();
    d.ctx_create(1, 0).unwrap();
    const N: u32 = 12;
    let at = |i: u32| u64::from(i) * 4 * PAGE;
    let seed = |i: u32| 0x5eed_0000 + u64::from(i);
    for i in 0..N {
        d.create_blob(1, 10 + i, 0, 2 * PAGE).unwrap();
        let fill = encode_stream(&[ShmOp::Fill {
            resource_id: 10 + i,
            offset: 0,
            len: 2 * PAGE,
            seed: seed(i),
        }]);
        d.submit_3d(1, fill).unwrap();
    }
    let read = |off: u64| {
        let mut q = [0u8; 8];
        hm.window().read(off, &mut q).unwrap();
        u64::from_le_bytes(q)
    };
    for round in 0..3 {
        // Every MAP_BLOB in the ring before the first answer: the device sends the
        // SHMEM_MAPs without waiting for each ack, and answers each after its own.
        let tags: Vec<u64> = (0..N)
            .map(|i| d.submit_map(1, 10 + i, at(i)).unwrap())
            .collect();
        for (i, t) in (0..N).zip(tags) {
            d.wait_map(t).unwrap();
            assert_eq!(
                read(at(i)),
                pattern_qword(seed(i), 0),
                "round {round} blob {i}"
            );
        }
        assert_eq!(hm.live(), N as usize);
        // Invariant 2: an UNMAP_BLOB's answer comes only after the range is background
        // again, for each of many in flight.
        let tags: Vec<u64> = (0..N).map(|i| d.submit_unmap(1, 10 + i).unwrap()).collect();
        for (i, t) in (0..N).zip(tags) {
            d.wait_ok(t).unwrap();
            assert_eq!(
                read(at(i)),
                0,
                "round {round} blob {i} answered before its restore"
            );
        }
        assert_eq!(hm.live(), 0);
    }
    assert_eq!(hm.counters().refused, 0);
    drop(d);
    dev.finish("test done");
}
