//! A failed placement or restore never leaves a hole (issue 14, point 3), on any kernel:
//! every MAP_FIXED failure path is reached with `Window::inject_map_failures`, which fails
//! the next MAP_FIXEDs the way kernels before 6.12 do (the old range unmapped first). After
//! each failure `audit` must find the window mapped from end to end and equal to the table,
//! and the range must read (and take writes) as background.

use std::os::fd::{AsFd, AsRawFd};

use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::{Window, RESTORE_ATTEMPTS};
use hostmem_base::Error;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};

const PAGE: u64 = 4096;

fn blob(size: u64, byte: u8) -> SharedMemory {
    let shm = SharedMemory::new("blob", size).unwrap();
    let m = MemoryMapping::from_fd(shm.as_fd(), 0, size as usize, Prot::READ_WRITE).unwrap();
    m.fill(0, size as usize, byte).unwrap();
    shm.seal_size().unwrap();
    shm
}

fn all(w: &Window, offset: u64, len: u64, byte: u8) -> bool {
    let mut v = vec![0u8; len as usize];
    w.read(offset, &mut v).unwrap();
    v.iter().all(|&x| x == byte)
}

/// The range is background: mapped, zeros, writable, and the table agrees.
fn assert_background(w: &Window, offset: u64, len: u64) {
    w.audit().expect("no hole, table == maps");
    assert!(all(w, offset, len, 0));
    w.write(offset, b"still writable").unwrap();
    w.write(offset, &[0u8; 14]).unwrap();
}

#[test]
fn a_failed_placement_puts_the_background_back() {
    let w = Window::new(32 * PAGE).unwrap();
    let b = blob(4 * PAGE, 0xab);
    for unmap_first in [true, false] {
        w.inject_map_failures(1, unmap_first);
        let e = w
            .place(8 * PAGE, 4 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::MapFixed {
                    errno: Errno::ENOMEM,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(w.live(), 0);
        assert_background(&w, 8 * PAGE, 4 * PAGE);
        w.restore_all().unwrap();
    }
    // The background mapped back after the failure may fail too (an old kernel again).
    w.inject_map_failures(RESTORE_ATTEMPTS, true);
    assert!(w
        .place(8 * PAGE, 4 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .is_err());
    assert_background(&w, 8 * PAGE, 4 * PAGE);
    // And the same placement works afterwards.
    w.place(8 * PAGE, 4 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    assert!(all(&w, 8 * PAGE, 4 * PAGE, 0xab));
    w.audit().unwrap();
}

#[test]
fn a_failed_caller_mapping_and_fd_mapping_leave_no_hole() {
    let w = Window::new(32 * PAGE).unwrap();
    let b = blob(2 * PAGE, 0x11);
    // The caller's mapping fails (having unmapped the range), then the window's own
    // MAP_FIXED of the fd fails as well.
    w.inject_map_failures(1, true);
    let r = w.place_with(4 * PAGE, 2 * PAGE, b.as_fd(), 0, Prot::READ_WRITE, |t| {
        let _ = t;
        Err("renderer failed".into())
    });
    assert!(r.is_err());
    assert_eq!(w.live(), 0);
    assert_background(&w, 4 * PAGE, 2 * PAGE);
}

#[test]
fn a_failed_restore_is_retried_and_never_leaves_a_hole() {
    let w = Window::new(32 * PAGE).unwrap();
    let b = blob(4 * PAGE, 0xcd);
    w.place(0, 4 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    // The restore's MAP_FIXED fails after unmapping the placement; the retry maps the
    // background back, so the restore succeeds.
    w.inject_map_failures(2, true);
    w.restore(0, 4 * PAGE).unwrap();
    assert_eq!(w.live(), 0);
    assert_background(&w, 0, 4 * PAGE);

    // The whole-window restore of a device death, failing twice the old way.
    w.place(8 * PAGE, 4 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    w.inject_map_failures(RESTORE_ATTEMPTS, true);
    assert_eq!(w.restore_all().unwrap().len(), 1);
    assert_background(&w, 0, 32 * PAGE);

    // Every attempt failing is reported, and the placement stays recorded.
    w.place(8 * PAGE, 4 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    w.inject_map_failures(1 + RESTORE_ATTEMPTS, false);
    assert!(w.restore(8 * PAGE, 4 * PAGE).is_err());
    assert_eq!(w.live(), 1);
    w.audit().unwrap();
    w.restore(8 * PAGE, 4 * PAGE).unwrap();
    assert_background(&w, 0, 32 * PAGE);
}

#[test]
fn write_sealed_fds_are_refused_before_the_syscall() {
    let w = Window::new(32 * PAGE).unwrap();
    for seal in [SealFlag::F_SEAL_WRITE, SealFlag::F_SEAL_FUTURE_WRITE] {
        let b = blob(PAGE, 0x22);
        fcntl(b.as_fd().as_raw_fd(), FcntlArg::F_ADD_SEALS(seal)).unwrap();
        // A pending injected failure would be consumed by a MAP_FIXED: none may happen.
        w.inject_map_failures(1, true);
        let e = w
            .place(0, PAGE, b.as_fd(), 0, Prot::READ_WRITE)
            .unwrap_err();
        assert!(matches!(e, Error::WriteSealed(_)), "{seal:?}: {e}");
        w.inject_map_failures(0, false);
        assert_background(&w, 0, PAGE);
        // Read-only it maps (the VMM refuses read-only placements for other reasons).
        w.place(0, PAGE, b.as_fd(), 0, Prot::READ).unwrap();
        assert!(all(&w, 0, PAGE, 0x22));
        w.restore(0, PAGE).unwrap();
    }
}

#[test]
fn the_window_memfd_takes_no_seal_from_anyone() {
    let w = Window::new(16 * PAGE).unwrap();
    let fd = w.memfd().try_clone_fd().unwrap(); // what the device holds
    for seal in [
        SealFlag::F_SEAL_WRITE,
        SealFlag::F_SEAL_FUTURE_WRITE,
        SealFlag::F_SEAL_SHRINK,
        SealFlag::F_SEAL_GROW,
        SealFlag::F_SEAL_SEAL,
    ] {
        let r = fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seal));
        assert_eq!(r, Err(Errno::EPERM), "{seal:?}");
    }
    assert!(nix::unistd::ftruncate(&fd, 0).is_err());
    assert!(nix::unistd::ftruncate(&fd, (32 * PAGE) as i64).is_err());
    // The VMM's restore (a read/write MAP_SHARED of the memfd) still works.
    let b = blob(PAGE, 1);
    w.place(0, PAGE, b.as_fd(), 0, Prot::READ_WRITE).unwrap();
    w.restore(0, PAGE).unwrap();
    assert_background(&w, 0, 16 * PAGE);
}

/// `restore_many`: ranges with nothing live between them go back in one MAP_FIXED (one
/// background VMA where there were blobs and gaps); a live placement between two ranges
/// splits them into two spans and stays; bad and repeated ranges get NotPlaced; results
/// keep the order given.
#[test]
fn restore_many_joins_neighbours_keeps_the_rest_and_answers_in_order() {
    let w = Window::new(64 * PAGE).unwrap();
    let b = blob(4 * PAGE, 0x5a);
    let keep = blob(PAGE, 0x77);
    for off in [2, 8, 14, 30] {
        w.place(off * PAGE, 4 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
            .unwrap();
    }
    // A placement that stays, between the third and the fourth.
    w.place(22 * PAGE, PAGE, keep.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    // The window's own VMAs (other tests map and unmap in this process meanwhile).
    let (addr, size) = w.host_range();
    let vmas = || {
        hostmem_base::procfs::maps_in_range(addr, addr + size)
            .unwrap()
            .len()
    };
    let vmas_before = vmas();
    let res = w.restore_many(&[
        (30 * PAGE, 4 * PAGE),
        (8 * PAGE, 4 * PAGE),
        (9 * PAGE, 4 * PAGE), // not a placement
        (2 * PAGE, 4 * PAGE),
        (8 * PAGE, 4 * PAGE), // again
        (14 * PAGE, 4 * PAGE),
    ]);
    let got: Vec<Option<u64>> = res
        .iter()
        .map(|r| r.as_ref().ok().map(|p| p.offset))
        .collect();
    assert_eq!(
        got,
        [
            Some(30 * PAGE),
            Some(8 * PAGE),
            None,
            Some(2 * PAGE),
            None,
            Some(14 * PAGE)
        ]
    );
    assert!(matches!(res[2], Err(Error::NotPlaced { .. })));
    assert!(matches!(res[4], Err(Error::NotPlaced { .. })));
    assert_eq!(w.live(), 1);
    assert!(
        all(&w, 22 * PAGE, PAGE, 0x77),
        "the placement between stays"
    );
    assert_background(&w, 2 * PAGE, 16 * PAGE);
    assert_background(&w, 30 * PAGE, 4 * PAGE);
    // 2..18 became one VMA with the background around it.
    let vmas_after = vmas();
    assert_eq!(vmas_before, 11, "5 placements and 6 background pieces");
    assert!(
        vmas_after <= 3,
        "{vmas_after} VMAs after: background, kept blob, background"
    );
}

/// A span whose MAP_FIXED fails (the old range unmapped first, as before 6.12) is mapped
/// back as background: its placements are gone, no hole. If the background cannot go back
/// either, every placement of the span gets the error and stays recorded.
#[test]
fn restore_many_after_a_failed_span_leaves_no_hole() {
    let w = Window::new(32 * PAGE).unwrap();
    let b = blob(2 * PAGE, 0x42);
    for off in [4, 8] {
        w.place(off * PAGE, 2 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
            .unwrap();
    }
    w.inject_map_failures(1, true);
    let res = w.restore_many(&[(4 * PAGE, 2 * PAGE), (8 * PAGE, 2 * PAGE)]);
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    assert_eq!(w.live(), 0);
    assert_background(&w, 4 * PAGE, 6 * PAGE);

    for off in [4, 8] {
        w.place(off * PAGE, 2 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
            .unwrap();
    }
    // The span's MAP_FIXED and every attempt to map the background back fail, without
    // unmapping anything: the blobs stay where they are, recorded.
    w.inject_map_failures(1 + RESTORE_ATTEMPTS, false);
    let res = w.restore_many(&[(8 * PAGE, 2 * PAGE), (4 * PAGE, 2 * PAGE)]);
    assert!(
        res.iter().all(|r| matches!(r, Err(Error::MapFixed { .. }))),
        "{res:?}"
    );
    assert_eq!(w.live(), 2);
    w.audit().expect("table == maps");
    assert!(all(&w, 4 * PAGE, 2 * PAGE, 0x42));
    assert!(all(&w, 8 * PAGE, 2 * PAGE, 0x42));
}
