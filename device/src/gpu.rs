//! The command handler: decodes a control-queue command ([`crate::wire`]), validates it
//! against the blob table and the contexts, drives the renderer [`Backend`] and places
//! mapped blobs through a [`Placer`]. Every failure is an answer, never a panic: the
//! spec's error response, with the reason logged (`log::warn!`).
//!
//! # Rules
//!
//! * Resource ids are device-global (as in virtio-gpu); the header's `ctx_id` of
//!   MAP/UNMAP/UNREF is not checked.
//! * `RESOURCE_CREATE_BLOB`: id non-zero and unused (`ERR_INVALID_RESOURCE_ID`);
//!   `blob_mem` GUEST or HOST3D, flags ⊆ MAPPABLE|SHAREABLE|CROSS_DEVICE, size non-zero,
//!   page-aligned and ≤ the window size, HOST3D without mem entries, GUEST with at most
//!   [`MAX_MEM_ENTRIES`] (which are otherwise ignored: there is no guest RAM here)
//!   (`ERR_INVALID_PARAMETER`); a non-zero header `ctx_id` must be a live context and
//!   HOST3D needs one (`ERR_INVALID_CONTEXT_ID`); at most [`MAX_BLOBS`] blobs
//!   (`ERR_OUT_OF_MEMORY`).
//! * `RESOURCE_MAP_BLOB`: the resource exists, is MAPPABLE and not mapped yet (the QEMU
//!   map_fixed patch refuses a second mapping of the same resource); the offset is
//!   page-aligned, `offset + size` lies inside the window (checked arithmetic) and does
//!   not overlap another mapped blob. Then `Backend::export_blob` and [`Placer::map`];
//!   a refusal is answered with the placer's error and changes nothing.
//! * `RESOURCE_UNMAP_BLOB`: the resource must be mapped; [`Placer::unmap`] then `OK_NODATA`.
//!   If the placer fails, the blob stays recorded as mapped.
//! * `RESOURCE_UNREF`: a mapped blob is first unmapped through the placer (so the VMM hears
//!   of it); if that fails, nothing is unref'd.
//! * `CTX_CREATE`: id non-zero and unused, capset 0 or one the backend offers.
//!   `CTX_DESTROY` destroys the context only: **its blobs stay alive and mapped**. Resource
//!   ids are global and may have been shared (SHAREABLE / CROSS_DEVICE), and the guest
//!   still sends `RESOURCE_UNREF` for them; the backend stops letting streams touch them.
//! * `CTX_ATTACH_RESOURCE` / `CTX_DETACH_RESOURCE` (Linux sends them for every HOST3D
//!   blob handle it opens and closes): the context must be live (`ERR_INVALID_CONTEXT_ID`)
//!   and the resource (a blob or a 2D resource) must exist (`ERR_INVALID_RESOURCE_ID`);
//!   then `OK_NODATA`. Nothing
//!   else changes: which streams may touch a blob is the backend's rule (its creation
//!   context), and resource ids are device-global.
//! * The display commands (`GET_DISPLAY_INFO`, `GET_EDID`, 2D resources and their
//!   backing, `TRANSFER_TO_HOST_2D`, `SET_SCANOUT`, `SET_SCANOUT_BLOB`, `RESOURCE_FLUSH`,
//!   `RESOURCE_ASSIGN_UUID`, the cursor queue) go to the [`Display`]
//!   ([`crate::display`] has their rules). 2D resources share the resource id space with
//!   blobs and the blob memory budget ([`Gpu::set_blob_budget`] bounds both together);
//!   `RESOURCE_UNREF` of a 2D resource releases it there, and the unref of a blob disables
//!   the scanouts that showed it. Cursor commands on the control queue are `ERR_UNSPEC`.
//! * `SUBMIT_3D` runs the stream in the header's context (which must exist). **Hostmem
//!   extension:** the backend's reply bytes (e.g. the shm backend's checksums) are appended
//!   after the `OK_NODATA` header ([`Response::OkNoData`]'s `reply`); a plain virtio-gpu
//!   driver reads only the header and never sees them.
//! * A truncated command or an unknown / unsupported type gets `ERR_UNSPEC` (as QEMU does);
//!   a length field that disagrees with the message gets `ERR_INVALID_PARAMETER`.
//! * Responses echo the request's fence (`FLAG_FENCE`, `fence_id`, `ctx_id`, `ring_idx`).
//!
//! # Fences
//!
//! A successful command with `FLAG_FENCE` in a live context gets a context fence on its ring
//! (`FLAG_INFO_RING_IDX`'s `ring_idx`, below [`MAX_RINGS`], else ring 0) after its work
//! ([`Backend::create_fence`]). In the pipeline ([`Gpu::submit`]) a fence that has not
//! signalled **parks** the response: it is not in command order any more, other commands
//! go on, and [`Gpu::poll_fences`] (the device loop calls it when a
//! [`Gpu::fence_fds`] fd is readable) releases it when the renderer retires the fence.
//! Within one ring responses are released in the order they parked, a signalled fence
//! behind a parked one waits for it; across rings and contexts in any order.
//! [`Gpu::handle`] (no pipeline) waits for the fence, bounded by [`FENCE_WAIT`]. Destroying
//! a context releases its parked responses (their fences can no longer retire); a reset
//! drops them.
//!
//! # Pipelining
//!
//! [`Gpu::submit`] starts MAP_BLOB, UNMAP_BLOB and the unmap of a mapped blob's UNREF
//! without waiting for the placer's verdict ([`Placer::begin_map`]); responses go out in
//! command order ([`Gpu::take_ready`]). Any other command needs every placement before it
//! settled. With a synchronous placer (the mirror) the handler waits for them there; with
//! a placer whose verdicts arrive only while the caller's loop runs
//! ([`Placer::verdicts_async`]: a vhost-user frontend acks `SHMEM_MAP` on a socket the
//! device polls, and may first send requests of its own that the device must serve), the
//! command and everything after it wait, in order, until [`Gpu::finish_one`] settles what
//! was before them: the handler never blocks on a verdict.

use std::collections::{BTreeMap, VecDeque};

use hostmem_base::log_limit::LogLimiter;
use hostmem_base::mmap::{is_page_aligned, Prot};
use hostmem_base::window::FixedTarget;

use crate::backend::{Backend, BackendError, BlobCreate, ExportedBlob};
use crate::display::{BlobRef, Display, DisplayConfig, FrameSink};
use crate::virtio::GuestMemoryMmap;
use crate::wire::{
    ctrl_type_name, Command, CtrlHdr, CtxCreate, ErrorCode, GetCapset, GetCapsetInfo, ResourceCmd,
    ResourceCreate2d, ResourceCreateBlob, ResourceMapBlob, Response, SetScanoutBlob, Submit3d,
    WireError, VIRTIO_GPU_BLOB_FLAGS_ALL, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
    VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_BLOB_MEM_HOST3D, VIRTIO_GPU_FLAG_FENCE,
    VIRTIO_GPU_FLAG_INFO_RING_IDX, VIRTIO_GPU_RESP_ERR_UNSPEC,
};

/// Scanouts of the default display ([`DisplayConfig::default`]: one, 1024×768; Linux 6.1's
/// driver refuses a device with none). A device with another `--display` reports its own
/// count (natively in `DeviceMsg::Ready`, over vhost-user in `GET_CONFIG`).
pub const NUM_SCANOUTS: u32 = 1;
/// Most live blobs the handler keeps (`ERR_OUT_OF_MEMORY` beyond).
pub const MAX_BLOBS: usize = 65536;
/// Most live contexts (`ERR_OUT_OF_MEMORY` beyond).
pub const MAX_CONTEXTS: usize = 4096;
/// Fence rings per context (`VIRTGPU_CONTEXT_PARAM_NUM_RINGS` is at most 64): a fenced
/// command naming a ring at or past it is refused with `ERR_INVALID_PARAMETER`.
pub const MAX_RINGS: u8 = 64;
/// How long [`Gpu::handle`] waits for a fence before answering `ERR_UNSPEC`.
pub const FENCE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most mem entries a GUEST blob may name (QEMU's limit).
pub const MAX_MEM_ENTRIES: usize = 16384;

/// One placement the handler asks for.
#[derive(Debug)]
pub struct MapRequest<'a> {
    /// The resource being mapped.
    pub resource_id: u32,
    /// Window offset (page-aligned, checked to lie inside the window).
    pub offset: u64,
    /// Length (the blob's size, page-aligned).
    pub len: u64,
    /// The exported blob (fd, fd offset, size, map info).
    pub blob: &'a ExportedBlob,
    /// Protection of the placement.
    pub prot: Prot,
    /// `VIRTIO_GPU_MAP_CACHE_*` answered to the guest.
    pub map_info: u32,
    /// The renderer's own way to map the blob over the mirror's range
    /// ([`Backend::map_fixed`]), for a placer that has a window; `None` in tests.
    pub map_via: Option<MapVia<'a>>,
}

impl MapRequest<'_> {
    /// Places this request in `window` (the device's mirror) with
    /// [`Window::place_with`](hostmem_base::window::Window::place_with): the backend's own
    /// mapping ([`MapRequest::map_via`]) when it has one, else the window's MAP_FIXED of the
    /// blob fd. Returns who mapped.
    pub fn place_in(
        &self,
        window: &hostmem_base::window::Window,
    ) -> hostmem_base::Result<hostmem_base::window::MappedBy> {
        window.place_with(
            self.offset,
            self.len,
            std::os::fd::AsFd::as_fd(&self.blob.fd),
            self.blob.fd_offset,
            self.prot,
            |t| match self.map_via {
                Some(MapVia(f)) => f(t),
                None => Ok(false),
            },
        )
    }
}

/// The signature of [`MapVia`]'s function: [`Backend::map_fixed`] of one blob.
pub type MapViaFn<'a> = dyn Fn(&FixedTarget<'_>) -> Result<bool, String> + 'a;

/// [`Backend::map_fixed`] of the blob being mapped, for [`Window::place_with`].
///
/// [`Window::place_with`]: hostmem_base::window::Window::place_with
#[derive(Clone, Copy)]
pub struct MapVia<'a>(pub &'a MapViaFn<'a>);

impl std::fmt::Debug for MapVia<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapVia(backend)")
    }
}

/// Why a placement was refused. Each maps to one error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaceError {
    /// Limits reached (VMA headroom, placements, fds): `ERR_OUT_OF_MEMORY`.
    OutOfMemory(String),
    /// A field failed validation: `ERR_INVALID_PARAMETER`.
    InvalidParameter(String),
    /// Anything else: `ERR_UNSPEC`.
    Unspec(String),
}

impl PlaceError {
    /// The error response for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            PlaceError::OutOfMemory(_) => ErrorCode::OutOfMemory,
            PlaceError::InvalidParameter(_) => ErrorCode::InvalidParameter,
            PlaceError::Unspec(_) => ErrorCode::Unspec,
        }
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        match self {
            PlaceError::OutOfMemory(s)
            | PlaceError::InvalidParameter(s)
            | PlaceError::Unspec(s) => s,
        }
    }
}

impl std::fmt::Display for PlaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.reason())
    }
}

/// Places blobs in the hostmem window (the device's mirror + the VMM's window, or a fake in
/// tests).
pub trait Placer {
    /// Places `req.blob` at `req.offset`.
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError>;
    /// Restores the background over `offset..offset + len`, where `resource_id` was placed.
    fn unmap(&mut self, resource_id: u32, offset: u64, len: u64) -> Result<(), PlaceError>;
    /// Size of the window in bytes.
    fn window_size(&self) -> u64;
    /// Starts a placement without waiting for its verdict (pipelining): `Ok(Some(ticket))`
    /// when the outcome comes from [`Placer::finish_next`], `Ok(None)` when it is already
    /// final. The default places synchronously.
    fn begin_map(&mut self, req: &MapRequest<'_>) -> Result<Option<u64>, PlaceError> {
        self.map(req).map(|()| None)
    }
    /// True when this placer can tell the VMM of a map before it makes its own placement
    /// ([`Placer::announce_map`], then [`Placer::place_announced`]). The handler then
    /// announces a run of pipelined maps first and places them afterwards, while the VMM
    /// places its copies. Default: false.
    fn announces(&self) -> bool {
        false
    }
    /// [`Placer::begin_map`] up to the report: checked and on its way to the VMM, not
    /// placed here yet. Returns the ticket ([`Placer::finish_next`]). Only called when
    /// [`Placer::announces`]; the default refuses.
    fn announce_map(&mut self, req: &MapRequest<'_>) -> Result<u64, PlaceError> {
        let _ = req;
        Err(PlaceError::Unspec("this placer does not announce".into()))
    }
    /// The placement of an announced map (`ticket`), made after everything announced so far
    /// went to the VMM. A failure is not returned: it fails the map when it is settled
    /// ([`Placer::finish_next`]). The default does nothing.
    fn place_announced(&mut self, ticket: u64, req: &MapRequest<'_>) {
        let _ = (ticket, req);
    }
    /// [`Placer::begin_map`] for a restore.
    fn begin_unmap(
        &mut self,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<u64>, PlaceError> {
        self.unmap(resource_id, offset, len).map(|()| None)
    }
    /// Waits for the verdict of the oldest started operation: its ticket and outcome. A
    /// refused placement has been undone by the placer. `None` when nothing is started.
    fn finish_next(&mut self) -> Option<(u64, Result<(), PlaceError>)> {
        None
    }
    /// True when [`Placer::finish_next`] would not wait: the oldest started operation's
    /// verdict is already in (reading what has arrived, never waiting). Default: false.
    fn next_verdict_ready(&mut self) -> bool {
        false
    }
    /// True when verdicts arrive only while the caller's loop runs, so the handler must
    /// never wait for one inside [`Gpu::submit`] (see the module docs, "Pipelining"): the
    /// caller calls [`Gpu::finish_one`] once per verdict that is ready. Default: false.
    fn verdicts_async(&self) -> bool {
        false
    }
}

impl BackendError {
    /// The error response for this backend error. `InvalidId` answers
    /// `ERR_INVALID_RESOURCE_ID` (the handler answers `ERR_INVALID_CONTEXT_ID` instead for
    /// context commands).
    pub fn response(&self) -> ErrorCode {
        match self {
            BackendError::InvalidId(_) => ErrorCode::InvalidResourceId,
            BackendError::InvalidParameter(_) => ErrorCode::InvalidParameter,
            BackendError::OutOfMemory(_) => ErrorCode::OutOfMemory,
            BackendError::Unspec(_) => ErrorCode::Unspec,
        }
    }
}

/// What the handler knows about one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Resource id.
    pub resource_id: u32,
    /// Context named at creation (0: none). Stays set after that context is destroyed.
    pub ctx_id: u32,
    /// `VIRTIO_GPU_BLOB_MEM_*`.
    pub blob_mem: u32,
    /// `VIRTIO_GPU_BLOB_FLAG_*`.
    pub blob_flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Window offset while mapped.
    pub mapped_at: Option<u64>,
}

/// What [`Gpu::reset_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResetSummary {
    /// Blobs unmapped through the placer.
    pub unmapped: usize,
    /// Blobs unref'd in the backend.
    pub blobs: usize,
    /// Contexts destroyed.
    pub contexts: usize,
    /// Responses of commands that were answered but not taken ([`Gpu::take_ready`]).
    pub dropped_responses: usize,
    /// Unmaps, unrefs or context destructions that failed (logged; the entry is dropped
    /// anyway).
    pub failures: usize,
}

/// A failed command: the response code and the reason to log.
type Refusal = (ErrorCode, String);

fn refuse<T>(code: ErrorCode, reason: impl Into<String>) -> Result<T, Refusal> {
    Err((code, reason.into()))
}

fn backend_refusal(e: BackendError) -> Refusal {
    (e.response(), format!("backend: {e}"))
}

fn ctx_refusal(e: BackendError) -> Refusal {
    let code = match e {
        BackendError::InvalidId(_) => ErrorCode::InvalidContextId,
        ref other => other.response(),
    };
    (code, format!("backend: {e}"))
}

fn place_refusal(e: PlaceError) -> Refusal {
    (e.code(), format!("placer: {}", e.reason()))
}

/// The virtio-gpu hostmem command handler. `B` is the renderer backend (usually
/// `dyn Backend`), `P` the placer.
pub struct Gpu<P: Placer, B: Backend + ?Sized = dyn Backend> {
    backend: Box<B>,
    placer: P,
    blobs: BTreeMap<u32, BlobInfo>,
    /// Live contexts and the capset each asked for.
    contexts: BTreeMap<u32, u32>,
    max_blobs: usize,
    /// Bytes all live blobs may hold together ([`Gpu::set_blob_budget`]; `None`: no bound).
    blob_budget: Option<u64>,
    /// Bytes the live blobs hold now, and at most so far.
    blob_bytes: u64,
    blob_bytes_max: u64,
    /// CREATE_BLOBs refused because they would pass the budget.
    budget_refusals: u64,
    /// Pipelined commands in order: answered, or waiting for the placer's verdict.
    queue: VecDeque<Queued>,
    /// Commands not started yet because a placement before them is unsettled and the
    /// placer's verdicts are asynchronous ([`Placer::verdicts_async`]), in order.
    deferred: VecDeque<(u64, Vec<u8>)>,
    /// Maps announced to the placer whose own placement is still to make
    /// ([`Gpu::place_due`]), in order.
    due: VecDeque<Due>,
    /// Responses parked until their fence retires, per (context, ring), in park order:
    /// (fence id, token, response).
    parked: BTreeMap<(u32, u32), VecDeque<Parked>>,
    /// The highest fence the backend retired per (context, ring).
    retired: BTreeMap<(u32, u32), u64>,
    /// Parked responses whose fence retired, to go out first ([`Gpu::take_ready`]).
    released: VecDeque<(u64, Vec<u8>)>,
    /// Scanouts, 2D resources, cursor.
    display: Display,
    /// Guest RAM, for 2D resources' backing ([`Gpu::set_guest_memory`]).
    mem: Option<GuestMemoryMmap>,
}

/// A response parked behind its fence: (fence id, token, response).
type Parked = (u64, u64, Vec<u8>);

/// An announced map whose placement is due ([`Placer::place_announced`]).
#[derive(Debug)]
struct Due {
    ticket: u64,
    id: u32,
    offset: u64,
    len: u64,
    exported: ExportedBlob,
}

/// A pipelined command ([`Gpu::submit`]) whose response goes out in command order.
#[derive(Debug)]
enum Queued {
    /// The response is known.
    Ready(u64, Vec<u8>),
    /// MAP_BLOB waiting for its placement's verdict.
    Map {
        token: u64,
        ticket: u64,
        hdr: CtrlHdr,
        id: u32,
        map_info: u32,
    },
    /// UNMAP_BLOB waiting for its restore's verdict.
    Unmap {
        token: u64,
        ticket: u64,
        hdr: CtrlHdr,
        id: u32,
        offset: u64,
    },
    /// UNREF of a mapped blob waiting for its restore's verdict; the unref follows.
    Unref {
        token: u64,
        ticket: u64,
        hdr: CtrlHdr,
        id: u32,
        offset: u64,
    },
}

impl<P: Placer + std::fmt::Debug, B: Backend + ?Sized> std::fmt::Debug for Gpu<P, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("backend", &self.backend.name())
            .field("placer", &self.placer)
            .field("blobs", &self.blobs.len())
            .field("contexts", &self.contexts.len())
            .finish()
    }
}

impl<P: Placer, B: Backend + ?Sized> Gpu<P, B> {
    /// A handler over `backend` placing through `placer`.
    pub fn new(backend: Box<B>, placer: P) -> Self {
        Gpu {
            backend,
            placer,
            blobs: BTreeMap::new(),
            contexts: BTreeMap::new(),
            max_blobs: MAX_BLOBS,
            blob_budget: None,
            blob_bytes: 0,
            blob_bytes_max: 0,
            budget_refusals: 0,
            queue: VecDeque::new(),
            deferred: VecDeque::new(),
            due: VecDeque::new(),
            parked: BTreeMap::new(),
            retired: BTreeMap::new(),
            released: VecDeque::new(),
            display: Display::default(),
            mem: None,
        }
    }

    /// Guest RAM, where 2D resources' backing lives (the virtio core passes what the
    /// transport sent; `None` drops it).
    pub fn set_guest_memory(&mut self, mem: Option<GuestMemoryMmap>) {
        self.mem = mem;
    }

    /// The scanouts (every one disabled).
    pub fn set_display(&mut self, config: DisplayConfig) {
        self.display.set_config(config);
    }

    /// Where flushed frames go.
    pub fn set_frame_sink(&mut self, sink: Box<dyn FrameSink>) {
        self.display.set_sink(sink);
    }

    /// Guest-physical ranges `(start, len)` never accepted as backing: the hostmem window
    /// (and, over vhost-user, the regions a frontend adds for its placements).
    pub fn set_backing_exclusions(&mut self, ranges: Vec<(u64, u64)>) {
        self.display.set_excluded(ranges);
    }

    /// The display state.
    pub fn display(&self) -> &Display {
        &self.display
    }

    /// The display state, mutably.
    pub fn display_mut(&mut self) -> &mut Display {
        &mut self.display
    }

    /// A cursor-queue command (no response: the chain goes back used with length 0). A
    /// refusal is logged (rate-limited) and counted ([`crate::display::DisplayStats`]).
    pub fn cursor(&mut self, request: &[u8]) {
        match Command::parse(request) {
            Ok(Command::UpdateCursor(c)) => self.display.cursor_command(&c, true),
            Ok(Command::MoveCursor(c)) => self.display.cursor_command(&c, false),
            Ok(other) => self.display.cursor_refused(
                ctrl_type_name(other.type_()),
                "not a cursor command (cursor queue)",
            ),
            Err(e) => self
                .display
                .cursor_refused("cursor command", &format!("cursor queue: {e}")),
        }
    }

    /// The fence a successful response to `request` needs: `(ctx, ring, fence_id)` when it
    /// is fenced and names a live context.
    fn fence_of(&self, request: &[u8], resp: &Response) -> Option<(u32, u32, u64)> {
        let hdr = CtrlHdr::parse(request).ok()?;
        if hdr.flags & VIRTIO_GPU_FLAG_FENCE == 0 || matches!(resp, Response::Err { .. }) {
            return None;
        }
        if !self.contexts.contains_key(&hdr.ctx_id) {
            return None;
        }
        let ring = if hdr.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX != 0 {
            u32::from(hdr.ring_idx)
        } else {
            0
        };
        Some((hdr.ctx_id, ring, hdr.fence_id))
    }

    /// Parks `resp` behind its fence, or queues it if the fence is signalled and nothing
    /// parked on its ring before it.
    fn fence_or_queue(&mut self, token: u64, (ctx, ring, id): (u32, u32, u64), resp: Vec<u8>) {
        let key = (ctx, ring);
        let behind = self.parked.get(&key).is_some_and(|q| !q.is_empty());
        match self.backend.create_fence(ctx, ring, id) {
            Ok(true) if !behind => self.queue.push_back(Queued::Ready(token, resp)),
            Ok(done) => {
                if done {
                    let r = self.retired.entry(key).or_default();
                    *r = (*r).max(id);
                }
                self.parked
                    .entry(key)
                    .or_default()
                    .push_back((id, token, resp));
            }
            Err(e) => {
                let hdr = CtrlHdr::parse(&resp).unwrap_or_default();
                let r = refused(
                    &hdr,
                    (ErrorCode::Unspec, format!("fence {id}: backend: {e}")),
                );
                self.queue.push_back(Queued::Ready(token, r.encode()));
            }
        }
    }

    /// Asks the backend which fences retired and releases the parked responses they free,
    /// in order per ring. Returns how many were released.
    pub fn poll_fences(&mut self) -> usize {
        for (ctx, ring, id) in self.backend.retire_fences() {
            let r = self.retired.entry((ctx, ring)).or_default();
            *r = (*r).max(id);
        }
        let mut n = 0;
        for (key, q) in self.parked.iter_mut() {
            let done = self.retired.get(key).copied().unwrap_or(0);
            while q.front().is_some_and(|(id, _, _)| *id <= done) {
                if let Some((_, token, resp)) = q.pop_front() {
                    self.released.push_back((token, resp));
                    n += 1;
                }
            }
        }
        self.parked.retain(|_, q| !q.is_empty());
        n
    }

    /// Responses parked behind fences that have not retired.
    pub fn parked(&self) -> usize {
        self.parked.values().map(VecDeque::len).sum()
    }

    /// The fds to poll while responses are parked ([`Backend::fence_fds`]); when there are
    /// parked responses and no fd, the caller polls [`Gpu::poll_fences`] on a short timer.
    pub fn fence_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        if self.parked.is_empty() {
            Vec::new()
        } else {
            self.backend.fence_fds()
        }
    }

    /// Releases a destroyed context's parked responses (its fences cannot retire now).
    fn release_context(&mut self, ctx_id: u32) {
        let keys: Vec<(u32, u32)> = self
            .parked
            .keys()
            .filter(|k| k.0 == ctx_id)
            .copied()
            .collect();
        for k in keys {
            if let Some(q) = self.parked.remove(&k) {
                self.released.extend(q.into_iter().map(|(_, t, r)| (t, r)));
            }
        }
        self.retired.retain(|k, _| k.0 != ctx_id);
    }

    /// [`Gpu::handle`]'s fence: waits (bounded by [`FENCE_WAIT`]) until it retired.
    fn wait_fence(&mut self, (ctx, ring, id): (u32, u32, u64)) -> Result<(), String> {
        if self
            .backend
            .create_fence(ctx, ring, id)
            .map_err(|e| e.to_string())?
        {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + FENCE_WAIT;
        loop {
            for (c, r, f) in self.backend.retire_fences() {
                let e = self.retired.entry((c, r)).or_default();
                *e = (*e).max(f);
            }
            if self.retired.get(&(ctx, ring)).is_some_and(|f| *f >= id) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "fence {id} on ring {ring} did not retire in {FENCE_WAIT:?}"
                ));
            }
            let fds = self.backend.fence_fds();
            let ms = if fds.is_empty() {
                1
            } else {
                left.as_millis().min(100) as u16
            };
            let mut pfds: Vec<nix::poll::PollFd<'_>> = fds
                .iter()
                .map(|fd| nix::poll::PollFd::new(*fd, nix::poll::PollFlags::POLLIN))
                .collect();
            let _ = nix::poll::poll(&mut pfds, nix::poll::PollTimeout::from(ms));
        }
    }

    /// Makes the placements of the maps announced so far ([`Placer::place_announced`]): the
    /// transport calls it when a run of chains is done, and everything that needs the
    /// mirror as the guest will see it (settling, unmaps, a synchronous map, a reset) calls
    /// it first.
    pub fn place_due(&mut self) {
        while let Some(d) = self.due.pop_front() {
            let backend = &self.backend;
            let via = |t: &FixedTarget<'_>| backend.map_fixed(d.id, &d.exported, t);
            let req = MapRequest {
                resource_id: d.id,
                offset: d.offset,
                len: d.len,
                blob: &d.exported,
                prot: Prot::READ_WRITE,
                map_info: d.exported.map_info,
                map_via: Some(MapVia(&via)),
            };
            self.placer.place_announced(d.ticket, &req);
        }
    }

    /// Bounds the bytes all live blobs hold together (`None`: no bound): a CREATE_BLOB past
    /// it is refused with `ERR_OUT_OF_MEMORY`. Whoever touches a blob's pages first is
    /// charged for them (the VMM when the guest writes it through BAR2, this process when
    /// the renderer does), so the bound is on the blobs' sizes, not on who touched what;
    /// the device is started with its memory limit as its budget.
    pub fn set_blob_budget(&mut self, bytes: Option<u64>) {
        self.blob_budget = bytes;
    }

    /// The blob memory budget, the bytes live blobs hold now and at most so far, and the
    /// CREATE_BLOBs refused at the budget.
    pub fn blob_memory(&self) -> BlobMemory {
        BlobMemory {
            budget: self.blob_budget,
            bytes: self.blob_bytes,
            bytes_max: self.blob_bytes_max,
            refused: self.budget_refusals,
        }
    }

    /// Lowers the blob limit (tests, small jails).
    pub fn set_max_blobs(&mut self, max: usize) {
        self.max_blobs = max;
    }

    /// The placer.
    pub fn placer(&self) -> &P {
        &self.placer
    }

    /// The placer, mutably.
    pub fn placer_mut(&mut self) -> &mut P {
        &mut self.placer
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// One blob.
    pub fn blob(&self, resource_id: u32) -> Option<BlobInfo> {
        self.blobs.get(&resource_id).copied()
    }

    /// Every blob, by resource id.
    pub fn blobs(&self) -> impl Iterator<Item = BlobInfo> + '_ {
        self.blobs.values().copied()
    }

    /// Mapped blobs as `(resource_id, offset, len)`, by resource id.
    pub fn mapped(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        self.blobs
            .values()
            .filter_map(|b| b.mapped_at.map(|off| (b.resource_id, off, b.size)))
    }

    /// Live context ids.
    pub fn contexts(&self) -> impl Iterator<Item = u32> + '_ {
        self.contexts.keys().copied()
    }

    /// Forgets every placement without calling the placer (the VMM side restarted and
    /// restored its window; the mirror must be restored by its owner). Blobs stay alive
    /// and can be mapped again. Returns how many placements were forgotten.
    pub fn reset_mappings(&mut self) -> usize {
        let mut n = 0;
        for b in self.blobs.values_mut() {
            if b.mapped_at.take().is_some() {
                n += 1;
            }
        }
        if n > 0 {
            log::info!("forgot {n} placements");
        }
        n
    }

    /// Device reset (the driver wrote status 0): settles every pipelined placement, drops
    /// the responses nobody will read, unmaps every mapped blob through the placer (so the
    /// VMM hears an `Unmap` for each), unrefs every blob and destroys every context. Failures
    /// are logged and counted, never fatal: the tables are empty afterwards whatever the
    /// backend or placer said.
    pub fn reset_all(&mut self) -> ResetSummary {
        let mut sum = ResetSummary::default();
        self.place_due();
        while self.in_flight() > 0 {
            self.settle_one();
        }
        sum.dropped_responses =
            self.queue.len() + self.deferred.len() + self.parked() + self.released.len();
        self.queue.clear();
        self.deferred.clear();
        self.parked.clear();
        self.retired.clear();
        self.released.clear();
        let mapped: Vec<(u32, u64, u64)> = self.mapped().collect();
        for (id, offset, len) in mapped {
            match self.placer.unmap(id, offset, len) {
                Ok(()) => sum.unmapped += 1,
                Err(e) => {
                    log::warn!("reset: unmap of resource {id} at {offset:#x} failed: {e}");
                    sum.failures += 1;
                }
            }
        }
        let ids: Vec<u32> = self.blobs.keys().copied().collect();
        for id in ids {
            match self.backend.unref(id) {
                Ok(()) => sum.blobs += 1,
                Err(e) => {
                    log::warn!("reset: unref of resource {id} failed: {e}");
                    sum.failures += 1;
                }
            }
        }
        self.blobs.clear();
        self.blob_bytes = 0;
        let resources_2d = self.display.reset();
        let ctxs: Vec<u32> = self.contexts.keys().copied().collect();
        for ctx in ctxs {
            match self.backend.destroy_context(ctx) {
                Ok(()) => sum.contexts += 1,
                Err(e) => {
                    log::warn!("reset: destroying context {ctx} failed: {e}");
                    sum.failures += 1;
                }
            }
        }
        self.contexts.clear();
        log::info!(
            "reset: {} unmapped, {} blobs, {resources_2d} 2D resources and {} contexts dropped, {} responses discarded, {} failures",
            sum.unmapped,
            sum.blobs,
            sum.contexts,
            sum.dropped_responses,
            sum.failures
        );
        sum
    }

    /// Handles one command and returns the response bytes. Never panics.
    pub fn handle(&mut self, request: &[u8]) -> Vec<u8> {
        self.handle_command(request).encode()
    }

    /// [`Gpu::handle`], returning the decoded response.
    pub fn handle_command(&mut self, request: &[u8]) -> Response {
        let hdr = match CtrlHdr::parse(request) {
            Ok(h) => h,
            Err(e) => {
                COMMAND_WARNINGS.warn(
                    "unparsable command",
                    format_args!("control command refused: {e}"),
                );
                return Response::Err {
                    hdr: CtrlHdr::new(VIRTIO_GPU_RESP_ERR_UNSPEC),
                    code: ErrorCode::Unspec,
                };
            }
        };
        let cmd = match Command::parse(request) {
            Ok(c) => c,
            Err(e) => {
                let code = match e {
                    WireError::BadLength(_) => ErrorCode::InvalidParameter,
                    WireError::Truncated { .. } | WireError::UnknownType(_) => ErrorCode::Unspec,
                };
                COMMAND_WARNINGS.warn(
                    ctrl_type_name(hdr.type_),
                    format_args!(
                        "{} ({:#06x}) ctx {}: {code}: {e}",
                        ctrl_type_name(hdr.type_),
                        hdr.type_,
                        hdr.ctx_id
                    ),
                );
                return Response::error_for(&hdr, code);
            }
        };
        let resp = self.run(&hdr, &cmd);
        match self.fence_of(request, &resp) {
            Some(f) => match self.wait_fence(f) {
                Ok(()) => resp,
                Err(why) => refused(&hdr, (ErrorCode::Unspec, why)),
            },
            None => resp,
        }
    }

    /// Checks the fence ring, then dispatches.
    fn run(&mut self, hdr: &CtrlHdr, cmd: &Command) -> Response {
        if hdr.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX != 0 && hdr.ring_idx >= MAX_RINGS {
            let why = format!("fence ring {} (rings are 0..{MAX_RINGS})", hdr.ring_idx);
            return refused(hdr, (ErrorCode::InvalidParameter, why));
        }
        match self.dispatch(cmd) {
            Ok(r) => r,
            Err(refusal) => refused(hdr, refusal),
        }
    }

    /// [`Gpu::handle_command`] without waiting for the command's fence: the response and the
    /// fence it needs.
    fn handle_unfenced(&mut self, request: &[u8]) -> (Response, Option<(u32, u32, u64)>) {
        let (hdr, cmd) = match (CtrlHdr::parse(request), Command::parse(request)) {
            (Ok(h), Ok(c)) => (h, c),
            // Malformed: the synchronous path's answer (never fenced).
            _ => return (self.handle_command(request), None),
        };
        let resp = self.run(&hdr, &cmd);
        let fence = self.fence_of(request, &resp);
        (resp, fence)
    }

    /// Handles a command as part of a pipeline (the device's command loop): MAP_BLOB,
    /// UNMAP_BLOB and UNREF of a mapped blob, for a resource with nothing in flight, only
    /// start their placement, whose verdict [`Gpu::finish_one`] settles; any other command
    /// needs everything before it settled, so no command sees a half-done placement and
    /// responses keep command order. A synchronous placer is waited for here; with
    /// [`Placer::verdicts_async`] the command waits (with everything after it) until
    /// [`Gpu::finish_one`] settled what was before it. Responses come out of
    /// [`Gpu::take_ready`] with their `token`.
    pub fn submit(&mut self, token: u64, request: &[u8]) {
        if !self.deferred.is_empty() || !self.start(token, request) {
            self.deferred.push_back((token, request.to_vec()));
        }
    }

    /// Starts (or answers) one command; false when it must wait for the placements before
    /// it (asynchronous verdicts only).
    fn start(&mut self, token: u64, request: &[u8]) -> bool {
        match Command::parse(request) {
            Ok(Command::ResourceMapBlob(c)) if !self.in_flight_for(c.resource_id) => {
                let q = match self.map_blob_begin(&c, true) {
                    Ok((map_info, Some(ticket))) => Queued::Map {
                        token,
                        ticket,
                        hdr: c.hdr,
                        id: c.resource_id,
                        map_info,
                    },
                    Ok((map_info, None)) => Queued::Ready(token, map_ok(&c.hdr, map_info)),
                    Err(r) => Queued::Ready(token, refused(&c.hdr, r).encode()),
                };
                self.queue.push_back(q);
            }
            Ok(Command::ResourceUnmapBlob(c)) if !self.in_flight_for(c.resource_id) => {
                let q = match self.unmap_blob_begin(c.resource_id, true) {
                    Ok((offset, Some(ticket))) => Queued::Unmap {
                        token,
                        ticket,
                        hdr: c.hdr,
                        id: c.resource_id,
                        offset,
                    },
                    Ok((_, None)) => Queued::Ready(token, ok(&c.hdr).encode()),
                    Err(r) => Queued::Ready(token, refused(&c.hdr, r).encode()),
                };
                self.queue.push_back(q);
            }
            Ok(Command::ResourceUnref(c))
                if !self.in_flight_for(c.resource_id)
                    && self
                        .blobs
                        .get(&c.resource_id)
                        .is_some_and(|b| b.mapped_at.is_some()) =>
            {
                let q = match self.unmap_blob_begin(c.resource_id, true) {
                    Ok((offset, Some(ticket))) => Queued::Unref {
                        token,
                        ticket,
                        hdr: c.hdr,
                        id: c.resource_id,
                        offset,
                    },
                    Ok((_, None)) => {
                        Queued::Ready(token, self.unref_response(&c.hdr, c.resource_id))
                    }
                    Err(r) => Queued::Ready(token, refused(&c.hdr, r).encode()),
                };
                self.queue.push_back(q);
            }
            _ => {
                if self.in_flight() > 0 {
                    if self.placer.verdicts_async() {
                        return false;
                    }
                    while self.in_flight() > 0 {
                        self.settle_one();
                    }
                }
                let (r, fence) = self.handle_unfenced(request);
                match fence {
                    Some(f) => self.fence_or_queue(token, f, r.encode()),
                    None => self.queue.push_back(Queued::Ready(token, r.encode())),
                }
            }
        }
        true
    }

    /// The UNREF of a blob that is no longer mapped, as a response.
    fn unref_response(&mut self, hdr: &CtrlHdr, id: u32) -> Vec<u8> {
        match self.unref(id) {
            Ok(()) => ok(hdr).encode(),
            Err(r) => refused(hdr, r).encode(),
        }
    }

    /// Commands waiting behind an unsettled placement ([`Placer::verdicts_async`]).
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// Pipelined commands waiting for the placer's verdict.
    pub fn in_flight(&self) -> usize {
        self.queue
            .iter()
            .filter(|q| !matches!(q, Queued::Ready(..)))
            .count()
    }

    fn in_flight_for(&self, resource_id: u32) -> bool {
        self.queue.iter().any(|q| {
            matches!(q, Queued::Map { id, .. } | Queued::Unmap { id, .. } | Queued::Unref { id, .. }
                if *id == resource_id)
        })
    }

    /// Waits for the verdict of the oldest pipelined placement and settles its command: on
    /// a refusal the blob is back in its state before the command (the placer undid its
    /// own part) and the response is the error. Then starts the commands that waited for
    /// it ([`Gpu::deferred`]). No-op when nothing is in flight.
    pub fn finish_one(&mut self) {
        self.settle_one();
        while let Some((token, request)) = self.deferred.pop_front() {
            if !self.start(token, &request) {
                self.deferred.push_front((token, request));
                break;
            }
        }
    }

    /// [`Gpu::finish_one`], then again for every following operation whose verdict is
    /// already in ([`Placer::next_verdict_ready`]): a run of verdicts that came together
    /// is settled together, so its responses reach the used ring, and the driver's
    /// interrupt, together.
    pub fn finish_ready(&mut self) {
        self.finish_one();
        while self.in_flight() > 0 && self.placer.next_verdict_ready() {
            self.finish_one();
        }
    }

    /// [`Gpu::finish_one`] without starting deferred commands.
    fn settle_one(&mut self) {
        self.place_due();
        let Some(i) = self
            .queue
            .iter()
            .position(|q| !matches!(q, Queued::Ready(..)))
        else {
            return;
        };
        let verdict = self.placer.finish_next();
        let Some(q) = self.queue.get(i) else { return };
        let settled = match *q {
            Queued::Ready(..) => return,
            Queued::Map {
                token,
                ticket,
                hdr,
                id,
                map_info,
            } => match check_ticket(verdict, ticket) {
                Ok(()) => Queued::Ready(token, map_ok(&hdr, map_info)),
                Err(e) => {
                    if let Some(b) = self.blobs.get_mut(&id) {
                        b.mapped_at = None;
                    }
                    Queued::Ready(token, refused(&hdr, place_refusal(e)).encode())
                }
            },
            Queued::Unmap {
                token,
                ticket,
                hdr,
                id,
                offset,
            } => match check_ticket(verdict, ticket) {
                Ok(()) => Queued::Ready(token, ok(&hdr).encode()),
                Err(e) => {
                    // As in the synchronous path: the blob still counts as mapped.
                    if let Some(b) = self.blobs.get_mut(&id) {
                        b.mapped_at = Some(offset);
                    }
                    Queued::Ready(token, refused(&hdr, place_refusal(e)).encode())
                }
            },
            Queued::Unref {
                token,
                ticket,
                hdr,
                id,
                offset,
            } => match check_ticket(verdict, ticket) {
                Ok(()) => Queued::Ready(token, self.unref_response(&hdr, id)),
                Err(e) => {
                    // Nothing is unref'd when the unmap fails (as in `unref`).
                    if let Some(b) = self.blobs.get_mut(&id) {
                        b.mapped_at = Some(offset);
                    }
                    Queued::Ready(token, refused(&hdr, place_refusal(e)).encode())
                }
            },
        };
        if let Some(q) = self.queue.get_mut(i) {
            *q = settled;
        }
    }

    /// The responses that can go out now, in command order, with their tokens.
    pub fn take_ready(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = self.released.drain(..).collect();
        while let Some(Queued::Ready(..)) = self.queue.front() {
            if let Some(Queued::Ready(token, r)) = self.queue.pop_front() {
                out.push((token, r));
            }
        }
        out
    }

    fn dispatch(&mut self, cmd: &Command) -> Result<Response, Refusal> {
        let hdr = cmd.hdr();
        match cmd {
            Command::ResourceCreateBlob(c) => self.create_blob(c).map(|()| ok(hdr)),
            Command::ResourceMapBlob(c) => {
                let map_info = self.map_blob(c)?;
                Ok(Response::OkMapInfo {
                    hdr: hdr.response(crate::wire::VIRTIO_GPU_RESP_OK_MAP_INFO),
                    map_info,
                })
            }
            Command::ResourceUnmapBlob(c) => self.unmap_blob(c.resource_id).map(|()| ok(hdr)),
            Command::ResourceUnref(c) => self.unref(c.resource_id).map(|()| ok(hdr)),
            Command::CtxCreate(c) => self.ctx_create(c).map(|()| ok(hdr)),
            Command::CtxDestroy(h) => self.ctx_destroy(h.ctx_id).map(|()| ok(hdr)),
            Command::Submit3d(c) => {
                let reply = self.submit_3d(c)?;
                Ok(Response::ok_for(hdr, reply))
            }
            Command::GetCapsetInfo(c) => self.capset_info(c),
            Command::GetCapset(c) => self.capset(c),
            Command::GetDisplayInfo(h) => Ok(self.display.display_info(h)),
            Command::CtxAttachResource(c) | Command::CtxDetachResource(c) => {
                self.ctx_resource(c).map(|()| ok(hdr))
            }
            Command::GetEdid(c) => self.display.edid(c),
            Command::ResourceCreate2d(c) => self.create_2d(c).map(|()| ok(hdr)),
            Command::ResourceAttachBacking(c) => self
                .display
                .attach_backing(c, self.mem.as_ref())
                .map(|()| ok(hdr)),
            Command::ResourceDetachBacking(c) => {
                self.display.detach_backing(c.resource_id).map(|()| ok(hdr))
            }
            Command::TransferToHost2d(c) => self
                .display
                .transfer_to_host_2d(c, self.mem.as_ref())
                .map(|()| ok(hdr)),
            Command::SetScanout(c) => {
                let blob = self.blobs.contains_key(&c.resource_id);
                self.display.set_scanout(c, blob).map(|()| ok(hdr))
            }
            Command::SetScanoutBlob(c) => self.set_scanout_blob(c).map(|()| ok(hdr)),
            Command::ResourceFlush(c) => {
                let blob = self.blobs.contains_key(&c.resource_id);
                self.display.flush(c, blob).map(|()| ok(hdr))
            }
            Command::ResourceAssignUuid(c) => {
                let blob = self.blobs.contains_key(&c.resource_id);
                self.display.assign_uuid(hdr, c.resource_id, blob)
            }
            Command::UpdateCursor(_) | Command::MoveCursor(_) => refuse(
                ErrorCode::Unspec,
                "a cursor command belongs on the cursor queue",
            ),
        }
    }

    /// `RESOURCE_CREATE_2D`: the display's checks, then the memory budget shared with the
    /// blobs ([`Gpu::set_blob_budget`]).
    fn create_2d(&mut self, c: &ResourceCreate2d) -> Result<(), Refusal> {
        let blob = self.blobs.contains_key(&c.resource_id);
        let bytes = match self.display.check_create_2d(c, blob) {
            Ok(b) => b,
            Err(r) => {
                if r.0 == ErrorCode::OutOfMemory {
                    self.display.note_budget_refusal();
                }
                return Err(r);
            }
        };
        let live = self.blob_bytes.saturating_add(self.display.bytes());
        if let Some(budget) = self.blob_budget.filter(|b| live.saturating_add(bytes) > *b) {
            self.budget_refusals += 1;
            self.display.note_budget_refusal();
            return refuse(
                ErrorCode::OutOfMemory,
                format!("memory budget: {live} bytes live + {bytes} > {budget}"),
            );
        }
        self.display.create_2d(c, bytes)
    }

    /// `SET_SCANOUT_BLOB`: the blob's size from the table, its export from the backend.
    fn set_scanout_blob(&mut self, c: &SetScanoutBlob) -> Result<(), Refusal> {
        let blob = self.blobs.get(&c.resource_id).map(|b| BlobRef {
            resource_id: b.resource_id,
            size: b.size,
        });
        let backend = &mut self.backend;
        let id = c.resource_id;
        self.display
            .set_scanout_blob(c, blob, || backend.export_blob(id).map_err(backend_refusal))
    }

    /// `CTX_ATTACH_RESOURCE` / `CTX_DETACH_RESOURCE`: checks only (see the module docs).
    fn ctx_resource(&self, c: &ResourceCmd) -> Result<(), Refusal> {
        let ctx_id = c.hdr.ctx_id;
        if !self.contexts.contains_key(&ctx_id) {
            return refuse(ErrorCode::InvalidContextId, format!("no context {ctx_id}"));
        }
        if !self.blobs.contains_key(&c.resource_id) && !self.display.has_resource(c.resource_id) {
            return refuse(
                ErrorCode::InvalidResourceId,
                format!("no resource {}", c.resource_id),
            );
        }
        Ok(())
    }

    fn create_blob(&mut self, c: &ResourceCreateBlob) -> Result<(), Refusal> {
        let id = c.resource_id;
        let ctx_id = c.hdr.ctx_id;
        if id == 0 {
            return refuse(ErrorCode::InvalidResourceId, "resource id 0");
        }
        if self.blobs.contains_key(&id) || self.display.has_resource(id) {
            return refuse(
                ErrorCode::InvalidResourceId,
                format!("resource {id} exists"),
            );
        }
        match c.blob_mem {
            VIRTIO_GPU_BLOB_MEM_GUEST => {
                if c.entries.len() > MAX_MEM_ENTRIES {
                    return refuse(
                        ErrorCode::InvalidParameter,
                        format!("{} mem entries > {MAX_MEM_ENTRIES}", c.entries.len()),
                    );
                }
            }
            VIRTIO_GPU_BLOB_MEM_HOST3D => {
                if !c.entries.is_empty() {
                    return refuse(
                        ErrorCode::InvalidParameter,
                        format!("HOST3D blob with {} mem entries", c.entries.len()),
                    );
                }
                if ctx_id == 0 {
                    return refuse(ErrorCode::InvalidContextId, "HOST3D blob needs a context");
                }
            }
            other => {
                return refuse(
                    ErrorCode::InvalidParameter,
                    format!("blob_mem {other} not supported (GUEST or HOST3D only)"),
                )
            }
        }
        if c.blob_flags & !VIRTIO_GPU_BLOB_FLAGS_ALL != 0 {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("unknown blob flags {:#x}", c.blob_flags),
            );
        }
        let window = self.placer.window_size();
        if c.size == 0 || !is_page_aligned(c.size) || c.size > window {
            return refuse(
                ErrorCode::InvalidParameter,
                format!(
                    "size {:#x}: must be non-zero, page-aligned and at most the window ({window:#x})",
                    c.size
                ),
            );
        }
        if ctx_id != 0 && !self.contexts.contains_key(&ctx_id) {
            return refuse(ErrorCode::InvalidContextId, format!("no context {ctx_id}"));
        }
        if self.blobs.len() >= self.max_blobs {
            return refuse(
                ErrorCode::OutOfMemory,
                format!("{} blobs: limit reached", self.blobs.len()),
            );
        }
        let after = self.blob_bytes.saturating_add(c.size);
        let live = after.saturating_add(self.display.bytes());
        if let Some(budget) = self.blob_budget.filter(|b| live > *b) {
            self.budget_refusals += 1;
            return refuse(
                ErrorCode::OutOfMemory,
                format!(
                    "memory budget: {} blob + {} 2D bytes live + {} > {budget}",
                    self.blob_bytes,
                    self.display.bytes(),
                    c.size
                ),
            );
        }
        self.backend
            .create_blob(&BlobCreate {
                ctx_id,
                resource_id: id,
                blob_mem: c.blob_mem,
                blob_flags: c.blob_flags,
                blob_id: c.blob_id,
                size: c.size,
            })
            .map_err(backend_refusal)?;
        self.blobs.insert(
            id,
            BlobInfo {
                resource_id: id,
                ctx_id,
                blob_mem: c.blob_mem,
                blob_flags: c.blob_flags,
                size: c.size,
                mapped_at: None,
            },
        );
        self.blob_bytes = after;
        self.blob_bytes_max = self.blob_bytes_max.max(after);
        log::debug!("resource {id}: created {:#x} bytes in ctx {ctx_id}", c.size);
        Ok(())
    }

    fn map_blob(&mut self, c: &ResourceMapBlob) -> Result<u32, Refusal> {
        self.map_blob_begin(c, false).map(|(map_info, _)| map_info)
    }

    /// MAP_BLOB up to the placer: synchronously, or (`pipelined`) only started, with the
    /// ticket of its verdict.
    fn map_blob_begin(
        &mut self,
        c: &ResourceMapBlob,
        pipelined: bool,
    ) -> Result<(u32, Option<u64>), Refusal> {
        if !pipelined {
            self.place_due();
        }
        let id = c.resource_id;
        let blob = match self.blobs.get(&id) {
            Some(b) => *b,
            None => return refuse(ErrorCode::InvalidResourceId, format!("no resource {id}")),
        };
        if blob.blob_flags & VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE == 0 {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("resource {id} is not MAPPABLE"),
            );
        }
        if let Some(at) = blob.mapped_at {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("resource {id} is already mapped at {at:#x}"),
            );
        }
        let offset = c.offset;
        if !is_page_aligned(offset) {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("offset {offset:#x} is not page-aligned"),
            );
        }
        let window = self.placer.window_size();
        let end = match offset.checked_add(blob.size) {
            Some(end) if end <= window => end,
            _ => {
                return refuse(
                    ErrorCode::InvalidParameter,
                    format!(
                        "{offset:#x}+{:#x} is outside the window of {window:#x} bytes",
                        blob.size
                    ),
                )
            }
        };
        if let Some((other, o_off, o_len)) = self
            .mapped()
            .find(|&(_, o_off, o_len)| o_off < end && offset < o_off + o_len)
        {
            return refuse(
                ErrorCode::InvalidParameter,
                format!(
                    "{offset:#x}+{:#x} overlaps resource {other} at {o_off:#x}+{o_len:#x}",
                    blob.size
                ),
            );
        }
        let exported = self.backend.export_blob(id).map_err(backend_refusal)?;
        if exported.size < blob.size {
            return refuse(
                ErrorCode::Unspec,
                format!(
                    "backend exported {:#x} bytes for a blob of {:#x}",
                    exported.size, blob.size
                ),
            );
        }
        let backend = &self.backend;
        let via = |t: &FixedTarget<'_>| backend.map_fixed(id, &exported, t);
        let req = MapRequest {
            resource_id: id,
            offset,
            len: blob.size,
            blob: &exported,
            prot: Prot::READ_WRITE,
            map_info: exported.map_info,
            map_via: Some(MapVia(&via)),
        };
        let announce = pipelined && self.placer.announces();
        let ticket = if announce {
            self.placer.announce_map(&req).map(Some)
        } else if pipelined {
            self.placer.begin_map(&req)
        } else {
            self.placer.map(&req).map(|()| None)
        }
        .map_err(place_refusal)?;
        let map_info = exported.map_info;
        if let (true, Some(ticket)) = (announce, ticket) {
            self.due.push_back(Due {
                ticket,
                id,
                offset,
                len: blob.size,
                exported,
            });
        }
        if let Some(b) = self.blobs.get_mut(&id) {
            b.mapped_at = Some(offset);
        }
        log::debug!("resource {id}: mapped at {offset:#x}+{:#x}", blob.size);
        Ok((map_info, ticket))
    }

    fn unmap_blob(&mut self, id: u32) -> Result<(), Refusal> {
        self.unmap_blob_begin(id, false).map(drop)
    }

    /// UNMAP_BLOB up to the placer (see [`Gpu::map_blob_begin`]); returns the offset the
    /// blob was mapped at and the ticket.
    fn unmap_blob_begin(
        &mut self,
        id: u32,
        pipelined: bool,
    ) -> Result<(u64, Option<u64>), Refusal> {
        // The restore must follow the placement of anything announced (this blob's own).
        self.place_due();
        let blob = match self.blobs.get(&id) {
            Some(b) => *b,
            None => return refuse(ErrorCode::InvalidResourceId, format!("no resource {id}")),
        };
        let Some(offset) = blob.mapped_at else {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("resource {id} is not mapped"),
            );
        };
        let ticket = if pipelined {
            self.placer.begin_unmap(id, offset, blob.size)
        } else {
            self.placer.unmap(id, offset, blob.size).map(|()| None)
        }
        .map_err(place_refusal)?;
        if let Some(b) = self.blobs.get_mut(&id) {
            b.mapped_at = None;
        }
        log::debug!("resource {id}: unmapped from {offset:#x}");
        Ok((offset, ticket))
    }

    fn unref(&mut self, id: u32) -> Result<(), Refusal> {
        if self.display.unref(id) {
            return Ok(());
        }
        let blob = match self.blobs.get(&id) {
            Some(b) => *b,
            None => return refuse(ErrorCode::InvalidResourceId, format!("no resource {id}")),
        };
        if blob.mapped_at.is_some() {
            self.unmap_blob(id)?;
        }
        self.backend.unref(id).map_err(backend_refusal)?;
        if let Some(b) = self.blobs.remove(&id) {
            self.blob_bytes = self.blob_bytes.saturating_sub(b.size);
        }
        self.display.forget(id);
        log::debug!("resource {id}: unref'd");
        Ok(())
    }

    fn ctx_create(&mut self, c: &CtxCreate) -> Result<(), Refusal> {
        let ctx_id = c.hdr.ctx_id;
        if ctx_id == 0 {
            return refuse(ErrorCode::InvalidContextId, "context id 0");
        }
        if self.contexts.contains_key(&ctx_id) {
            return refuse(
                ErrorCode::InvalidContextId,
                format!("context {ctx_id} exists"),
            );
        }
        let capset_id = c.capset_id();
        if capset_id != 0 && !self.backend.capsets().iter().any(|i| i.id == capset_id) {
            return refuse(
                ErrorCode::InvalidParameter,
                format!(
                    "capset {capset_id} not offered by backend {}",
                    self.backend.name()
                ),
            );
        }
        if self.contexts.len() >= MAX_CONTEXTS {
            return refuse(ErrorCode::OutOfMemory, "context limit reached");
        }
        self.backend
            .create_context(ctx_id, capset_id, &c.debug_name)
            .map_err(ctx_refusal)?;
        self.contexts.insert(ctx_id, capset_id);
        Ok(())
    }

    fn ctx_destroy(&mut self, ctx_id: u32) -> Result<(), Refusal> {
        if !self.contexts.contains_key(&ctx_id) {
            return refuse(ErrorCode::InvalidContextId, format!("no context {ctx_id}"));
        }
        self.backend.destroy_context(ctx_id).map_err(ctx_refusal)?;
        self.contexts.remove(&ctx_id);
        self.release_context(ctx_id);
        Ok(())
    }

    fn submit_3d(&mut self, c: &Submit3d) -> Result<Vec<u8>, Refusal> {
        let ctx_id = c.hdr.ctx_id;
        if !self.contexts.contains_key(&ctx_id) {
            return refuse(ErrorCode::InvalidContextId, format!("no context {ctx_id}"));
        }
        self.backend
            .submit_3d(ctx_id, &c.stream)
            .map_err(|e| match e {
                BackendError::InvalidId(_) => {
                    (ErrorCode::InvalidContextId, format!("backend: {e}"))
                }
                other => backend_refusal(other),
            })
    }

    fn capset_info(&mut self, c: &GetCapsetInfo) -> Result<Response, Refusal> {
        let caps = self.backend.capsets();
        let Some(info) = caps.get(c.capset_index as usize) else {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("capset index {} of {}", c.capset_index, caps.len()),
            );
        };
        Ok(Response::OkCapsetInfo {
            hdr: c.hdr.response(crate::wire::VIRTIO_GPU_RESP_OK_CAPSET_INFO),
            capset_id: info.id,
            capset_max_version: info.max_version,
            capset_max_size: info.max_size,
        })
    }

    fn capset(&mut self, c: &GetCapset) -> Result<Response, Refusal> {
        let known = self
            .backend
            .capsets()
            .iter()
            .any(|i| i.id == c.capset_id && c.capset_version <= i.max_version);
        if !known {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("no capset {} version {}", c.capset_id, c.capset_version),
            );
        }
        let data = self
            .backend
            .capset(c.capset_id, c.capset_version)
            .map_err(backend_refusal)?;
        Ok(Response::OkCapset {
            hdr: c.hdr.response(crate::wire::VIRTIO_GPU_RESP_OK_CAPSET),
            data,
        })
    }
}

fn ok(hdr: &CtrlHdr) -> Response {
    Response::ok_for(hdr, Vec::new())
}

fn map_ok(hdr: &CtrlHdr, map_info: u32) -> Vec<u8> {
    Response::OkMapInfo {
        hdr: hdr.response(crate::wire::VIRTIO_GPU_RESP_OK_MAP_INFO),
        map_info,
    }
    .encode()
}

/// The device's blob memory ([`Gpu::blob_memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobMemory {
    /// The budget (`None`: none).
    pub budget: Option<u64>,
    /// Bytes of live blobs now.
    pub bytes: u64,
    /// Most bytes of live blobs at once.
    pub bytes_max: u64,
    /// CREATE_BLOBs refused at the budget.
    pub refused: u64,
}

/// Refused commands, by command: the guest can send as many bad ones as it likes, so each
/// kind is logged the 1st, 2nd, 4th, … time and counted (the counts go to the VMM with the
/// virtqueue stats). One per device process.
pub static COMMAND_WARNINGS: LogLimiter = LogLimiter::new("hostmem_device::gpu");

/// The error response for a refused command, logged (rate-limited) with the reason.
fn refused(hdr: &CtrlHdr, (code, reason): Refusal) -> Response {
    let name = ctrl_type_name(hdr.type_);
    COMMAND_WARNINGS.warn(
        name,
        format_args!("{name} ctx {}: {code}: {reason}", hdr.ctx_id),
    );
    Response::error_for(hdr, code)
}

/// The placer's verdict for `ticket` (it answers in order; anything else is a placer bug,
/// refused rather than trusted).
fn check_ticket(
    verdict: Option<(u64, Result<(), PlaceError>)>,
    ticket: u64,
) -> Result<(), PlaceError> {
    match verdict {
        Some((t, r)) if t == ticket => r,
        Some((t, _)) => Err(PlaceError::Unspec(format!(
            "placer answered event {t}, expected {ticket}"
        ))),
        None => Err(PlaceError::Unspec(format!("placer lost event {ticket}"))),
    }
}
