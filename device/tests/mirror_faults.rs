//! The mirror placer's failure paths after the overlap and batching of issue 15, against a
//! fake VMM over a real tube pair: the fake VMM keeps a real [`Window`] over the same memfd
//! as the mirror (so "both views equal" is checked by placements and by bytes), places and
//! restores what the events say, refuses the maps of chosen resources and can be slow.
//!
//! * A mirror placement that fails after its Map left: the VMM's placement is taken back
//!   with an Unmap before the caller hears the error.
//! * A mirror restore that fails after its Unmap left: the tube breaks (the device exits,
//!   the VMM restores its whole window); nothing more is sent.
//! * Inside a batch: verdicts in command order, a refusal in the middle undone in the
//!   mirror, an UNMAP settled only after the VMM restored the range (invariant 2), and a
//!   mirror failure of an event still in the outbox recalls it (the VMM never hears of it).

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hostmem_base::mmap::Prot;
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;
use hostmem_device::backend::ExportedBlob;
use hostmem_device::gpu::{MapRequest, PlaceError, Placer};
use hostmem_device::mirror::{MirrorFaults, MirrorPlacer, MESSAGES_IN_FLIGHT};
use hostmem_ipc::protocol::{BatchReply, DeviceMsg, Outcome, RefuseCode, VmmMsg};
use hostmem_ipc::Tube;

const P: u64 = 4096;
const WINDOW: u64 = 1 << 20;

/// One event as the fake VMM saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Map(u32, u64),
    Unmap(u32, u64),
}

/// One tube message as the fake VMM saw it: a lone event, or a batch and its fd count.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    One(Ev),
    Batch(Vec<Ev>, usize),
}

/// The VMM's side: its window on the mirror's memfd, what it saw, its thread.
struct FakeVmm {
    window: Arc<Window>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

/// How the fake VMM behaves.
#[derive(Default, Clone)]
struct Policy {
    /// Maps of these resources are refused (InvalidParameter).
    refuse: HashSet<u32>,
    /// Slept before handling each event (a busy VMM: events pile up in the outbox).
    delay: Duration,
    /// Unmaps of these resources are refused (the VMM keeps the placement).
    refuse_unmaps: HashSet<u32>,
}

impl FakeVmm {
    /// Every event seen, in order, lone or batched.
    fn events(&self) -> Vec<Ev> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .flat_map(|s| match s {
                Seen::One(e) => vec![*e],
                Seen::Batch(v, _) => v.clone(),
            })
            .collect()
    }

    /// Waits (up to 5 s) until the VMM has handled `n` events: the device does not wait
    /// for the verdict of an event it gave up on.
    fn wait_events(&self, n: usize) -> Vec<Ev> {
        let t0 = std::time::Instant::now();
        while self.events().len() < n && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.events()
    }

    fn messages(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        // The thread ends when the device's tube end closes (every test drops the placer
        // first; a failed test may not have).
        if std::thread::panicking() {
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Handles one event in the VMM's window: a refusal for `policy.refuse`, else the real
/// placement or restore (refused if the window refuses it).
fn handle(
    window: &Window,
    policy: &Policy,
    ev: &DeviceMsg,
    fd: Option<std::os::fd::OwnedFd>,
) -> (u64, Outcome, Ev) {
    std::thread::sleep(policy.delay);
    let refused = |reason: String| Outcome::Refused {
        code: RefuseCode::InvalidParameter,
        reason,
    };
    match ev {
        DeviceMsg::Map {
            seq,
            resource_id,
            offset,
            len,
            fd_offset,
            prot,
            ..
        } => {
            let out = if policy.refuse.contains(resource_id) {
                refused(format!("test refuses resource {resource_id}"))
            } else {
                match (fd, Prot::from_bits(*prot)) {
                    (Some(fd), Ok(prot)) => {
                        match window.place(*offset, *len, fd.as_fd(), *fd_offset, prot) {
                            Ok(()) => Outcome::Ok,
                            Err(e) => refused(e.to_string()),
                        }
                    }
                    (None, _) => refused("no fd".into()),
                    (_, Err(e)) => refused(e.to_string()),
                }
            };
            (*seq, out, Ev::Map(*resource_id, *offset))
        }
        DeviceMsg::Unmap {
            seq,
            resource_id,
            offset,
            len,
        } => {
            let out = if policy.refuse_unmaps.contains(resource_id) {
                refused(format!("test refuses unmapping resource {resource_id}"))
            } else {
                match window.restore(*offset, *len) {
                    Ok(_) => Outcome::Ok,
                    Err(e) => refused(e.to_string()),
                }
            };
            (*seq, out, Ev::Unmap(*resource_id, *offset))
        }
        other => panic!("not an event: {other:?}"),
    }
}

/// A mirror placer and the fake VMM on the other end of its mapping tube.
fn setup(policy: Policy) -> (MirrorPlacer, FakeVmm) {
    let (dev, vmm) = Tube::pair().unwrap();
    let shm = SharedMemory::new("mirror-faults", WINDOW).unwrap();
    let vmm_shm = SharedMemory::from_fd(shm.try_clone_fd().unwrap(), WINDOW).unwrap();
    let mirror = Window::from_memfd(shm).unwrap();
    let window = Arc::new(Window::from_memfd(vmm_shm).unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (w, s) = (window.clone(), seen.clone());
    let thread = std::thread::spawn(move || {
        while let Ok((msg, fds)) = vmm.recv::<DeviceMsg>() {
            match msg {
                DeviceMsg::Batch { events, .. } => {
                    let nfds = fds.len();
                    let mut fds = fds.into_iter();
                    let mut replies = vec![];
                    let mut evs = vec![];
                    for ev in &events {
                        let fd = match ev {
                            DeviceMsg::Map { .. } => fds.next(),
                            _ => None,
                        };
                        let (seq, outcome, e) = handle(&w, &policy, ev, fd);
                        evs.push(e);
                        replies.push(BatchReply {
                            seq,
                            outcome,
                            stamps: None,
                        });
                    }
                    s.lock().unwrap().push(Seen::Batch(evs, nfds));
                    if vmm.send(&VmmMsg::Replies { replies }, &[]).is_err() {
                        return;
                    }
                }
                ev => {
                    let (seq, outcome, e) = handle(&w, &policy, &ev, fds.into_iter().next());
                    s.lock().unwrap().push(Seen::One(e));
                    if vmm.send(&VmmMsg::Reply { seq, outcome }, &[]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let placer = MirrorPlacer::new(mirror, dev);
    (
        placer,
        FakeVmm {
            window,
            seen,
            thread: Some(thread),
        },
    )
}

/// A blob of `pages` pages filled with `res`'s byte.
fn blob(res: u32, pages: u64) -> ExportedBlob {
    let shm = SharedMemory::new("blob", pages * P).unwrap();
    let m = hostmem_base::mmap::MemoryMapping::from_fd(
        shm.as_fd(),
        0,
        (pages * P) as usize,
        Prot::READ_WRITE,
    )
    .unwrap();
    m.fill(0, (pages * P) as usize, res as u8).unwrap();
    ExportedBlob {
        fd: shm.try_clone_fd().unwrap(),
        fd_offset: 0,
        size: pages * P,
        map_info: 0,
    }
}

fn req(res: u32, offset: u64, b: &ExportedBlob) -> MapRequest<'_> {
    MapRequest {
        resource_id: res,
        offset,
        len: b.size,
        blob: b,
        prot: Prot::READ_WRITE,
        map_info: 0,
        map_via: None,
    }
}

/// Both views hold the same placements and read the same bytes, end to end.
fn views_equal(placer: &MirrorPlacer, vmm: &FakeVmm) {
    let ranges = |w: &Window| -> Vec<(u64, u64)> {
        w.placements().iter().map(|p| (p.offset, p.len)).collect()
    };
    assert_eq!(
        ranges(placer.window()),
        ranges(&vmm.window),
        "mirror and VMM placements differ"
    );
    let (mut a, mut b) = (vec![0u8; WINDOW as usize], vec![0u8; WINDOW as usize]);
    placer.window().read(0, &mut a).unwrap();
    vmm.window.read(0, &mut b).unwrap();
    assert!(a == b, "mirror and VMM read different bytes");
}

fn placed(w: &Window) -> Vec<u64> {
    w.placements().iter().map(|p| p.offset).collect()
}

#[test]
fn a_mirror_placement_failing_after_its_map_left_is_taken_back_from_the_vmm() {
    let (mut placer, vmm) = setup(Policy::default());
    placer.set_test_faults(MirrorFaults {
        fail_place: Some(2),
        fail_restore: None,
    });
    let (b1, b2) = (blob(1, 2), blob(2, 2));
    placer.map(&req(1, 0, &b1)).unwrap();
    // The second placement fails in the mirror after the VMM heard of it (the knob's
    // ENOMEM): the caller gets ERR_OUT_OF_MEMORY's error, and only after the VMM took it
    // back.
    match placer.map(&req(2, 4 * P, &b2)) {
        Err(PlaceError::OutOfMemory(why)) => assert!(why.contains("ENOMEM"), "{why}"),
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    assert_eq!(
        vmm.events(),
        [Ev::Map(1, 0), Ev::Map(2, 4 * P), Ev::Unmap(2, 4 * P)],
        "the VMM placed it, then was told to take it back"
    );
    assert_eq!(placed(&vmm.window), [0], "the VMM's window without it");
    views_equal(&placer, &vmm);
    assert!(placer.broken().is_none(), "a take-back keeps the tube");
    // The knob fires once: the same map works now, in both views.
    placer.map(&req(2, 4 * P, &b2)).unwrap();
    assert_eq!(placed(&vmm.window), [0, 4 * P]);
    views_equal(&placer, &vmm);
    drop(placer);
}

/// Unmapping resource 1 at 0 fails and gives up the tube, both saying `why`.
fn unmap_breaks_the_tube(placer: &mut MirrorPlacer, why: &str) {
    match placer.unmap(1, 0, 2 * P) {
        Err(PlaceError::Unspec(e)) => assert!(e.contains(why), "{e}"),
        other => panic!("expected Unspec, got {other:?}"),
    }
    let broken = placer.broken().expect("the tube is given up").to_string();
    assert!(broken.contains(why), "{broken}");
}

/// On a broken tube every later placement fails at once.
fn refuses_at_once(placer: &mut MirrorPlacer) {
    let b2 = blob(2, 1);
    assert!(matches!(
        placer.map(&req(2, 8 * P, &b2)),
        Err(PlaceError::Unspec(_))
    ));
}

#[test]
fn a_mirror_restore_failing_after_its_unmap_left_breaks_the_tube() {
    let (mut placer, vmm) = setup(Policy::default());
    placer.set_test_faults(MirrorFaults {
        fail_place: None,
        fail_restore: Some(1),
    });
    let b1 = blob(1, 2);
    placer.map(&req(1, 0, &b1)).unwrap();
    // The VMM restores its window; the mirror keeps the blob: the views differ, so the
    // device must give up (the VMM restores everything when it exits, invariant 4).
    unmap_breaks_the_tube(&mut placer, "restore");
    assert_eq!(vmm.wait_events(2), [Ev::Map(1, 0), Ev::Unmap(1, 0)]);
    assert!(placed(&vmm.window).is_empty(), "the VMM restored its range");
    assert_eq!(placed(placer.window()), [0], "the mirror could not");
    // Nothing more is sent on a broken tube: every later placement fails at once.
    refuses_at_once(&mut placer);
    assert_eq!(vmm.events().len(), 2, "no event after the break");
    drop(placer);
}

/// Map B and Unmap A go alone while the VMM is slow ([`MESSAGES_IN_FLIGHT`] messages wait
/// at the VMM); Map C (refused by the VMM) and Map D pile up in the outbox and leave as one
/// batch with two fds. Verdicts come back in
/// command order; C's mirror placement is undone; A's unmap settles only once the VMM has
/// restored A (invariant 2: the guest hears of the unmap after the VMM's window is
/// background again).
#[test]
fn a_batch_keeps_verdict_order_undoes_a_refusal_in_the_middle_and_unmaps_after_the_vmm() {
    let (mut placer, vmm) = setup(Policy {
        refuse: HashSet::from([3]),
        delay: Duration::from_millis(100),
        ..Policy::default()
    });
    let (a, b, c, d) = (blob(1, 1), blob(2, 1), blob(3, 1), blob(4, 1));
    placer.map(&req(1, 0, &a)).unwrap();
    // One at a time, in this order (a vec! literal would evaluate them in order too, but
    // the order is the point).
    let tb = placer.begin_map(&req(2, 4 * P, &b)).unwrap().unwrap();
    let ta = placer.begin_unmap(1, 0, P).unwrap().unwrap();
    let tc = placer.begin_map(&req(3, 8 * P, &c)).unwrap().unwrap();
    let td = placer.begin_map(&req(4, 12 * P, &d)).unwrap().unwrap();
    let tickets = [tb, ta, tc, td];
    let mut results = vec![];
    while let Some((t, r)) = placer.finish_next() {
        if t == tickets[1] {
            // The unmap's verdict: the VMM's window is background there already.
            assert!(
                !placed(&vmm.window).contains(&0),
                "UNMAP settled before the VMM restored the range"
            );
        }
        results.push((t, r.map_err(|e| format!("{e:?}"))));
    }
    let order: Vec<u64> = results.iter().map(|(t, _)| *t).collect();
    assert_eq!(order, tickets, "verdicts in command order");
    let outcomes: Vec<bool> = results.iter().map(|(_, r)| r.is_ok()).collect();
    assert_eq!(outcomes, [true, true, false, true], "{results:?}");
    assert!(
        results[2].1.as_ref().unwrap_err().contains("test refuses"),
        "{results:?}"
    );
    assert_eq!(
        vmm.messages(),
        [
            Seen::One(Ev::Map(1, 0)),
            Seen::One(Ev::Map(2, 4 * P)),
            Seen::One(Ev::Unmap(1, 0)),
            Seen::Batch(vec![Ev::Map(3, 8 * P), Ev::Map(4, 12 * P)], 2),
        ],
        "two messages in flight, then the two queued events left as one batch"
    );
    assert_eq!(placed(&vmm.window), [4 * P, 12 * P]);
    views_equal(&placer, &vmm);
    assert_eq!(placer.batching(), (4, 5));
    drop(placer);
}

/// A mirror placement that fails while its event still waits in the outbox (the VMM is
/// busy with an earlier one): the event is recalled, the VMM never hears of it, the error
/// is immediate, and the events around it keep their order.
#[test]
fn a_mirror_failure_while_the_event_waits_in_the_outbox_recalls_it() {
    let (mut placer, vmm) = setup(Policy {
        refuse: HashSet::new(),
        delay: Duration::from_millis(100),
        ..Policy::default()
    });
    let (b, e, c, d) = (blob(2, 1), blob(5, 1), blob(3, 1), blob(4, 1));
    // B and E fill the messages that may wait at the VMM: C waits in the outbox.
    assert_eq!(MESSAGES_IN_FLIGHT, 2);
    let tb = placer.begin_map(&req(2, 4 * P, &b)).unwrap().unwrap();
    let te = placer.begin_map(&req(5, 16 * P, &e)).unwrap().unwrap();
    placer.set_test_faults(MirrorFaults {
        fail_place: Some(1),
        fail_restore: None,
    });
    match placer.begin_map(&req(3, 8 * P, &c)) {
        Err(PlaceError::OutOfMemory(_)) => {}
        other => panic!("expected an immediate OutOfMemory, got {other:?}"),
    }
    let td = placer.begin_map(&req(4, 12 * P, &d)).unwrap().unwrap();
    let got: Vec<(u64, bool)> = std::iter::from_fn(|| placer.finish_next())
        .map(|(t, r)| (t, r.is_ok()))
        .collect();
    assert_eq!(got, [(tb, true), (te, true), (td, true)]);
    assert_eq!(
        vmm.events(),
        [Ev::Map(2, 4 * P), Ev::Map(5, 16 * P), Ev::Map(4, 12 * P)]
    );
    views_equal(&placer, &vmm);
    drop(placer);
}

/// A mirror placement failing after its Map left, with more events behind it: the VMM
/// gets the take-back Unmap after them, every verdict keeps its order, both views agree.
#[test]
fn a_take_back_behind_queued_events_keeps_order_and_views() {
    let (mut placer, vmm) = setup(Policy::default());
    let (b, c) = (blob(2, 1), blob(3, 1));
    placer.set_test_faults(MirrorFaults {
        fail_place: Some(1),
        fail_restore: None,
    });
    // Sent alone (the VMM owes nothing), so its failure takes the "sent" path.
    let tb = placer.begin_map(&req(2, 4 * P, &b)).unwrap().unwrap();
    let tc = placer.begin_map(&req(3, 8 * P, &c)).unwrap().unwrap();
    let got: Vec<(u64, Result<(), PlaceError>)> =
        std::iter::from_fn(|| placer.finish_next()).collect();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].0, got[1].0), (tb, tc));
    assert!(
        matches!(got[0].1, Err(PlaceError::OutOfMemory(_))),
        "{got:?}"
    );
    assert!(got[1].1.is_ok(), "{got:?}");
    let evs = vmm.events();
    assert_eq!(evs.first(), Some(&Ev::Map(2, 4 * P)));
    assert_eq!(evs.last(), Some(&Ev::Unmap(2, 4 * P)), "{evs:?}");
    assert_eq!(placed(&vmm.window), [8 * P]);
    views_equal(&placer, &vmm);
    drop(placer);
}

/// An Unmap the VMM refuses after the mirror was restored (its window keeps the blob, ours
/// does not): the device cannot make the views agree again by itself, so it gives up the
/// tube (the VMM restores everything when the device exits, invariant 4), the guest's
/// UNMAP fails, and nothing more is sent.
#[test]
fn a_refused_unmap_breaks_the_tube() {
    let (mut placer, vmm) = setup(Policy {
        refuse_unmaps: HashSet::from([1]),
        ..Policy::default()
    });
    let b1 = blob(1, 2);
    placer.map(&req(1, 0, &b1)).unwrap();
    unmap_breaks_the_tube(&mut placer, "refused the unmap");
    assert_eq!(placed(&vmm.window), [0], "the VMM kept it");
    assert!(placed(placer.window()).is_empty(), "the mirror restored it");
    refuses_at_once(&mut placer);
    assert_eq!(
        vmm.events(),
        [Ev::Map(1, 0), Ev::Unmap(1, 0)],
        "nothing after the break"
    );
    drop(placer);
}

/// The device's own path for a run of maps: announced (the third waits in the outbox while
/// two messages wait at the VMM), then placed when the run is done; the second placement
/// fails. Placing first sends what waited, so every failure comes after its event left:
/// that map is taken back with an Unmap, the others keep their order, both views agree.
#[test]
fn a_run_announced_then_placed_takes_back_a_failed_placement() {
    let (mut placer, vmm) = setup(Policy {
        refuse: HashSet::new(),
        delay: Duration::from_millis(50),
        ..Policy::default()
    });
    assert!(placer.announces());
    let (b, c, d) = (blob(2, 1), blob(3, 1), blob(4, 1));
    let reqs = [req(2, 4 * P, &b), req(3, 8 * P, &c), req(4, 12 * P, &d)];
    let tickets: Vec<u64> = reqs
        .iter()
        .map(|r| placer.announce_map(r).unwrap())
        .collect();
    placer.set_test_faults(MirrorFaults {
        fail_place: Some(2),
        fail_restore: None,
    });
    for (t, r) in tickets.iter().zip(&reqs) {
        placer.place_announced(*t, r);
    }
    let got: Vec<(u64, bool)> = std::iter::from_fn(|| placer.finish_next())
        .map(|(t, r)| (t, r.is_ok()))
        .collect();
    assert_eq!(
        got,
        [(tickets[0], true), (tickets[1], false), (tickets[2], true)]
    );
    let evs = vmm.events();
    assert_eq!(
        evs[..3],
        [Ev::Map(2, 4 * P), Ev::Map(3, 8 * P), Ev::Map(4, 12 * P)],
        "all three reached the VMM: {evs:?}"
    );
    assert_eq!(evs.last(), Some(&Ev::Unmap(3, 8 * P)), "{evs:?}");
    assert_eq!(placed(&vmm.window), [4 * P, 12 * P]);
    views_equal(&placer, &vmm);
    drop(placer);
}
