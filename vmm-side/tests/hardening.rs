//! Issue 14, the VMM's side of it: no accepted placement makes a guest access fault (KVM_RUN
//! EFAULT or SIGBUS in the VMM), a failed placement leaves no hole, and what the device can
//! do to the shared memfds (window, guest RAM) cannot take the window away from the VMM.
//!
//! The guest checks run a real KVM vCPU (the ring-3 probe) writing to the window; without a
//! usable `/dev/kvm` they print `skipped: <reason>`.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use hostmem_base::kvm::Vm;
use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_ipc::protocol::{Outcome, RefuseCode};
use hostmem_vmm::hostmem::{Hostmem, Limits, MapEvent, Mode, DEFAULT_WINDOW_GPA};
use hostmem_vmm::probe::{expected_hash, fill_pattern, GuestProbe, ProbeRead, ProbeWrite};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};

const P: u64 = 4096;
const WINDOW: u64 = 4 << 20;
const RW: u32 = (libc::PROT_READ | libc::PROT_WRITE) as u32;

struct Guest {
    hm: Arc<Hostmem>,
    probe: Option<GuestProbe>,
}

/// A fixed-mode window, with a VM and the probe vCPU when KVM works.
fn guest() -> Guest {
    let vm = common::kvm().then(|| Arc::new(Vm::open().expect("Vm::open")));
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
    let probe = vm.map(|vm| GuestProbe::new(vm, DEFAULT_WINDOW_GPA, WINDOW, 4 << 20).unwrap());
    Guest { hm, probe }
}

impl Guest {
    /// The guest writes a pattern over `offset..+len` and reads it back; every write lands.
    fn writes_land(&mut self, offset: u64, len: u64, seed: u64) {
        let Some(p) = &mut self.probe else { return };
        assert_eq!(p.fill(offset, len, seed).unwrap(), ProbeWrite::Written);
        assert_eq!(
            p.hash(offset, len).unwrap(),
            ProbeRead::Value(expected_hash(&fill_pattern(len, seed)))
        );
    }

    fn reads_zeros(&mut self, offset: u64, len: u64) {
        let mut host = vec![1u8; len as usize];
        self.hm.window().read(offset, &mut host).unwrap();
        assert!(host.iter().all(|&b| b == 0), "host view at {offset:#x}");
        let Some(p) = &mut self.probe else { return };
        assert_eq!(
            p.hash(offset, len).unwrap(),
            ProbeRead::Value(expected_hash(&vec![0u8; len as usize]))
        );
    }
}

fn blob(len: u64) -> SharedMemory {
    let shm = SharedMemory::new("hardening-blob", len).unwrap();
    MemoryMapping::from_fd(shm.as_fd(), 0, len as usize, Prot::READ_WRITE)
        .unwrap()
        .fill(0, len as usize, 0x5a)
        .unwrap();
    shm.seal_size().unwrap();
    shm
}

fn ev(resource_id: u32, offset: u64, len: u64, prot: u32) -> MapEvent {
    MapEvent {
        resource_id,
        offset,
        len,
        fd_offset: 0,
        prot,
    }
}

fn refused_invalid(o: Outcome, what: &str) -> String {
    match o {
        Outcome::Refused {
            code: RefuseCode::InvalidParameter,
            reason,
        } => reason,
        other => panic!("{what}: {other:?}, want InvalidParameter"),
    }
}

#[test]
fn read_only_placements_are_refused_so_guest_writes_never_fault() {
    let _s = common::serial();
    let mut g = guest();
    let b = blob(4 * P);
    let why = refused_invalid(
        g.hm.handle_map(
            &ev(1, 0, 4 * P, libc::PROT_READ as u32),
            Some(b.try_clone_fd().unwrap()),
        ),
        "read-only placement",
    );
    assert!(why.contains("READ|WRITE"), "{why}");
    g.hm.audit().unwrap();
    // Whatever the device claimed, the guest's write there lands (background).
    g.writes_land(0, 4 * P, 7);
    // A read/write placement takes guest writes, and they reach the blob.
    assert_eq!(
        g.hm.handle_map(&ev(2, 8 * P, 4 * P, RW), Some(b.try_clone_fd().unwrap())),
        Outcome::Ok
    );
    g.writes_land(8 * P, 4 * P, 9);
    if g.probe.is_some() {
        let mut got = vec![0u8; 4 * P as usize];
        MemoryMapping::from_fd(b.as_fd(), 0, 4 * P as usize, Prot::READ)
            .unwrap()
            .read_slice(0, &mut got)
            .unwrap();
        assert_eq!(got, fill_pattern(4 * P, 9));
    }
    g.hm.reset().unwrap();
}

/// Why the refusal above matters: a read-only mapping in the window (placed past the VMM's
/// checks, straight into its `Window`) makes the guest's write fail KVM_RUN with EFAULT.
#[test]
fn a_read_only_mapping_would_fault_the_guest() {
    let _s = common::serial();
    let mut g = guest();
    let Some(probe) = &mut g.probe else { return };
    let b = blob(P);
    g.hm.window()
        .place(16 * P, P, b.as_fd(), 0, Prot::READ)
        .unwrap();
    let r = probe.write_u64(16 * P, 1);
    assert!(
        matches!(&r, Err(hostmem_vmm::probe::ProbeError::Vcpu(e)) if e.errno() == libc::EFAULT),
        "a guest write to a read-only mapping: {r:?}"
    );
    g.hm.window().restore(16 * P, P).unwrap();
    g.writes_land(16 * P, P, 3);
}

#[test]
fn write_sealed_fds_are_invalid_parameters_not_failed_mmaps() {
    let _s = common::serial();
    let mut g = guest();
    for (i, seal) in [SealFlag::F_SEAL_WRITE, SealFlag::F_SEAL_FUTURE_WRITE]
        .into_iter()
        .enumerate()
    {
        let b = blob(2 * P);
        fcntl(b.as_fd().as_raw_fd(), FcntlArg::F_ADD_SEALS(seal)).unwrap();
        let why = refused_invalid(
            g.hm.handle_map(
                &ev(10 + i as u32, 0, 2 * P, RW),
                Some(b.try_clone_fd().unwrap()),
            ),
            "write-sealed fd",
        );
        assert!(why.contains("sealed against writes"), "{seal:?}: {why}");
        g.hm.audit().unwrap();
        g.writes_land(0, 2 * P, i as u64);
    }
}

#[test]
fn a_failed_placement_leaves_background_the_guest_can_write() {
    let _s = common::serial();
    let mut g = guest();
    let b = blob(4 * P);
    // The VMM's MAP_FIXED fails the way a pre-6.12 kernel's does (range unmapped first).
    g.hm.window().inject_map_failures(1, true);
    match g
        .hm
        .handle_map(&ev(1, 4 * P, 4 * P, RW), Some(b.try_clone_fd().unwrap()))
    {
        Outcome::Refused {
            code: RefuseCode::OutOfMemory,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    g.hm.audit().expect("no hole after a failed placement");
    assert_eq!(g.hm.live(), 0);
    g.reads_zeros(4 * P, 4 * P);
    g.writes_land(4 * P, 4 * P, 11);
    // A failed unmap (the restore's MAP_FIXED, twice) still restores.
    g.hm.window().restore_all().unwrap();
    assert_eq!(
        g.hm.handle_map(&ev(1, 4 * P, 4 * P, RW), Some(b.try_clone_fd().unwrap())),
        Outcome::Ok
    );
    g.hm.window().inject_map_failures(2, true);
    assert_eq!(g.hm.handle_unmap(1, 4 * P, 4 * P), Outcome::Ok);
    g.hm.audit().unwrap();
    g.reads_zeros(4 * P, 4 * P);
    g.writes_land(4 * P, 4 * P, 12);
}

#[test]
fn the_window_memfd_is_sealed_before_anyone_else_holds_it() {
    let _s = common::serial();
    let g = guest();
    let seals = g.hm.window().memfd().seals().unwrap();
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & want, want, "seals {seals:#x}");
    assert_eq!(seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE), 0);
}

/// Seccomp before the device's first instruction: the launcher installs the filter right
/// before the exec, so the loader and the Rust runtime's start-up run filtered. A policy
/// without `sigaltstack` (which Rust's start-up calls before `main`) kills the device before
/// it says hello, and the VMM names the call: the kernel's audit record of the trap (there
/// is no SIGSYS handler yet), read from /dev/kmsg.
#[test]
fn the_filter_is_on_before_the_devices_first_instruction() {
    let _s = common::serial();
    if !common::jail_works() {
        return;
    }
    let ours = hostmem_vmm::policy::default_dir();
    let dir = std::env::temp_dir().join(format!("hostmem-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["common_device.policy", "gpu_device_shm.policy"] {
        let text = std::fs::read_to_string(ours.join(f)).unwrap();
        let cut: String = text
            .lines()
            .filter(|l| !l.starts_with("sigaltstack"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(dir.join(f), cut).unwrap();
    }
    let mut cfg = common::device_config();
    cfg.policy = Some(dir.join("gpu_device_shm.policy"));
    cfg.start_timeout = std::time::Duration::from_secs(5);
    let hm = common::hostmem(WINDOW);
    let kmsg = std::fs::File::open("/dev/kmsg").is_ok();
    // The kernel log is rate-limited and shared with the whole machine: a few attempts.
    let mut named = false;
    for _ in 0..5 {
        let err = hostmem_vmm::device::Device::start(&cfg, hm.clone())
            .expect_err("the device dies in its start-up");
        let chain = format!("{err:#}");
        assert!(chain.contains("SIGSYS"), "{chain}");
        hm.audit().unwrap();
        if !kmsg || chain.contains("seccomp: sigaltstack") {
            named = true;
            break;
        }
        assert!(
            chain.contains("seccomp: syscall unknown: no kernel record"),
            "named another call: {chain}"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    if !kmsg {
        println!("skipped: /dev/kmsg unreadable, the call is not named");
    } else if !named {
        println!("skipped: the kernel's audit records were rate-limited away in 5 attempts");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The device's memory limit is in force and reported: its own memory cgroup with the
/// configured limit (or, without one, the rlimit fallback, said so).
#[test]
fn the_device_runs_under_its_memory_limit() {
    let _s = common::serial();
    let mut cfg = common::device_config();
    cfg.memory_limit = Some(96 << 20);
    let hm = common::hostmem(WINDOW);
    let dev = hostmem_vmm::device::Device::start(&cfg, hm.clone()).unwrap();
    let m = dev.facts().memory_limit.clone();
    assert_eq!(m.bytes, 96 << 20);
    match m.how.as_str() {
        "cgroup-v1" => {
            let dir = m.cgroup.clone().unwrap();
            let limit = std::fs::read_to_string(dir.join("memory.limit_in_bytes")).unwrap();
            assert_eq!(limit.trim(), (96u64 << 20).to_string());
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            assert_eq!(procs.trim(), dev.pid().to_string(), "the device alone");
            let exit = dev.stop("done");
            assert!(!exit.oom_killed);
            assert!(!dir.exists(), "the cgroup goes with the device");
        }
        "rlimit" => {
            println!("skipped: no memory cgroup here ({:?})", m.fallback_reason);
            let limits = std::fs::read_to_string(format!("/proc/{}/limits", dev.pid())).unwrap();
            assert!(limits.contains(&(96u64 << 20).to_string()), "{limits}");
            dev.stop("done");
        }
        other => panic!("{other}"),
    }
}

/// `path` (a `/proc/self/fd/N`) opened again with these access flags, as an owned fd.
fn reopen(path: &str, read: bool, write: bool, custom: i32) -> std::os::fd::OwnedFd {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(read)
        .write(write)
        .custom_flags(custom)
        .open(path)
        .unwrap_or_else(|e| panic!("reopen {path}: {e}"))
        .into()
}

/// Issue 22 item 6: a file the VMM gave the device (the window's own memfd, guest RAM) is
/// refused as a blob by identity, whichever fd of it comes back (a dup, a reopen); the
/// window is unchanged and a copy of the same size and seals is accepted.
#[test]
fn fds_the_vmm_gave_the_device_never_come_back_as_blobs() {
    let _s = common::serial();
    let mut g = guest();
    // Guest RAM as the transport and the queue driver make it, recorded as given.
    let ram = SharedMemory::new("hardening-guest-ram", 8 * P).unwrap();
    ram.seal_for_sharing().unwrap();
    g.hm.note_given("guest RAM", ram.as_fd()).unwrap();
    g.hm.note_given("guest RAM", ram.as_fd()).unwrap();
    assert_eq!(g.hm.given_files(), 2, "window + RAM, each once");
    let win = g.hm.window().memfd();
    let win_path = format!("/proc/self/fd/{}", win.as_fd().as_raw_fd());
    let ram_path = format!("/proc/self/fd/{}", ram.as_fd().as_raw_fd());
    let tries: Vec<(&str, std::os::fd::OwnedFd, &str)> = vec![
        (
            "the window memfd",
            win.try_clone_fd().unwrap(),
            "window memfd",
        ),
        (
            "a reopen of the window",
            reopen(&win_path, true, true, 0),
            "window memfd",
        ),
        ("guest RAM", ram.try_clone_fd().unwrap(), "guest RAM"),
        (
            "a reopen of guest RAM",
            reopen(&ram_path, true, true, 0),
            "guest RAM",
        ),
    ];
    let before = g.hm.counters();
    for (i, (what, fd, names)) in tries.into_iter().enumerate() {
        let why = refused_invalid(
            g.hm.handle_map(&ev(20 + i as u32, 4 * P, 4 * P, RW), Some(fd)),
            what,
        );
        assert!(
            why.contains("the VMM's own") && why.contains(names),
            "{what}: {why}"
        );
        g.hm.audit().unwrap();
        assert_eq!(g.hm.live(), 0, "{what}: nothing placed");
        g.reads_zeros(4 * P, 4 * P);
        g.writes_land(4 * P, 4 * P, 30 + i as u64);
        g.hm.window().restore_all().unwrap();
    }
    assert_eq!(g.hm.counters().refused - before.refused, 4);
    assert_eq!(g.hm.counters().maps_ok, before.maps_ok);
    // Another file with the same size and seals is a blob like any other.
    let copy = SharedMemory::new("hardening-not-given", 8 * P).unwrap();
    copy.seal_for_sharing().unwrap();
    assert_eq!(
        g.hm.handle_map(
            &ev(30, 4 * P, 4 * P, RW),
            Some(copy.try_clone_fd().unwrap())
        ),
        Outcome::Ok
    );
    g.hm.audit().unwrap();
}

/// Issue 22 item 7: what `mmap` would refuse is refused before it, as an invalid parameter
/// that names the cause (not as a failed MAP_FIXED answered out of memory): a read-only or
/// write-only reopen of a good blob, an `O_PATH` handle, a hugetlbfs memfd.
#[test]
fn fds_mmap_would_refuse_are_invalid_parameters_before_the_mmap() {
    let _s = common::serial();
    let mut g = guest();
    let b = blob(4 * P);
    let path = format!("/proc/self/fd/{}", b.as_fd().as_raw_fd());
    let mut tries: Vec<(&str, std::os::fd::OwnedFd, &str)> = vec![
        ("O_RDONLY reopen", reopen(&path, true, false, 0), "O_RDONLY"),
        ("O_WRONLY reopen", reopen(&path, false, true, 0), "O_WRONLY"),
        (
            "O_PATH handle",
            reopen(&path, true, false, libc::O_PATH),
            "O_PATH",
        ),
    ];
    match nix::sys::memfd::memfd_create(
        c"hardening-huge",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC
            | nix::sys::memfd::MemFdCreateFlag::MFD_HUGETLB
            | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
    ) {
        Ok(fd) => {
            nix::unistd::ftruncate(&fd, 2 << 20).unwrap();
            fcntl(
                fd.as_raw_fd(),
                FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
            )
            .unwrap();
            tries.push(("hugetlbfs memfd", fd, "hugetlbfs"));
        }
        Err(e) => println!("skipped: memfd_create(MFD_HUGETLB) failed ({e}): no hugetlbfs case"),
    }
    for (i, (what, fd, names)) in tries.into_iter().enumerate() {
        let why = refused_invalid(
            g.hm.handle_map(&ev(40 + i as u32, 0, 4 * P, RW), Some(fd)),
            what,
        );
        assert!(why.contains(names), "{what}: {why}");
        g.hm.audit().unwrap();
        assert_eq!(g.hm.live(), 0);
        g.writes_land(0, 4 * P, 50 + i as u64);
    }
    // The same blob through a read/write reopen is fine.
    assert_eq!(
        g.hm.handle_map(&ev(49, 0, 4 * P, RW), Some(reopen(&path, true, true, 0))),
        Outcome::Ok
    );
}

/// The VMM's `RssShmem` in KiB (shared pages it has touched and still maps).
fn rss_shmem_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Issue 22 item 1: blob memory is bounded whoever touches it. The guest writes every page
/// of its blobs through BAR2 (the probe vCPU), which charges the VMM, not the device's
/// cgroup. The device counts every blob's size against its memory limit (CREATE_BLOB past
/// it: ERR_OUT_OF_MEMORY), and the VMM bounds the bytes it has placed on its own (a map
/// past it: ERR_OUT_OF_MEMORY, whatever the device says); the VMM's touched shared memory
/// stays within its bound; both are reported.
#[test]
fn blob_memory_is_bounded_whoever_touches_it() {
    use hostmem_device::wire::ErrorCode;
    use hostmem_vmm::queue_driver::CmdError;
    let _s = common::serial();
    if !common::kvm() {
        return;
    }
    const BLOB: u64 = 4 << 20;
    const WIN: u64 = 64 << 20;
    let vm = Arc::new(Vm::open().unwrap());
    let hm = Arc::new(
        Hostmem::new(
            WIN,
            Some(vm.clone()),
            DEFAULT_WINDOW_GPA,
            Mode::Fixed,
            Limits {
                max_placed_bytes: 3 * BLOB,
                ..Limits::default()
            },
        )
        .unwrap(),
    );
    let mut probe = GuestProbe::new(vm, DEFAULT_WINDOW_GPA, WIN, 4 << 20).unwrap();
    let mut cfg = common::device_config();
    cfg.memory_limit = Some(8 * BLOB);
    let (dev, mut drv) = common::start_device(&cfg, &hm);
    drv.ctx_create(1, 0).unwrap();
    for r in 1..=8 {
        drv.create_blob(1, r, 0, BLOB).unwrap();
    }
    match drv.create_blob(1, 9, 0, BLOB) {
        Err(CmdError::Device(ErrorCode::OutOfMemory)) => {}
        other => panic!("a blob past the device's budget: {other:?}"),
    }
    let shmem0 = rss_shmem_kib();
    for r in 1..=3u32 {
        let at = u64::from(r - 1) * BLOB;
        drv.map_blob(1, r, at).unwrap();
        assert_eq!(
            probe.fill(at, BLOB, u64::from(r)).unwrap(),
            ProbeWrite::Written
        );
    }
    match drv.map_blob(1, 4, 3 * BLOB) {
        Err(CmdError::Device(ErrorCode::OutOfMemory)) => {}
        other => panic!("a placement past the VMM's bound: {other:?}"),
    }
    assert_eq!(hm.placed_bytes(), (3 * BLOB, 3 * BLOB, 1));
    let grown = rss_shmem_kib().saturating_sub(shmem0);
    assert!(
        grown >= 3 * BLOB / 1024 - 512,
        "the guest touched every page: +{grown} KiB"
    );
    assert!(
        grown <= 3 * BLOB / 1024 + 1024,
        "the VMM holds what it placed and no more: +{grown} KiB"
    );
    // Unmapping makes room at the VMM, not at the device: blobs live until unref'd.
    drv.unmap_blob(1, 1).unwrap();
    drv.map_blob(1, 4, 3 * BLOB).unwrap();
    assert_eq!(probe.fill(3 * BLOB, BLOB, 4).unwrap(), ProbeWrite::Written);
    match drv.create_blob(1, 9, 0, BLOB) {
        Err(CmdError::Device(ErrorCode::OutOfMemory)) => {}
        other => panic!("still past the device's budget: {other:?}"),
    }
    drv.unref(1).unwrap();
    drv.create_blob(1, 9, 0, BLOB).unwrap();
    let st = drv.device_stats().unwrap();
    assert_eq!(st.blob_budget, 8 * BLOB);
    assert_eq!(st.blob_bytes_max, 8 * BLOB);
    assert_eq!(st.blob_budget_refusals, 2);
    drop(drv);
    let exit = dev.stop("test done");
    assert!(!exit.oom_killed, "{exit:?}");
}
