//! The guest probe on real KVM: what the guest reads through the window's memslot, holes in
//! per-blob-slot mode, guest writes reaching the host.

use std::os::fd::AsFd;
use std::sync::Arc;

use hostmem_base::kvm::Vm;
use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;
use hostmem_vmm::probe::{expected_hash, GuestProbe, ProbeRead};

const GPA: u64 = 1 << 32;
const P: u64 = 4096;

fn vm() -> Option<Arc<Vm>> {
    match Vm::available() {
        Ok(()) => Some(Arc::new(Vm::open().unwrap())),
        Err(why) => {
            println!("skipped: /dev/kvm unusable ({why})");
            None
        }
    }
}

fn blob(len: u64, seed: u8) -> (SharedMemory, Vec<u8>) {
    let shm = SharedMemory::new("probe-blob", len).unwrap();
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    MemoryMapping::from_fd(shm.as_fd(), 0, len as usize, Prot::READ_WRITE)
        .unwrap()
        .write_slice(0, &bytes)
        .unwrap();
    shm.seal_size().unwrap();
    (shm, bytes)
}

#[test]
fn fixed_window_guest_sees_placements_and_zeros() {
    let Some(vm) = vm() else { return };
    let window = Arc::new(Window::new(16 << 20).unwrap());
    vm.set_region(1, GPA, window.clone(), 0, 16 << 20).unwrap();
    let mut probe = GuestProbe::new(vm.clone(), GPA, 16 << 20, 8 << 20).unwrap();
    let zeros = vec![0u8; 64 * 1024];
    assert_eq!(
        probe.hash(0, zeros.len() as u64).unwrap(),
        ProbeRead::Value(expected_hash(&zeros))
    );

    let (b, bytes) = blob(8 * P, 7);
    window
        .place(4 * P, 8 * P, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    assert_eq!(
        probe.hash(4 * P, 8 * P).unwrap(),
        ProbeRead::Value(expected_hash(&bytes))
    );
    // A different pattern hashes differently: the check can fail.
    assert_ne!(expected_hash(&bytes), expected_hash(&zeros[..bytes.len()]));
    // Guest write lands in the blob.
    assert_eq!(probe.write_u64(4 * P + 16, 0xdead_beef).unwrap(), None);
    let mut got = [0u8; 8];
    MemoryMapping::from_fd(b.as_fd(), 0, P as usize, Prot::READ)
        .unwrap()
        .read_slice(16, &mut got)
        .unwrap();
    assert_eq!(u64::from_le_bytes(got), 0xdead_beef);
    assert_eq!(
        probe.read_u64(4 * P + 16).unwrap(),
        ProbeRead::Value(0xdead_beef)
    );
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
    assert!(probe.touch_ram(1 << 20).unwrap().as_nanos() > 0);
    let s = probe.spin_read(0, 1000).unwrap();
    assert_eq!(
        (s.reads, s.zero_reads, s.changes, s.holes),
        (1000, 1000, 0, 0)
    );
}

#[test]
fn per_blob_slots_leave_holes_between_blobs() {
    let Some(vm) = vm() else { return };
    let mut probe = GuestProbe::new(vm.clone(), GPA, 16 << 20, 4 << 20).unwrap();
    // No window slot: the window is a hole.
    assert!(matches!(probe.read_u64(0).unwrap(), ProbeRead::Hole { gpa } if gpa == GPA));
    let (b, bytes) = blob(4 * P, 3);
    let m =
        Arc::new(MemoryMapping::from_fd(b.as_fd(), 0, 4 * P as usize, Prot::READ_WRITE).unwrap());
    vm.set_region(5, GPA + 8 * P, m, 0, 4 * P as usize).unwrap();
    assert_eq!(
        probe.hash(8 * P, 4 * P).unwrap(),
        ProbeRead::Value(expected_hash(&bytes))
    );
    vm.remove_region(5).unwrap();
    assert!(matches!(
        probe.hash(8 * P, 4 * P).unwrap(),
        ProbeRead::Hole { .. }
    ));
    // The vCPU survives holes and still works.
    assert!(probe.write_u64(0, 1).unwrap().is_some());
    assert_eq!(vm.memslot_changes(), 3);
}

#[test]
fn scratch_measure() {
    let Some(vm) = vm() else { return };
    let window = Arc::new(Window::new(64 << 20).unwrap());
    vm.set_region(1, GPA, window.clone(), 0, 64 << 20).unwrap();
    let mut probe = GuestProbe::new(vm.clone(), GPA, 64 << 20, 8 << 20).unwrap();
    for _ in 0..100 {
        probe.read_u64(0).unwrap();
    }
    let t = std::time::Instant::now();
    for _ in 0..2000 {
        probe.read_u64(0).unwrap();
    }
    println!("rt {:?}", t.elapsed() / 2000);
    probe.hash(0, 64 << 20).unwrap();
    let t = std::time::Instant::now();
    probe.hash(0, 64 << 20).unwrap();
    println!("hash 64MiB {:?}", t.elapsed());
}
