//! Fuzz harness over the virtio core: queue setup, descriptor walk, command parser and
//! handler, responses through the used ring, reset. The input is a program of driver
//! operations (write a descriptor, offer a head, kick, settle a placement, drop a command
//! into a buffer, poke ring fields, reset) run against a fresh device on a shared guest
//! RAM; after it the device must not have panicked, every used entry must name a head
//! below the queue size, and the device must still answer a well-formed command.
//!
//! Runs bounded here (seeded, deterministic; `HOSTMEM_FUZZ_ITERS` / `HOSTMEM_FUZZ_SEED` for
//! long runs) because the `hostmem-tests` crate, home of the other harnesses, depends on the
//! VMM crate; [`run_input`] is a plain `fn(&[u8])` that can move into
//! `hostmem_tests::fuzz::TARGETS` unchanged.

mod common;

use hostmem_base::rng::SplitMix64;

use hostmem_device::backend::shm::ShmBackend;
use hostmem_device::backend::Backend;
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_device::virtio::{GuestMemoryMmap, VirtioGpu, CONTROLQ, CURSORQ};
use hostmem_device::wire::*;
use hostmem_ipc::protocol::QueueSetup;
use vm_memory::{Bytes, GuestAddress};

use common::{efd, used_idx, AVAIL, DESC, RAM_GPA, USED};

const RAM_SIZE: u64 = 1 << 20;
const DATA: u64 = RAM_GPA + 0x4000;
/// The part of RAM a program touches (cleared before each input).
const SCRATCH: usize = 0x4000 + 16 * 0x400;

#[derive(Debug, Default)]
struct Pipelined {
    tickets: std::collections::VecDeque<u64>,
    next: u64,
    refuse: bool,
}

impl Placer for Pipelined {
    fn map(&mut self, _req: &MapRequest<'_>) -> Result<(), PlaceError> {
        Ok(())
    }
    fn unmap(&mut self, _id: u32, _offset: u64, _len: u64) -> Result<(), PlaceError> {
        Ok(())
    }
    fn window_size(&self) -> u64 {
        16 << 20
    }
    fn begin_map(&mut self, _req: &MapRequest<'_>) -> Result<Option<u64>, PlaceError> {
        self.next += 1;
        self.tickets.push_back(self.next);
        Ok(Some(self.next))
    }
    fn begin_unmap(&mut self, _: u32, _: u64, _: u64) -> Result<Option<u64>, PlaceError> {
        self.next += 1;
        self.tickets.push_back(self.next);
        Ok(Some(self.next))
    }
    fn finish_next(&mut self) -> Option<(u64, Result<(), PlaceError>)> {
        let refuse = self.refuse;
        self.tickets.pop_front().map(|t| {
            let r = if refuse {
                Err(PlaceError::OutOfMemory("fuzz".into()))
            } else {
                Ok(())
            };
            (t, r)
        })
    }
}

fn memory() -> &'static GuestMemoryMmap {
    static MEM: std::sync::OnceLock<GuestMemoryMmap> = std::sync::OnceLock::new();
    MEM.get_or_init(|| common::ram("fuzz-ram", RAM_SIZE).1)
}

/// Commands the program can drop into a data buffer (so the handler sees real traffic).
fn templates() -> Vec<Vec<u8>> {
    let host3d = VIRTIO_GPU_BLOB_MEM_HOST3D;
    let m = VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE;
    vec![
        Command::ctx_create(1, 0, b"fz").encode(),
        Command::create_blob(1, 2, host3d, m, 0, 4096).encode(),
        Command::create_blob(1, 3, host3d, m, 0, 8192).encode(),
        Command::map_blob(1, 2, 0).encode(),
        Command::map_blob(1, 3, 4096).encode(),
        Command::map_blob(1, 3, 8192).fenced(5).encode(),
        Command::unmap_blob(1, 2).encode(),
        Command::unmap_blob(1, 3).encode(),
        Command::unref(2).encode(),
        Command::ctx_destroy(1).encode(),
        Command::get_capset_info(0).encode(),
        Command::get_capset(hostmem_device::backend::shm::SHM_CAPSET_ID, 1).encode(),
        Command::submit_3d(1, vec![0; 16]).encode(),
    ]
}

struct Prog<'a> {
    data: &'a [u8],
}

impl Prog<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from(self.u16()?) | (u32::from(self.u16()?) << 16))
    }
}

fn enable(dev: &mut VirtioGpu<Pipelined>, index: u16, size: u16, event_idx: bool) -> bool {
    let (desc, avail, used) = if index == CONTROLQ {
        (DESC, AVAIL, USED)
    } else {
        (DESC + 0x3000, DESC + 0x3400, DESC + 0x3800)
    };
    let s = QueueSetup {
        index,
        size,
        desc,
        avail,
        used,
        event_idx,
    };
    dev.enable_queue(&s, efd(), efd()).is_ok()
}

/// One fuzz input (see the module doc). Never panics unless the device misbehaves.
pub fn run_input(data: &[u8]) {
    run(data);
}

/// [`run_input`], returning the device's counters before the final still-serving check.
fn run(data: &[u8]) -> hostmem_ipc::protocol::QueueStats {
    let mem = memory();
    mem.write_slice(&vec![0u8; SCRATCH], GuestAddress(RAM_GPA))
        .unwrap();
    let mut p = Prog { data };
    let Some(head) = p.byte() else {
        return Default::default();
    };
    let placer = Pipelined {
        refuse: head & 0x80 != 0,
        ..Default::default()
    };
    let mut dev = VirtioGpu::new(Gpu::new(
        Box::new(ShmBackend::new()) as Box<dyn Backend>,
        placer,
    ));
    dev.set_memory(mem.clone()).unwrap();
    // Sizes 1..=256 mostly, sometimes a bad one.
    let size: u16 = match head & 0x0f {
        n @ 0..=8 => 1 << n,
        9 => 0,
        10 => 3,
        11 => 512,
        _ => 16,
    };
    let event_idx = head & 0x10 != 0;
    let ok = enable(&mut dev, CONTROLQ, size, event_idx);
    assert_eq!(ok, size.is_power_of_two() && size <= 256, "size {size}");
    let _ = enable(&mut dev, CURSORQ, 8, false);
    let templates = templates();
    let mut avail_idx: u16 = 0;
    let mut offered: u64 = 0;
    while let Some(op) = p.byte() {
        match op % 9 {
            0 => {
                // Descriptor i: addr mostly inside the data area, sometimes raw.
                let (Some(i), Some(sel), Some(len), Some(flags), Some(next)) =
                    (p.byte(), p.byte(), p.u16(), p.byte(), p.byte())
                else {
                    break;
                };
                let addr = match sel >> 6 {
                    0 | 1 => DATA + u64::from(sel & 0x0f) * 0x400,
                    2 => [0, RAM_GPA + RAM_SIZE - 4, 0x1_0000_0000, u64::MAX - 7]
                        [usize::from(sel & 3)],
                    _ => u64::from(p.u32().unwrap_or(0)) << (sel & 0x1f),
                };
                let len = if flags & 0x80 != 0 {
                    u32::from(len) << 16
                } else {
                    u32::from(len) % 0x800
                };
                let (flags, next) = (u16::from(flags & 7), u16::from(next));
                common::write_desc(mem, DESC, u16::from(i), addr, len, flags, next);
            }
            1 => {
                let Some(h) = p.byte() else { break };
                let slot = AVAIL + 4 + 2 * u64::from(avail_idx % size.max(1));
                mem.write_obj(u16::from(h).to_le(), GuestAddress(slot))
                    .unwrap();
                avail_idx = avail_idx.wrapping_add(1);
                offered += 1;
                mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2))
                    .unwrap();
            }
            2 => dev.kick(CONTROLQ),
            3 => dev.finish_one(),
            4 => {
                let (Some(t), Some(slot), Some(cut)) = (p.byte(), p.byte(), p.byte()) else {
                    break;
                };
                let cmd = &templates[usize::from(t) % templates.len()];
                let n = if cut & 0x80 != 0 {
                    usize::from(cut & 0x3f).min(cmd.len())
                } else {
                    cmd.len()
                };
                let at = DATA + u64::from(slot & 0x0f) * 0x400;
                mem.write_slice(&cmd[..n], GuestAddress(at)).unwrap();
            }
            5 => {
                let (Some(which), Some(v)) = (p.byte(), p.u16()) else {
                    break;
                };
                // avail flags, used_event, or the avail index itself.
                let at = match which % 3 {
                    0 => AVAIL,
                    1 => AVAIL + 4 + 2 * u64::from(size),
                    _ => AVAIL + 2,
                };
                mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
                if which % 3 == 2 {
                    // The driver may publish up to a queue size of garbage entries.
                    offered += u64::from(v.wrapping_sub(avail_idx));
                    avail_idx = v;
                }
            }
            6 => dev.kick(CURSORQ),
            7 => {
                dev.reset();
                dev.set_memory(mem.clone()).unwrap();
                mem.write_slice(&[0u8; 8], GuestAddress(AVAIL)).unwrap();
                mem.write_slice(&[0u8; 8], GuestAddress(USED)).unwrap();
                avail_idx = 0;
                let _ = enable(&mut dev, CONTROLQ, size, event_idx);
            }
            _ => dev.process_busy(),
        }
    }
    while dev.in_flight() > 0 {
        dev.finish_one();
    }
    // Every used entry names a head inside the queue.
    if size.is_power_of_two() && size <= 256 && dev.queue_enabled(CONTROLQ) {
        let n = used_idx(mem, USED).min(size);
        for i in 0..n {
            let (id, _) = common::used_elem(mem, USED, size, i);
            assert!(id < u32::from(size), "used id {id} in a queue of {size}");
        }
    }
    let s = dev.stats();
    assert!(
        s.chains <= offered,
        "{s:?}: took more chains than offered ({offered})"
    );
    let before = s;
    // Still serving: a clean queue after reset answers CTX_CREATE.
    dev.reset();
    dev.set_memory(mem.clone()).unwrap();
    mem.write_slice(&vec![0u8; SCRATCH], GuestAddress(RAM_GPA))
        .unwrap();
    assert!(enable(&mut dev, CONTROLQ, 4, false));
    let cmd = Command::ctx_create(77, 0, b"").encode();
    let (r, w) = (DATA, DATA + 0x400);
    mem.write_slice(&cmd, GuestAddress(r)).unwrap();
    common::write_desc(mem, DESC, 0, r, cmd.len() as u32, 1, 1);
    common::write_desc(mem, DESC, 1, w, 64, 2, 0);
    mem.write_obj(1u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    dev.kick(CONTROLQ);
    assert_eq!(used_idx(mem, USED), 1, "still serving");
    let mut resp = [0u8; 24];
    mem.read_slice(&mut resp, GuestAddress(w)).unwrap();
    assert_eq!(
        Response::parse(&resp).map(|r| r.type_()),
        Ok(VIRTIO_GPU_RESP_OK_NODATA)
    );
    before
}

/// Hand-written seeds: a normal session, a loop, a pipelined map storm, a reset in traffic.
fn seeds() -> Vec<Vec<u8>> {
    // op 4 (template t -> slot s), op 0 (desc i, sel, len, flags, next), op 1 (offer), op 2.
    let cmd = |t: u8, s: u8| vec![4, t, s, 0];
    let desc = |i: u8, s: u8, len: u16, f: u8, n: u8| {
        let l = len.to_le_bytes();
        vec![0, i, s, l[0], l[1], f, n]
    };
    let mut normal = vec![4u8];
    for (k, t) in [0u8, 1, 3, 6, 8, 9].into_iter().enumerate() {
        let k = k as u8;
        normal.extend(cmd(t, 2 * k));
        normal.extend(desc(2 * k, 2 * k, 120, 1, 2 * k + 1));
        normal.extend(desc(2 * k + 1, 2 * k + 1, 64, 2, 0));
        normal.extend([1, 2 * k, 2, 3]);
    }
    let mut looped = vec![3u8];
    looped.extend(desc(0, 0, 40, 1, 1));
    looped.extend(desc(1, 1, 64, 3, 0));
    looped.extend([1, 0, 2]);
    let mut storm = vec![0x14u8];
    for (k, t) in [0u8, 1, 2, 3, 4, 6, 7, 5].into_iter().enumerate() {
        let k = k as u8;
        storm.extend(cmd(t, k));
        storm.extend(desc(2 * k, k, 120, 1, 2 * k + 1));
        storm.extend(desc(2 * k + 1, 8 + (k & 7), 64, 2, 0));
        storm.extend([1, 2 * k]);
    }
    storm.extend([2, 1, 0, 2, 7, 2]);
    vec![
        normal,
        looped,
        storm,
        vec![0x84, 1, 300u16 as u8, 2, 5, 2, 40, 0, 2],
    ]
}

fn mutate(rng: &mut SplitMix64, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    let n = 1 + rng.next_u64() % 8;
    for _ in 0..n {
        let r = rng.next_u64();
        let pos = if v.is_empty() {
            0
        } else {
            (r >> 8) as usize % v.len()
        };
        match r % 5 {
            0 if !v.is_empty() => v[pos] = (r >> 32) as u8,
            1 => v.insert(pos.min(v.len()), (r >> 32) as u8),
            2 if !v.is_empty() => {
                v.remove(pos);
            }
            3 if !v.is_empty() => v[pos] ^= 1 << ((r >> 40) % 8),
            _ => v.extend((0..(r >> 48) % 16).map(|i| (r >> (i % 8)) as u8)),
        }
    }
    v.truncate(512);
    v
}

#[test]
fn fuzz_virtqueue_and_command_parser() {
    let iters: u64 = std::env::var("HOSTMEM_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("HOSTMEM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0012);
    let seeds = seeds();
    // The seeds do what they say: the normal session and the map storm are served, the
    // loop is refused.
    let st: Vec<_> = seeds.iter().map(|s| run(s)).collect();
    assert_eq!((st[0].chains, st[0].bad_chains), (6, 0), "{:?}", st[0]);
    assert_eq!((st[1].chains, st[1].bad_chains), (1, 1), "{:?}", st[1]);
    assert_eq!((st[2].chains, st[2].bad_chains), (9, 0), "{:?}", st[2]);
    let mut rng = SplitMix64::new(seed);
    let t = std::time::Instant::now();
    for i in 0..iters {
        let input = if i % 4 == 0 {
            (0..rng.next_u64() % 256)
                .map(|_| rng.next_u64() as u8)
                .collect()
        } else {
            let s = &seeds[(rng.next_u64() % seeds.len() as u64) as usize];
            mutate(&mut rng, s)
        };
        let r = std::panic::catch_unwind(|| run_input(&input));
        if r.is_err() {
            panic!("fuzz input {i} (seed {seed:#x}) failed: {input:?}");
        }
    }
    println!(
        "fuzz virtqueue: {} seeds + {iters} inputs (seed {seed:#x}) in {:.1} s",
        seeds.len(),
        t.elapsed().as_secs_f64()
    );
}
