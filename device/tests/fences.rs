//! Context fences in the command handler: a fenced command's response waits for *its*
//! fence, per context and ring; other commands are answered meanwhile; rings retire out of
//! order with each other and in order within one; a destroyed context releases its parked
//! responses and a reset drops them. The backend is the shm backend with fences that retire
//! when the test says (a renderer whose work is asynchronous).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hostmem_device::backend::shm::ShmBackend;
use hostmem_device::backend::{Backend, BackendError, BlobCreate, CapsetInfo, ExportedBlob};
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer, MAX_RINGS};
use hostmem_device::wire::*;

/// What the fake renderer has retired, per (ctx, ring), and the fences asked for.
#[derive(Debug, Default)]
struct Fences {
    retired: BTreeMap<(u32, u32), u64>,
    asked: Vec<(u32, u32, u64)>,
}

#[derive(Debug)]
struct FenceBackend {
    inner: ShmBackend,
    fences: Arc<Mutex<Fences>>,
}

impl Backend for FenceBackend {
    fn name(&self) -> &'static str {
        "fence-test"
    }
    fn capsets(&self) -> Vec<CapsetInfo> {
        self.inner.capsets()
    }
    fn capset(&mut self, id: u32, version: u32) -> Result<Vec<u8>, BackendError> {
        self.inner.capset(id, version)
    }
    fn create_context(&mut self, ctx: u32, capset: u32, name: &[u8]) -> Result<(), BackendError> {
        self.inner.create_context(ctx, capset, name)
    }
    fn destroy_context(&mut self, ctx: u32) -> Result<(), BackendError> {
        self.inner.destroy_context(ctx)
    }
    fn create_blob(&mut self, args: &BlobCreate) -> Result<(), BackendError> {
        self.inner.create_blob(args)
    }
    fn unref(&mut self, id: u32) -> Result<(), BackendError> {
        self.inner.unref(id)
    }
    fn submit_3d(&mut self, ctx: u32, stream: &[u8]) -> Result<Vec<u8>, BackendError> {
        self.inner.submit_3d(ctx, stream)
    }
    fn export_blob(&mut self, id: u32) -> Result<ExportedBlob, BackendError> {
        self.inner.export_blob(id)
    }
    fn create_fence(&mut self, ctx: u32, ring: u32, id: u64) -> Result<bool, BackendError> {
        let mut f = self.fences.lock().unwrap();
        f.asked.push((ctx, ring, id));
        Ok(f.retired.get(&(ctx, ring)).is_some_and(|r| *r >= id))
    }
    fn retire_fences(&mut self) -> Vec<(u32, u32, u64)> {
        let f = self.fences.lock().unwrap();
        f.retired.iter().map(|(&(c, r), &id)| (c, r, id)).collect()
    }
    fn fences_pending(&self) -> bool {
        true
    }
}

#[derive(Debug, Default)]
struct NoPlacer;

impl Placer for NoPlacer {
    fn map(&mut self, _: &MapRequest<'_>) -> Result<(), PlaceError> {
        Err(PlaceError::Unspec("no window in this test".into()))
    }
    fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<(), PlaceError> {
        Ok(())
    }
    fn window_size(&self) -> u64 {
        1 << 20
    }
}

type G = Gpu<NoPlacer, FenceBackend>;

fn setup() -> (G, Arc<Mutex<Fences>>) {
    let fences = Arc::new(Mutex::new(Fences::default()));
    let backend = FenceBackend {
        inner: ShmBackend::new(),
        fences: fences.clone(),
    };
    (Gpu::new(Box::new(backend), NoPlacer), fences)
}

/// SUBMIT_3D in `ctx` with fence `id` on `ring` (`None`: FLAG_FENCE without INFO_RING_IDX).
fn fenced_submit(ctx: u32, ring: Option<u8>, id: u64) -> Vec<u8> {
    let mut b = Command::submit_3d(ctx, vec![]).fenced(id).encode();
    if let Some(r) = ring {
        let flags = u32::from_le_bytes(b[4..8].try_into().unwrap()) | VIRTIO_GPU_FLAG_INFO_RING_IDX;
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b[20] = r;
    }
    b
}

fn retire(f: &Arc<Mutex<Fences>>, ctx: u32, ring: u32, id: u64) {
    f.lock().unwrap().retired.insert((ctx, ring), id);
}

fn tokens(g: &mut G) -> Vec<u64> {
    g.take_ready().into_iter().map(|(t, _)| t).collect()
}

#[test]
fn fenced_responses_wait_for_their_own_fence() {
    let (mut g, f) = setup();
    g.submit(1, &Command::ctx_create(1, 0, b"a").encode());
    g.submit(2, &Command::ctx_create(2, 0, b"b").encode());
    assert_eq!(tokens(&mut g), [1, 2]);

    g.submit(10, &fenced_submit(1, Some(1), 100));
    g.submit(11, &fenced_submit(1, Some(2), 200));
    g.submit(12, &fenced_submit(1, Some(1), 101));
    g.submit(13, &fenced_submit(2, Some(1), 300));
    // An unfenced command behind them is answered at once.
    g.submit(14, &Command::get_capset_info(0).encode());
    assert_eq!(tokens(&mut g), [14]);
    assert_eq!(g.parked(), 4);
    assert_eq!(
        f.lock().unwrap().asked,
        [(1, 1, 100), (1, 2, 200), (1, 1, 101), (2, 1, 300)]
    );

    // Ring 2 retires first: its response goes out before ring 1's (out of order across
    // rings), and the other context's ring 1 is not ring 1 of context 1.
    retire(&f, 1, 2, 200);
    assert_eq!(g.poll_fences(), 1);
    assert_eq!(tokens(&mut g), [11]);
    // Ring 1 retires up to 100 only: 101 still waits.
    retire(&f, 1, 1, 100);
    g.poll_fences();
    assert_eq!(tokens(&mut g), [10]);
    retire(&f, 2, 1, 300);
    retire(&f, 1, 1, 101);
    g.poll_fences();
    let mut t = tokens(&mut g);
    t.sort_unstable();
    assert_eq!(t, [12, 13]);
    assert_eq!(g.parked(), 0);

    // Responses echo the fence and ring.
    g.submit(20, &fenced_submit(1, Some(5), 7));
    retire(&f, 1, 5, 7);
    g.poll_fences();
    let (_, resp) = g.take_ready().pop().unwrap();
    let hdr = CtrlHdr::parse(&resp).unwrap();
    assert_eq!(hdr.type_, VIRTIO_GPU_RESP_OK_NODATA);
    assert_eq!((hdr.fence_id, hdr.ring_idx, hdr.ctx_id), (7, 5, 1));
    assert_ne!(hdr.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX, 0);
}

#[test]
fn within_a_ring_a_signalled_fence_waits_behind_a_parked_one() {
    let (mut g, f) = setup();
    g.submit(1, &Command::ctx_create(1, 0, b"a").encode());
    tokens(&mut g);
    retire(&f, 1, 3, 5);
    g.submit(2, &fenced_submit(1, Some(3), 9)); // parks: 9 > 5
    g.submit(3, &fenced_submit(1, Some(3), 4)); // signalled, but behind 9
    g.submit(4, &fenced_submit(1, Some(4), 1)); // another ring, nothing retired: parks
    assert_eq!(tokens(&mut g), Vec::<u64>::new());
    g.poll_fences();
    assert_eq!(tokens(&mut g), Vec::<u64>::new());
    retire(&f, 1, 3, 9);
    g.poll_fences();
    assert_eq!(tokens(&mut g), [2, 3]);
    // Without INFO_RING_IDX the fence is on ring 0; a signalled one on a free ring goes out
    // in command order with the rest.
    retire(&f, 1, 0, 50);
    g.submit(5, &fenced_submit(1, None, 50));
    g.submit(6, &Command::get_capset_info(0).encode());
    assert_eq!(tokens(&mut g), [5, 6]);
    assert_eq!(g.parked(), 1);
}

#[test]
fn bad_rings_are_refused_and_dead_contexts_release_their_fences() {
    let (mut g, f) = setup();
    g.submit(1, &Command::ctx_create(1, 0, b"a").encode());
    tokens(&mut g);
    g.submit(2, &fenced_submit(1, Some(MAX_RINGS), 1));
    let (_, resp) = g.take_ready().pop().unwrap();
    let r = Response::parse(&resp).unwrap();
    assert_eq!(r.error(), Some(ErrorCode::InvalidParameter));
    assert!(
        f.lock().unwrap().asked.is_empty(),
        "no fence for a refused command"
    );
    // A fenced command that failed is answered at once, without a fence.
    g.submit(3, &fenced_submit(9, Some(1), 1));
    let (_, resp) = g.take_ready().pop().unwrap();
    assert_eq!(
        Response::parse(&resp).unwrap().error(),
        Some(ErrorCode::InvalidContextId)
    );

    g.submit(4, &fenced_submit(1, Some(1), 10));
    g.submit(5, &fenced_submit(1, Some(2), 10));
    assert_eq!(g.parked(), 2);
    // Destroying the context answers what it parked (its fences can no longer retire).
    g.submit(6, &Command::ctx_destroy(1).encode());
    let mut t = tokens(&mut g);
    t.sort_unstable();
    assert_eq!(t, [4, 5, 6]);
    assert_eq!(g.parked(), 0);

    // A reset drops parked responses (their chains belong to the old queues).
    g.submit(7, &Command::ctx_create(2, 0, b"b").encode());
    g.submit(8, &fenced_submit(2, Some(1), 10));
    tokens(&mut g);
    assert_eq!(g.parked(), 1);
    let sum = g.reset_all();
    assert_eq!(sum.dropped_responses, 1);
    assert_eq!(g.parked(), 0);
    assert!(g.take_ready().is_empty());
}

#[test]
fn handle_waits_for_the_fence() {
    let (mut g, f) = setup();
    assert!(matches!(
        Response::parse(&g.handle(&Command::ctx_create(1, 0, b"a").encode())).unwrap(),
        Response::OkNoData { .. }
    ));
    retire(&f, 1, 2, 8);
    let r = Response::parse(&g.handle(&fenced_submit(1, Some(2), 8))).unwrap();
    assert!(matches!(r, Response::OkNoData { .. }), "{r:?}");
}
