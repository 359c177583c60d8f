//! Window behaviour: place, read through the window, restore to zeros, refuse bad ranges.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use hostmem_base::mmap::{page_size, MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::{FixedTarget, MappedBy, Window};
use hostmem_base::Error;

const PAGE: u64 = 4096;

fn blob(size: u64, byte: u8) -> SharedMemory {
    let shm = SharedMemory::new("blob", size).unwrap();
    let m = MemoryMapping::from_fd(shm.as_fd(), 0, size as usize, Prot::READ_WRITE).unwrap();
    m.fill(0, size as usize, byte).unwrap();
    shm.seal_size().unwrap();
    shm
}

fn read(w: &Window, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    w.read(offset, &mut v).unwrap();
    v
}

#[test]
fn place_read_restore_zero_and_place_again() {
    assert_eq!(page_size(), PAGE);
    let w = Window::new(64 * PAGE).unwrap();
    let b = blob(4 * PAGE, 0xab);
    w.place(8 * PAGE, 4 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    assert!(read(&w, 8 * PAGE, 4 * PAGE as usize)
        .iter()
        .all(|&x| x == 0xab));
    assert!(read(&w, 7 * PAGE, PAGE as usize).iter().all(|&x| x == 0));
    assert!(read(&w, 12 * PAGE, PAGE as usize).iter().all(|&x| x == 0));

    // A write through the window reaches the blob (shared pages).
    w.write(8 * PAGE + 5, b"xyz").unwrap();
    let m = MemoryMapping::from_fd(b.as_fd(), 0, PAGE as usize, Prot::READ).unwrap();
    let mut got = [0u8; 3];
    m.read_slice(5, &mut got).unwrap();
    assert_eq!(&got, b"xyz");

    w.restore(8 * PAGE, 4 * PAGE).unwrap();
    assert!(read(&w, 8 * PAGE, 4 * PAGE as usize)
        .iter()
        .all(|&x| x == 0));
    assert_eq!(w.live(), 0);

    // The restored range takes a placement again, at a partial fd offset.
    w.place(8 * PAGE, 2 * PAGE, b.as_fd(), 2 * PAGE, Prot::READ)
        .unwrap();
    assert!(read(&w, 8 * PAGE, 2 * PAGE as usize)
        .iter()
        .all(|&x| x == 0xab));
    // A read-only placement refuses host writes through the window API.
    assert!(matches!(
        w.write(8 * PAGE, b"no"),
        Err(Error::BadProtection(_))
    ));
    w.restore(8 * PAGE, 2 * PAGE).unwrap();
}

#[test]
fn background_writes_are_zeroed_by_restore() {
    let w = Window::new(16 * PAGE).unwrap();
    let b = blob(PAGE, 1);
    w.write(0, &[9u8; 4096]).unwrap();
    w.place(0, PAGE, b.as_fd(), 0, Prot::READ_WRITE).unwrap();
    w.restore(0, PAGE).unwrap();
    assert!(read(&w, 0, PAGE as usize).iter().all(|&x| x == 0));
}

#[test]
fn bad_ranges_are_refused_before_any_syscall() {
    let w = Window::new(16 * PAGE).unwrap();
    let b = blob(4 * PAGE, 7);
    let fd = b.as_fd();
    w.place(4 * PAGE, 4 * PAGE, fd, 0, Prot::READ_WRITE)
        .unwrap();
    let rw = Prot::READ_WRITE;
    assert!(matches!(
        w.place(6 * PAGE, 4 * PAGE, fd, 0, rw),
        Err(Error::Overlap { .. })
    ));
    assert!(matches!(
        w.place(2 * PAGE, 4 * PAGE, fd, 0, rw),
        Err(Error::Overlap { .. })
    ));
    assert!(matches!(
        w.place(5 * PAGE, PAGE, fd, 0, rw),
        Err(Error::Overlap { .. })
    ));
    assert!(matches!(
        w.place(14 * PAGE, 4 * PAGE, fd, 0, rw),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        w.place(16 * PAGE, PAGE, fd, 0, rw),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        w.place(u64::MAX - PAGE + 1, 2 * PAGE, fd, 0, rw),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        w.place(PAGE + 1, PAGE, fd, 0, rw),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        w.place(0, 100, fd, 0, rw),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        w.place(0, 0, fd, 0, rw),
        Err(Error::InvalidSize(0))
    ));
    assert!(matches!(
        w.place(0, PAGE, fd, 1, rw),
        Err(Error::Misaligned { .. })
    ));
    // The file must hold fd_offset + len bytes, with checked arithmetic.
    assert!(matches!(
        w.place(0, 2 * PAGE, fd, 3 * PAGE, rw),
        Err(Error::FileTooSmall { .. })
    ));
    assert!(w.place(0, PAGE, fd, u64::MAX - PAGE + 1, rw).is_err());
    // Adjacent placements are fine.
    w.place(8 * PAGE, PAGE, fd, 0, rw).unwrap();
    w.place(3 * PAGE, PAGE, fd, 0, rw).unwrap();
    // A pipe is not a mappable file.
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert!(matches!(
        w.place(12 * PAGE, PAGE, r.as_fd(), 0, rw),
        Err(Error::NotRegularFile { .. })
    ));
    // Restore must name exactly one live placement.
    assert!(matches!(
        w.restore(4 * PAGE, PAGE),
        Err(Error::NotPlaced { .. })
    ));
    assert!(matches!(
        w.restore(12 * PAGE, PAGE),
        Err(Error::NotPlaced { .. })
    ));
    assert_eq!(w.live(), 3);
    assert_eq!(w.restore_all().unwrap().len(), 3);
    assert_eq!(w.live(), 0);
}

#[test]
fn vma_headroom_refuses_before_restore_could_fail() {
    let w = Window::new(256 * PAGE).unwrap();
    let b = blob(PAGE, 3);
    let now = hostmem_base::procfs::vma_count().unwrap();
    // Room for a handful of placements above the current count, 8 VMAs of reserve.
    w.set_vma_limit(now + 8 + 10, 8);
    let mut placed = Vec::new();
    let mut refused = None;
    for i in 0..100u64 {
        match w.place(i * 2 * PAGE, PAGE, b.as_fd(), 0, Prot::READ_WRITE) {
            Ok(()) => placed.push(i * 2 * PAGE),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(
        matches!(refused, Some(Error::VmaHeadroom { .. })),
        "{refused:?}"
    );
    assert!(!placed.is_empty() && placed.len() < 10, "{}", placed.len());
    // Every restore still succeeds.
    for off in placed {
        w.restore(off, PAGE).unwrap();
    }
    assert!(w.vma_headroom().unwrap() > 0);
}

#[test]
fn maps_show_the_placements() {
    let w = Window::new(16 * PAGE).unwrap();
    let b = blob(PAGE, 3);
    w.place(4 * PAGE, PAGE, b.as_fd(), 0, Prot::READ).unwrap();
    let (start, len) = w.host_range();
    let maps = hostmem_base::procfs::maps_in_range(start, start + len).unwrap();
    assert_eq!(maps.len(), 3, "{maps:?}");
    assert_eq!(maps[1].start, start + 4 * PAGE as usize);
    assert_eq!(maps[1].perms, "r--s");
    w.restore(4 * PAGE, PAGE).unwrap();
    let maps = hostmem_base::procfs::maps_in_range(start, start + len).unwrap();
    assert_eq!(maps.len(), 1, "background VMAs merge back: {maps:?}");
}

#[test]
fn audit_sees_exactly_what_the_table_does_not() {
    let w = Window::new(64 * PAGE).unwrap();
    w.audit().unwrap();
    let a = blob(2 * PAGE, 1);
    let b = blob(2 * PAGE, 2);
    // Two adjacent placements: the audit compares covered ranges, not VMAs.
    w.place(4 * PAGE, 2 * PAGE, a.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    w.place(6 * PAGE, 2 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    // The window's own memfd at another offset is a placement too, not background.
    w.place(
        10 * PAGE,
        PAGE,
        w.memfd().as_fd(),
        20 * PAGE,
        Prot::READ_WRITE,
    )
    .unwrap();
    w.audit().unwrap();
    w.restore(6 * PAGE, 2 * PAGE).unwrap();
    w.audit().unwrap();

    // A mapping the table does not know of (as a bug, or a placement done behind the
    // window's back, would leave) is found, even when it names itself like the window.
    let stray = SharedMemory::new("hostmem-window", PAGE).unwrap();
    let (start, _) = w.host_range();
    // SAFETY: MAP_FIXED over one page inside the window's own reservation, which this test
    // owns; nothing holds references into that page, and the window unmaps it on drop.
    let r = unsafe {
        libc::mmap(
            (start + 30 * PAGE as usize) as *mut libc::c_void,
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            std::os::fd::AsRawFd::as_raw_fd(&stray.as_fd()),
            0,
        )
    };
    assert_ne!(r, libc::MAP_FAILED);
    match w.audit() {
        Err(Error::WindowMismatch(m)) => assert!(m.contains("1e000"), "{m}"),
        other => panic!("stray mapping not found: {other:?}"),
    }
    // restore_all puts background everywhere and empties the table: consistent again.
    w.restore_all().unwrap();
    w.audit().unwrap();
}

/// MAP_FIXED of `fd` over `target`, as virglrenderer's `map_fixed` does.
fn map_over(target: &FixedTarget<'_>, fd: BorrowedFd<'_>) {
    // SAFETY: the target is a window range that place_with checked and holds locked for
    // this call; the window's memory is never referenced from Rust, only copied.
    let r = unsafe {
        libc::mmap(
            target.addr() as *mut libc::c_void,
            target.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(r, libc::MAP_FAILED);
}

#[test]
fn place_with_lets_the_caller_map_and_falls_back_to_the_fd() {
    let w = Window::new(64 * PAGE).unwrap();
    let (start, _) = w.host_range();
    let a = blob(2 * PAGE, 0x11);

    // The caller maps: the window records it as the caller's, with the target it handed.
    let by = w
        .place_with(4 * PAGE, 2 * PAGE, a.as_fd(), 0, Prot::READ_WRITE, |t| {
            assert_eq!(t.addr(), start + 4 * PAGE as usize);
            assert_eq!((t.len(), t.prot()), (2 * PAGE as usize, Prot::READ_WRITE));
            map_over(t, a.as_fd());
            Ok(true)
        })
        .unwrap();
    assert_eq!(by, MappedBy::Caller);
    assert!(read(&w, 4 * PAGE, 2 * PAGE as usize)
        .iter()
        .all(|&x| x == 0x11));
    w.audit().unwrap();
    w.restore(4 * PAGE, 2 * PAGE).unwrap();
    assert!(read(&w, 4 * PAGE, 2 * PAGE as usize)
        .iter()
        .all(|&x| x == 0));

    // The caller declines: the window maps the fd.
    let by = w
        .place_with(4 * PAGE, 2 * PAGE, a.as_fd(), 0, Prot::READ_WRITE, |_| {
            Ok(false)
        })
        .unwrap();
    assert_eq!(by, MappedBy::Window);
    assert!(read(&w, 4 * PAGE, 2 * PAGE as usize)
        .iter()
        .all(|&x| x == 0x11));
    w.restore(4 * PAGE, 2 * PAGE).unwrap();

    // The caller fails after leaving a hole (a failed MAP_FIXED can unmap the range): the
    // window maps the fd over it, and nothing is left unmapped.
    let by = w
        .place_with(4 * PAGE, 2 * PAGE, a.as_fd(), 0, Prot::READ_WRITE, |t| {
            // SAFETY: unmaps the checked, locked target range (see map_over).
            let r = unsafe { libc::munmap(t.addr() as *mut libc::c_void, t.len()) };
            assert_eq!(r, 0);
            Err("mmap failed".into())
        })
        .unwrap();
    assert_eq!(by, MappedBy::Window);
    assert!(read(&w, 4 * PAGE, 2 * PAGE as usize)
        .iter()
        .all(|&x| x == 0x11));
    w.audit().unwrap();

    // A range the window refuses never reaches the caller.
    let called = std::cell::Cell::new(false);
    let r = w.place_with(5 * PAGE, 2 * PAGE, a.as_fd(), 0, Prot::READ_WRITE, |_| {
        called.set(true);
        Ok(true)
    });
    assert!(matches!(r, Err(Error::Overlap { .. })), "{r:?}");
    assert!(
        !called.get(),
        "the caller was not asked to map an overlapping range"
    );
    w.restore(4 * PAGE, 2 * PAGE).unwrap();

    // A caller that says it mapped but did not: the audit finds the table and the kernel
    // disagree; restoring makes them agree again.
    w.place_with(8 * PAGE, PAGE, a.as_fd(), 0, Prot::READ_WRITE, |_| Ok(true))
        .unwrap();
    assert!(matches!(w.audit(), Err(Error::WindowMismatch(_))));
    w.restore(8 * PAGE, PAGE).unwrap();
    w.audit().unwrap();
}

#[test]
fn audit_finds_a_hole() {
    let w = Window::new(16 * PAGE).unwrap();
    let (start, _) = w.host_range();
    // SAFETY: unmaps one page of the window's own mapping, which only this test uses; the
    // window's memory is never referenced from Rust, and restore_all maps it back.
    let r = unsafe {
        libc::munmap(
            (start + 3 * PAGE as usize) as *mut libc::c_void,
            PAGE as usize,
        )
    };
    assert_eq!(r, 0);
    match w.audit() {
        Err(Error::WindowMismatch(m)) => assert!(m.contains("hole at 0x3000+0x1000"), "{m}"),
        other => panic!("hole not found: {other:?}"),
    }
    w.restore_all().unwrap();
    w.audit().unwrap();
}

#[test]
fn restore_zeroes_written_background_and_a_mirror_leaves_it_to_the_owner() {
    let w = Window::new(16 * PAGE).unwrap();
    // Nothing written yet: no data, and a restore has nothing to zero.
    let extents = |w: &Window, o: u64, l: u64| w.memfd().data_extents(o, l, 16).unwrap();
    assert_eq!(extents(&w, 0, 16 * PAGE), []);
    // Background written under where a blob goes (as a guest may before the map).
    w.write(4 * PAGE, b"stale").unwrap();
    assert_eq!(extents(&w, 0, 16 * PAGE), [(4 * PAGE, PAGE)]);
    assert_eq!(
        extents(&w, 5 * PAGE, 11 * PAGE),
        [],
        "only page 4 holds data"
    );
    assert_eq!(
        extents(&w, 4 * PAGE + 8, 16),
        [(4 * PAGE + 8, 16)],
        "clipped"
    );

    // The mirror (same memfd) restores without zeroing: the bytes stay.
    let mirror = Window::mirror_of(
        SharedMemory::from_fd(w.memfd().try_clone_fd().unwrap(), 16 * PAGE).unwrap(),
    )
    .unwrap();
    let b = blob(PAGE, 0xcd);
    mirror
        .place(4 * PAGE, PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    mirror.restore(4 * PAGE, PAGE).unwrap();
    assert_eq!(&read(&mirror, 4 * PAGE, 5), b"stale");

    // The owner's restore zeroes it (for both views).
    w.place(4 * PAGE, PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    assert!(read(&w, 4 * PAGE, PAGE as usize).iter().all(|&x| x == 0xcd));
    w.restore(4 * PAGE, PAGE).unwrap();
    // (Reading a shared memfd mapping allocates its pages again, as zeros.)
    assert!(read(&w, 4 * PAGE, PAGE as usize).iter().all(|&x| x == 0));
    assert!(read(&mirror, 4 * PAGE, PAGE as usize)
        .iter()
        .all(|&x| x == 0));
}

#[test]
fn restore_writes_zeros_over_a_little_background_data_and_punches_a_lot() {
    use hostmem_base::window::ZERO_BY_WRITE_MAX;
    let size = 8 * ZERO_BY_WRITE_MAX;
    let w = Window::new(size).unwrap();
    let b = blob(size, 0x11);
    let extents = |o: u64, l: u64| w.memfd().data_extents(o, l, 16).unwrap();
    // A little data: written over with zeros (the page stays, reading zeros).
    w.write(PAGE, &[7u8; 100]).unwrap();
    w.place(0, 2 * PAGE, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    w.restore(0, 2 * PAGE).unwrap();
    assert_eq!(extents(0, 2 * PAGE), [(PAGE, PAGE)], "zeroed in place");
    assert!(read(&w, 0, 2 * PAGE as usize).iter().all(|&x| x == 0));
    // More than ZERO_BY_WRITE_MAX: punched (no page left).
    let n = ZERO_BY_WRITE_MAX + PAGE;
    w.write(0, &vec![9u8; n as usize]).unwrap();
    w.place(0, size, b.as_fd(), 0, Prot::READ_WRITE).unwrap();
    w.restore(0, size).unwrap();
    assert_eq!(extents(0, size), [], "punched");
    assert!(read(&w, 0, n as usize).iter().all(|&x| x == 0));
    // Too many separate extents to list: punched as well.
    // (Past the pages the reads above allocated again.)
    let base = 2 * ZERO_BY_WRITE_MAX;
    for i in 0..20 {
        w.write(base + 2 * i * PAGE, b"x").unwrap();
    }
    assert!(w.memfd().data_extents(base, size - base, 16).is_none());
    w.place(base, size - base, b.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    w.restore(base, size - base).unwrap();
    assert_eq!(extents(base, size - base), []);
}

/// `place_known` checks the facts it is given exactly as `place` checks the ones it reads,
/// and maps the fd when they pass.
#[test]
fn place_known_checks_the_given_facts_like_place() {
    let w = Window::new(64 * PAGE).unwrap();
    let b = blob(4 * PAGE, 0x5a);
    let fd = b.as_fd();
    let rw = Prot::READ_WRITE;
    let facts = hostmem_base::shm::file_facts(fd).unwrap();
    assert!(matches!(
        w.place_known(0, 2 * PAGE, fd, &facts, 3 * PAGE, rw),
        Err(Error::FileTooSmall { .. })
    ));
    assert!(matches!(
        w.place_known(0, 100, fd, &facts, 0, rw),
        Err(Error::Misaligned { .. })
    ));
    // Facts that say "not a regular file" are refused, whatever the fd is.
    let (r, _w) = nix::unistd::pipe().unwrap();
    let pipe_facts = hostmem_base::shm::file_facts(r.as_fd()).unwrap();
    assert!(matches!(
        w.place_known(0, PAGE, fd, &pipe_facts, 0, rw),
        Err(Error::NotRegularFile { .. })
    ));
    assert_eq!(w.live(), 0);
    w.place_known(4 * PAGE, 4 * PAGE, fd, &facts, 0, rw)
        .unwrap();
    assert_eq!(read(&w, 4 * PAGE, 8), vec![0x5a; 8]);
    assert_eq!(w.live(), 1);
    w.restore(4 * PAGE, 4 * PAGE).unwrap();
    assert_eq!(read(&w, 4 * PAGE, 8), vec![0; 8]);
}
