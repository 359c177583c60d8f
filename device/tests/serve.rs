//! The device loop (`process::serve`) over real tubes: a fake VMM thread answers the mapping
//! tube's placement events, the test plays the transport (guest memory, queue enable, stats,
//! reset) and the driver (rings in a shared memfd, kick eventfd). Checks that kicks are
//! served while placements are in flight, that every transport message is answered with
//! its seq, that Reset answers only after the VMM heard the Unmap, and that closing the
//! transport tube ends the loop cleanly.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;
use hostmem_device::backend::shm::ShmBackend;
use hostmem_device::backend::Backend;
use hostmem_device::gpu::Gpu;
use hostmem_device::mirror::MirrorPlacer;
use hostmem_device::process::{serve, IdlePoll, IDLE_POLL_MAX};
use hostmem_device::virtio::{VirtioGpu, CONTROLQ};
use hostmem_device::wire::*;
use hostmem_ipc::protocol::{
    BatchReply, DeviceMsg, Outcome, QueueSetup, TransportMsg, TransportReply, VmmMsg,
};
use hostmem_ipc::Tube;
use vm_memory::{Bytes, GuestAddress};

use common::{efd, AVAIL, DESC, RAM_GPA, USED};

const RAM_SIZE: u64 = 1 << 20;
const DATA: u64 = RAM_GPA + 0x4000;
const SIZE: u16 = 16;
const WINDOW: u64 = 1 << 20;

#[test]
fn the_loop_serves_kicks_and_transport_messages_until_eof() {
    // The device side: a mirror window and the mapping tube.
    let (dev_map, vmm_map) = Tube::pair().unwrap();
    let (dev_tr, vmm_tr) = Tube::pair().unwrap();
    let mirror =
        Window::from_memfd(SharedMemory::new("mirror", WINDOW).unwrap()).expect("mirror window");
    // Fake VMM: acknowledges every placement event and reports what it saw.
    let (seen_tx, seen_rx) = mpsc::channel::<DeviceMsg>();
    let vmm = std::thread::spawn(move || loop {
        match vmm_map.recv::<DeviceMsg>() {
            Ok((DeviceMsg::Batch { events, .. }, _fds)) => {
                // Several events in one message: one Replies, in event order.
                let mut replies = vec![];
                for ev in events {
                    if let DeviceMsg::Map { seq, .. } | DeviceMsg::Unmap { seq, .. } = &ev {
                        replies.push(BatchReply {
                            seq: *seq,
                            outcome: Outcome::Ok,
                            stamps: None,
                        });
                        let _ = seen_tx.send(ev);
                    }
                }
                vmm_map.send(&VmmMsg::Replies { replies }, &[]).unwrap();
            }
            Ok((msg, _fds)) => {
                let seq = match &msg {
                    DeviceMsg::Map { seq, .. } | DeviceMsg::Unmap { seq, .. } => *seq,
                    _ => continue,
                };
                let _ = seen_tx.send(msg);
                vmm_map
                    .send(
                        &VmmMsg::Reply {
                            seq,
                            outcome: Outcome::Ok,
                        },
                        &[],
                    )
                    .unwrap();
            }
            Err(_) => return,
        }
    });
    let device = std::thread::spawn(move || {
        let gpu = Gpu::new(
            Box::new(ShmBackend::new()) as Box<dyn Backend>,
            MirrorPlacer::new(mirror, dev_map),
        );
        let mut dev = VirtioGpu::new(gpu);
        serve(&dev_tr, &mut dev, IdlePoll::new(IDLE_POLL_MAX)).map(|()| dev.stats())
    });

    // The transport: guest RAM and the control queue.
    let (ram, mem) = common::ram("ram", RAM_SIZE);
    vmm_tr
        .set_recv_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let ask = |msg: &TransportMsg, fds: &[OwnedFd]| -> TransportReply {
        let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        vmm_tr.send(msg, &b).unwrap();
        vmm_tr.recv::<TransportReply>().expect("reply").0
    };
    let ok = |r: TransportReply, seq: u64| {
        assert_eq!(r, TransportReply::Done { seq, error: None });
    };
    ok(
        ask(
            &TransportMsg::GuestMemory {
                seq: 1,
                regions: vec![common::region(RAM_SIZE)],
            },
            &[ram.try_clone_fd().unwrap()],
        ),
        1,
    );
    let (kick, call) = (efd(), efd());
    let setup = QueueSetup {
        index: CONTROLQ,
        size: SIZE,
        desc: DESC,
        avail: AVAIL,
        used: USED,
        event_idx: false,
    };
    ok(
        ask(
            &TransportMsg::QueueEnable {
                seq: 2,
                queue: setup,
            },
            &[kick.try_clone().unwrap(), call.try_clone().unwrap()],
        ),
        2,
    );
    // A refused message still gets its seq back, with the reason.
    match ask(
        &TransportMsg::QueueEnable {
            seq: 3,
            queue: QueueSetup { size: 3, ..setup },
        },
        &[efd(), efd()],
    ) {
        TransportReply::Done {
            seq: 3,
            error: Some(e),
        } => assert!(e.contains("already enabled") || e.contains("size"), "{e}"),
        other => panic!("{other:?}"),
    }

    // The driver: CTX_CREATE, CREATE_BLOB, MAP_BLOB, in one kick.
    let page = 4096;
    let cmds = [
        Command::ctx_create(1, 0, b"serve").encode(),
        Command::create_blob(
            1,
            5,
            VIRTIO_GPU_BLOB_MEM_HOST3D,
            VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
            0,
            page,
        )
        .encode(),
        Command::map_blob(1, 5, 2 * page).encode(),
    ];
    let mut idx = 0u16;
    let mut offer = |cmds: &[Vec<u8>], first: u16| {
        for (k, c) in cmds.iter().enumerate() {
            let k = k as u16 + first;
            let r = DATA + u64::from(k) * 0x400;
            let w = r + 0x200;
            mem.write_slice(c, GuestAddress(r)).unwrap();
            common::write_desc(&mem, DESC, 2 * k, r, c.len() as u32, 1, 2 * k + 1);
            common::write_desc(&mem, DESC, 2 * k + 1, w, 64, 2, 0);
            idx = common::offer(&mem, AVAIL, SIZE, idx, 2 * k);
        }
        nix::unistd::write(kick.as_fd(), &1u64.to_ne_bytes()).unwrap();
        idx
    };
    let want = offer(&cmds, 0);
    let used_idx = || common::used_idx(&mem, USED);
    let t0 = Instant::now();
    while used_idx() != want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "used idx {}",
            used_idx()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut resp = [0u8; 32];
    mem.read_slice(&mut resp, GuestAddress(DATA + 2 * 0x400 + 0x200))
        .unwrap();
    let r = Response::parse(&resp).unwrap();
    assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
    assert!(matches!(
        seen_rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        DeviceMsg::Map {
            resource_id: 5,
            offset: 8192,
            ..
        }
    ));
    match ask(&TransportMsg::Stats { seq: 4 }, &[]) {
        TransportReply::Stats { seq: 4, stats } => {
            assert_eq!(stats.chains, 3);
            assert!(stats.kicks >= 1 && stats.interrupts >= 1, "{stats:?}");
        }
        other => panic!("{other:?}"),
    }
    // Reset: the reply comes after the VMM heard the Unmap.
    ok(ask(&TransportMsg::Reset { seq: 5 }, &[]), 5);
    assert!(matches!(
        seen_rx.try_recv().expect("Unmap before the reset's reply"),
        DeviceMsg::Unmap {
            resource_id: 5,
            offset: 8192,
            ..
        }
    ));
    // Guest memory survives the reset: the queue can be enabled again at once.
    match ask(
        &TransportMsg::QueueEnable {
            seq: 6,
            queue: setup,
        },
        &[efd(), efd()],
    ) {
        TransportReply::Done {
            seq: 6,
            error: None,
        } => {}
        other => panic!("{other:?}"),
    }
    // EOF on the transport tube ends the loop with success.
    drop(vmm_tr);
    let stats = device.join().unwrap().expect("serve returns Ok on EOF");
    assert_eq!(stats.chains, 3);
    drop(vmm);
}
