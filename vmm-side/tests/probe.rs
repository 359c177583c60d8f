//! The guest probe on real KVM: what the guest reads through the window's memslot (fixed
//! mode, MAP_FIXED placements), holes in per-blob-slot mode, guest writes reaching the host,
//! exact memslot counts, and a vCPU spinning while another thread remaps under it.
//!
//! Without a usable `/dev/kvm` every test prints `skipped: <reason>` and returns.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostmem_base::kvm::Vm;
use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;
use hostmem_vmm::probe::{
    expected_hash, fill_pattern, GuestProbe, ProbeRead, ProbeWrite, RAM_SLOT, SPIN_MAX_HOLES,
};

const GPA: u64 = 1 << 32;
const P: u64 = 4096;
const WINDOW_SLOT: u32 = 1;

fn vm() -> Option<Arc<Vm>> {
    match Vm::available() {
        Ok(()) => Some(Arc::new(Vm::open().expect("Vm::open after available()"))),
        Err(why) => {
            println!("skipped: /dev/kvm unusable ({why})");
            None
        }
    }
}

/// A sealed memfd blob of `len` bytes holding a seed-dependent pattern.
fn blob(len: u64, seed: u8) -> (SharedMemory, Vec<u8>) {
    let shm = SharedMemory::new("probe-blob", len).unwrap();
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ ((i >> 12) as u8))
        .collect();
    MemoryMapping::from_fd(shm.as_fd(), 0, len as usize, Prot::READ_WRITE)
        .unwrap()
        .write_slice(0, &bytes)
        .unwrap();
    shm.seal_size().unwrap();
    (shm, bytes)
}

fn read_host(shm: &SharedMemory, offset: usize, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    MemoryMapping::from_fd(shm.as_fd(), 0, offset + len, Prot::READ)
        .unwrap()
        .read_slice(offset, &mut got)
        .unwrap();
    got
}

#[test]
fn fixed_window_guest_sees_placements_and_zeros() {
    let Some(vm) = vm() else { return };
    let window = Arc::new(Window::new(16 << 20).unwrap());
    vm.set_region(WINDOW_SLOT, GPA, window.clone(), 0, 16 << 20)
        .unwrap();
    let mut probe = GuestProbe::new(vm.clone(), GPA, 16 << 20, 8 << 20).unwrap();
    let zeros = vec![0u8; 64 * 1024];
    assert_eq!(
        probe.hash(0, zeros.len() as u64).unwrap(),
        ProbeRead::Value(expected_hash(&zeros))
    );

    // A blob placed with MAP_FIXED on the host side is what the guest reads.
    let (b, bytes) = blob(8 * P, 7);
    window
        .place(4 * P, 8 * P, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    assert_eq!(
        probe.hash(4 * P, 8 * P).unwrap(),
        ProbeRead::Value(expected_hash(&bytes))
    );
    // A different pattern hashes differently, so the check above can fail.
    assert_ne!(expected_hash(&bytes), expected_hash(&zeros[..bytes.len()]));
    let (_, other) = blob(8 * P, 8);
    assert_ne!(expected_hash(&bytes), expected_hash(&other));
    // Neighbours of the blob are still background.
    assert_eq!(probe.read_u64(4 * P - 8).unwrap(), ProbeRead::Value(0));
    assert_eq!(probe.read_u64(12 * P).unwrap(), ProbeRead::Value(0));
    let first = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(probe.read_u64(4 * P).unwrap(), ProbeRead::Value(first));

    // A guest write lands in the blob; a guest fill too, with the documented pattern.
    assert_eq!(
        probe.write_u64(4 * P + 16, 0xdead_beef).unwrap(),
        ProbeWrite::Written
    );
    assert_eq!(read_host(&b, 16, 8), 0xdead_beef_u64.to_le_bytes());
    assert_eq!(
        probe.read_u64(4 * P + 16).unwrap(),
        ProbeRead::Value(0xdead_beef)
    );
    assert_eq!(
        probe.fill(5 * P, 2 * P, 0x1000).unwrap(),
        ProbeWrite::Written
    );
    assert_eq!(
        read_host(&b, P as usize, 2 * P as usize),
        fill_pattern(2 * P, 0x1000)
    );
    assert_eq!(
        probe.hash(5 * P, 2 * P).unwrap(),
        ProbeRead::Value(expected_hash(&fill_pattern(2 * P, 0x1000)))
    );

    // Restoring the background: the guest reads zeros again.
    window.restore(4 * P, 8 * P).unwrap();
    assert_eq!(
        probe.hash(4 * P, 8 * P).unwrap(),
        ProbeRead::Value(expected_hash(&zeros[..8 * P as usize]))
    );
    assert_eq!(
        vm.memslot_changes(),
        2,
        "RAM slot + window slot, nothing else"
    );
    assert_eq!(vm.live_slots(), 2);
    let touch = probe.touch_ram(1 << 20).unwrap();
    assert!(touch > Duration::ZERO && touch < Duration::from_secs(10));
    let s = probe.spin_read(0, 1000).unwrap();
    assert_eq!(
        (s.reads, s.zero_reads, s.changes, s.holes, s.last),
        (1000, 1000, 0, 0, 0)
    );
    probe.write_u64(8, 5).unwrap();
    let s = probe.spin_read(8, 1000).unwrap();
    assert_eq!(
        (s.reads, s.zero_reads, s.changes, s.holes, s.last),
        (1000, 0, 1, 0, 5)
    );
}

#[test]
fn per_blob_slots_leave_holes_between_blobs() {
    let Some(vm) = vm() else { return };
    let mut probe = GuestProbe::new(vm.clone(), GPA, 16 << 20, 4 << 20).unwrap();
    assert_eq!(vm.memslot_changes(), 1, "guest RAM");
    // No window slot: the whole window is a hole, and the vCPU survives it.
    assert_eq!(probe.read_u64(0).unwrap(), ProbeRead::Hole { gpa: GPA });
    assert_eq!(
        probe.write_u64(8, 1).unwrap(),
        ProbeWrite::Hole { gpa: GPA + 8 }
    );
    // A request over a large hole stops at the first access instead of exiting per qword.
    let t = Instant::now();
    assert_eq!(
        probe.hash(0, 16 << 20).unwrap(),
        ProbeRead::Hole { gpa: GPA }
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // A spin on a hole carries on through holes, but only up to SPIN_MAX_HOLES exits.
    let s = probe.spin_read(0, 10_000_000).unwrap();
    assert_eq!(
        (s.reads, s.holes, s.zero_reads, s.changes),
        (SPIN_MAX_HOLES, SPIN_MAX_HOLES, SPIN_MAX_HOLES, 0),
        "{s:?}"
    );

    let (b, bytes) = blob(4 * P, 3);
    let m =
        Arc::new(MemoryMapping::from_fd(b.as_fd(), 0, 4 * P as usize, Prot::READ_WRITE).unwrap());
    vm.set_region(5, GPA + 8 * P, m.clone(), 0, 4 * P as usize)
        .unwrap();
    assert_eq!(
        probe.hash(8 * P, 4 * P).unwrap(),
        ProbeRead::Value(expected_hash(&bytes))
    );
    // The hole starts right after the blob; the blob's end is readable.
    assert_eq!(
        probe.hash(8 * P, 5 * P).unwrap(),
        ProbeRead::Hole { gpa: GPA + 12 * P }
    );
    assert!(matches!(
        probe.read_u64(12 * P - 8).unwrap(),
        ProbeRead::Value(_)
    ));
    assert_eq!(probe.fill(8 * P, P, 42).unwrap(), ProbeWrite::Written);
    assert_eq!(read_host(&b, 0, P as usize), fill_pattern(P, 42));
    // The same slot twice is refused and counts nothing.
    assert!(vm.set_region(5, GPA + 8 * P, m, 0, 4 * P as usize).is_err());

    vm.remove_region(5).unwrap();
    assert_eq!(
        probe.hash(8 * P, 4 * P).unwrap(),
        ProbeRead::Hole { gpa: GPA + 8 * P }
    );
    assert!(vm.remove_region(5).is_err());
    // The vCPU still works after all those holes.
    assert!(probe.ping().is_ok());
    assert!(probe.touch_ram(1 << 20).is_ok());
    assert_eq!(vm.memslot_changes(), 3, "RAM + one add + one delete");
    assert_eq!(vm.live_slots(), 1);
    assert!(vm.max_memslots() >= 32);
}

/// The vCPU spins on one qword in its own thread while this thread keeps placing a blob
/// there and restoring the background: the guest must see the value change, never a hole.
#[test]
fn spin_read_sees_concurrent_map_fixed() {
    let Some(vm) = vm() else { return };
    let window = Arc::new(Window::new(4 << 20).unwrap());
    vm.set_region(WINDOW_SLOT, GPA, window.clone(), 0, 4 << 20)
        .unwrap();
    let mut probe = GuestProbe::new(vm.clone(), GPA, 4 << 20, 4 << 20).unwrap();
    let (b, bytes) = blob(P, 9);
    let value = u64::from_le_bytes(bytes[64..72].try_into().unwrap());
    assert_ne!(value, 0);
    let spinner = std::thread::spawn(move || {
        let s = probe.spin_read(P + 64, 400_000_000).unwrap();
        (s, probe)
    });
    let mut toggles = 0u64;
    while !spinner.is_finished() {
        window.place(P, P, b.as_fd(), 0, Prot::READ_WRITE).unwrap();
        std::thread::sleep(Duration::from_micros(300));
        window.restore(P, P).unwrap();
        std::thread::sleep(Duration::from_micros(300));
        toggles += 1;
    }
    let (s, mut probe) = spinner.join().unwrap();
    println!("fixed-mode spin: {s:?}, {toggles} host toggles");
    assert_eq!(s.holes, 0, "fixed mode never has holes");
    assert!(toggles >= 3, "the spin was too short to race with the host");
    assert!(s.changes >= 2, "the guest never saw the remap: {s:?}");
    assert!(s.last == 0 || s.last == value);
    assert!(s.zero_reads > 0 && s.zero_reads < s.reads);
    assert_eq!(vm.memslot_changes(), 2, "MAP_FIXED changes no memslot");
    // Still usable afterwards, from this thread.
    assert_eq!(probe.read_u64(P + 64).unwrap(), ProbeRead::Value(0));
}

/// The same race in per-blob-slot mode: the slot comes and goes, the guest sees holes and
/// keeps running, and every add and delete is counted.
#[test]
fn spin_read_survives_concurrent_slot_changes() {
    let Some(vm) = vm() else { return };
    let mut probe = GuestProbe::new(vm.clone(), GPA, 4 << 20, 4 << 20).unwrap();
    let (b, bytes) = blob(P, 11);
    let value = u64::from_le_bytes(bytes[64..72].try_into().unwrap());
    let m = Arc::new(MemoryMapping::from_fd(b.as_fd(), 0, P as usize, Prot::READ_WRITE).unwrap());
    vm.set_region(7, GPA + P, m.clone(), 0, P as usize).unwrap();
    let spinner = std::thread::spawn(move || {
        let s = probe.spin_read(P + 64, 400_000_000).unwrap();
        (s, probe)
    });
    let mut toggles = 0u64;
    while !spinner.is_finished() {
        vm.remove_region(7).unwrap();
        std::thread::sleep(Duration::from_micros(300));
        vm.set_region(7, GPA + P, m.clone(), 0, P as usize).unwrap();
        std::thread::sleep(Duration::from_micros(300));
        toggles += 1;
    }
    let (s, mut probe) = spinner.join().unwrap();
    println!("slot-mode spin: {s:?}, {toggles} host toggles");
    assert!(toggles >= 3, "the spin was too short to race with the host");
    assert!(s.holes > 0, "the guest never saw the slot gone: {s:?}");
    assert!(s.changes >= 2, "{s:?}");
    assert!(s.last == 0 || s.last == value);
    assert_eq!(vm.memslot_changes(), 1 + 1 + 2 * toggles);
    assert_eq!(probe.read_u64(P + 64).unwrap(), ProbeRead::Value(value));
    assert!(vm.live_slots() == 2 && vm.remove_region(RAM_SLOT + 7).is_ok());
}

/// Prints the numbers the bench and the report quote, and checks they are sane.
#[test]
fn probe_numbers() {
    let Some(vm) = vm() else { return };
    const WIN: u64 = 64 << 20;
    let window = Arc::new(Window::new(WIN).unwrap());
    vm.set_region(WINDOW_SLOT, GPA, window.clone(), 0, WIN as usize)
        .unwrap();
    let mut probe = GuestProbe::new(vm.clone(), GPA, WIN, (64 << 20) + (4 << 20)).unwrap();
    let n = 2000;
    for _ in 0..100 {
        probe.ping().unwrap();
    }
    let t = Instant::now();
    for _ in 0..n {
        probe.ping().unwrap();
    }
    let rt = t.elapsed() / n;

    let data: Vec<u8> = (0..WIN).map(|i| ((i * 7) >> 3) as u8).collect();
    let want = ProbeRead::Value(expected_hash(&data));
    window.mapping().write_slice(0, &data).unwrap();
    assert_eq!(probe.hash(0, WIN).unwrap(), want);
    let t = Instant::now();
    let got = probe.hash(0, WIN).unwrap();
    let hash_gbs = WIN as f64 / t.elapsed().as_secs_f64() / 1e9;
    assert_eq!(got, want);

    // Memslot add + delete of a 2 MiB blob slot: bare (outside the window, never touched), and with the guest reading the blob
    // in between (so KVM has mappings to zap).
    let (b, _) = blob(2 << 20, 1);
    let m = Arc::new(MemoryMapping::from_fd(b.as_fd(), 0, 2 << 20, Prot::READ_WRITE).unwrap());
    let blob_off = WIN - (2 << 20);
    let blob_gpa = GPA + blob_off;
    let rounds = 200u32;
    let t = Instant::now();
    for _ in 0..rounds {
        vm.set_region(9, blob_gpa + (4 << 20), m.clone(), 0, 2 << 20)
            .unwrap();
        vm.remove_region(9).unwrap();
    }
    let slot_bare_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);

    // Per-blob-slot shape on the probe's VM: the window slot goes, blobs come and go.
    vm.remove_region(WINDOW_SLOT).unwrap();
    let ws = 64 << 20;
    let cold = probe.touch_ram(ws).unwrap();
    let warm = (0..5).map(|_| probe.touch_ram(ws).unwrap()).min().unwrap();
    let (mut slot_used_us, mut after) = (0.0, Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        vm.set_region(9, blob_gpa, m.clone(), 0, 2 << 20).unwrap();
        let add = t.elapsed();
        assert!(matches!(
            probe.hash(blob_off, 2 << 20).unwrap(),
            ProbeRead::Value(_)
        ));
        probe.touch_ram(ws).unwrap();
        let t = Instant::now();
        vm.remove_region(9).unwrap();
        slot_used_us += (add + t.elapsed()).as_secs_f64() * 1e6 / 5.0;
        after.push(probe.touch_ram(ws).unwrap());
    }
    after.sort();
    let s = probe.spin_read(blob_off, 1).unwrap();
    assert_eq!(
        (s.holes, s.zero_reads),
        (1, 1),
        "the blob slot is gone: a hole"
    );
    vm.set_region(9, blob_gpa, m.clone(), 0, 2 << 20).unwrap();
    let s = probe.spin_read(blob_off, 100_000_000).unwrap();
    assert_eq!(s.holes, 0);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "probe numbers: round trip {:.1} µs; hash {hash_gbs:.2} GB/s; memslot add+remove \
         {slot_bare_us:.1} µs bare, {slot_used_us:.1} µs with a guest-touched blob; \
         touch_ram 64 MiB cold {:.2} ms, warm {:.2} ms, after a memslot delete {:.2} ms \
         (median of 5; min {:.2}, max {:.2}); spin {:.2} ns/read",
        rt.as_secs_f64() * 1e6,
        ms(cold),
        ms(warm),
        ms(after[2]),
        ms(after[0]),
        ms(after[4]),
        s.elapsed.as_secs_f64() * 1e9 / s.reads as f64,
    );
    assert!(rt > Duration::ZERO && rt < Duration::from_millis(50));
    assert!(hash_gbs > 0.01);
    assert!(warm > Duration::ZERO && after[0] > Duration::ZERO);
}
