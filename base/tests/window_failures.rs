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
