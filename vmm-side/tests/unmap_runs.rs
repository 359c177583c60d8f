//! A run of Unmap events in one batch (`Hostmem::handle_unmaps`) gets exactly the outcomes
//! the same events get one by one, and leaves the same window: the accepted ones go back
//! to background together, the refused ones (wrong resource, nothing there, named twice)
//! are refused with the same code, and placements not named stay. No VM is needed.

use std::os::fd::AsFd;

use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_ipc::protocol::Outcome;
use hostmem_vmm::hostmem::{Hostmem, Limits, MapEvent, Mode, DEFAULT_WINDOW_GPA};

const P: u64 = 4096;
const RW: u32 = (libc::PROT_READ | libc::PROT_WRITE) as u32;

fn blob(len: u64, byte: u8) -> SharedMemory {
    let shm = SharedMemory::new("unmap-runs-blob", len).unwrap();
    MemoryMapping::from_fd(shm.as_fd(), 0, len as usize, Prot::READ_WRITE)
        .unwrap()
        .fill(0, len as usize, byte)
        .unwrap();
    shm.seal_size().unwrap();
    shm
}

/// A window with resources 1..=5 placed at 4-page strides (2 pages each).
fn placed(mode: Mode) -> Hostmem {
    let hm = Hostmem::new(1 << 20, None, DEFAULT_WINDOW_GPA, mode, Limits::default()).unwrap();
    for r in 1..=5u32 {
        let b = blob(2 * P, r as u8);
        let ev = MapEvent {
            resource_id: r,
            offset: u64::from(r) * 4 * P,
            len: 2 * P,
            fd_offset: 0,
            prot: RW,
        };
        let fd = b.as_fd().try_clone_to_owned().unwrap();
        assert_eq!(hm.handle_map(&ev, Some(fd)), Outcome::Ok, "map {r}");
    }
    hm
}

fn code(o: &Outcome) -> String {
    match o {
        Outcome::Ok => "ok".into(),
        Outcome::Refused { code, .. } => format!("{code:?}"),
    }
}

fn view(hm: &Hostmem) -> Vec<u8> {
    let mut v = vec![0u8; 32 * P as usize];
    hm.window().read(0, &mut v).unwrap();
    v
}

#[test]
fn a_run_of_unmaps_answers_as_one_by_one_and_leaves_the_same_window() {
    let reqs = [
        (3, 12 * P, 2 * P), // ok
        (1, 4 * P, 2 * P),  // ok
        (2, 12 * P, 2 * P), // resource 3 is there (and just went): refused
        (9, 28 * P, 2 * P), // nothing there
        (4, 16 * P, 2 * P), // ok
        (1, 4 * P, 2 * P),  // named twice: the second is refused
        (5, 20 * P, P),     // wrong length
    ];
    for mode in [Mode::Fixed, Mode::PerBlobSlot] {
        let (one, many) = (placed(mode), placed(mode));
        let singly: Vec<String> = reqs
            .iter()
            .map(|&(r, o, l)| code(&one.handle_unmap(r, o, l)))
            .collect();
        let together: Vec<String> = many.handle_unmaps(&reqs).iter().map(code).collect();
        assert_eq!(together, singly, "{mode:?}");
        assert_eq!(
            singly,
            [
                "ok",
                "ok",
                "InvalidParameter",
                "InvalidParameter",
                "ok",
                "InvalidParameter",
                "InvalidParameter"
            ],
            "{mode:?}"
        );
        if mode == Mode::Fixed {
            assert_eq!(view(&many), view(&one), "same window");
            many.window().audit().unwrap();
            // Resources 2 and 5 stay; the others read zeros.
            let v = view(&many);
            assert!(v[8 * P as usize..10 * P as usize].iter().all(|&b| b == 2));
            assert!(v[20 * P as usize..22 * P as usize].iter().all(|&b| b == 5));
            assert!(v[4 * P as usize..6 * P as usize].iter().all(|&b| b == 0));
            assert!(v[12 * P as usize..18 * P as usize].iter().all(|&b| b == 0));
        }
        // Both can place again where the run unmapped.
        for hm in [&one, &many] {
            let b = blob(2 * P, 0xee);
            let ev = MapEvent {
                resource_id: 7,
                offset: 12 * P,
                len: 2 * P,
                fd_offset: 0,
                prot: RW,
            };
            let fd = b.as_fd().try_clone_to_owned().unwrap();
            assert_eq!(hm.handle_map(&ev, Some(fd)), Outcome::Ok);
        }
    }
}
