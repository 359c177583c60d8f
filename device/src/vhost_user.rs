//! vhost-user backend mode (`hostmem-gpu-device --vhost-user --socket-fd N`): the same
//! device core ([`VirtioGpu`] over [`Gpu`]) served to any vhost-user frontend (QEMU's
//! `vhost-user-test-device-pci`, our own VMM's `hostmem run --transport vhost-user`).
//!
//! # One thread
//!
//! The device stays single-threaded under seccomp (no `clone` in its policy): instead of
//! `vhost-user-backend`'s daemon, which spawns a worker thread per queue, the poll loop
//! ([`serve_connection`]) drives `vhost`'s [`BackendReqHandler`] itself. It polls the
//! frontend's socket and the queues' kick eventfds; a readable socket is one
//! `handle_request`, a kick serves its queue. The backend channel's requests
//! (`SHMEM_MAP`/`SHMEM_UNMAP`) are sent from inside the command handler and wait for the
//! frontend's ack there.
//!
//! # Messages
//!
//! * Virtio features offered: `VERSION_1`, `RING_EVENT_IDX`, `VIRGL`, `RESOURCE_BLOB`,
//!   `CONTEXT_INIT`, plus `VHOST_USER_F_PROTOCOL_FEATURES` ([`OFFERED_FEATURES`]).
//! * Protocol features ([`protocol_features`]): `MQ` (`GET_QUEUE_NUM` = 2), `REPLY_ACK`,
//!   `BACKEND_REQ`, `BACKEND_SEND_FD`, `CONFIG` (`GET_CONFIG` answers
//!   `struct virtio_gpu_config`, 16 bytes, with `num_capsets`; bytes past it read 0),
//!   `SHMEM` (`GET_SHMEM_CONFIG`: one region, id [`SHMEM_ID`] = 1, `memory_sizes[1]` = the
//!   window size, as QEMU indexes the array by shmid), `CONFIGURE_MEM_SLOTS`
//!   (`ADD_MEM_REG`/`REM_MEM_REG`, [`MAX_MEM_SLOTS`]) and `RESET_DEVICE`.
//! * Guest memory: `SET_MEM_TABLE` / `ADD_MEM_REG` regions, each with its fd (a message
//!   whose fd count differs from its region count is refused by `vhost` and the connection
//!   is closed). Ring addresses arrive as frontend virtual addresses and are translated
//!   through the regions' `user_addr`. The memory the queues run on is taken when the first
//!   queue starts; regions added while queues run (QEMU adds one per `SHMEM_MAP`, since the
//!   mapping is fd-backed RAM in the guest's address space) are recorded, not applied: the
//!   rings and command buffers live in guest RAM that was there before.
//! * A queue starts when it has a size, ring addresses, kick and call eventfds and is
//!   enabled (`SET_VRING_ENABLE`, or at the kick when `PROTOCOL_FEATURES` was not acked).
//!   `SET_VRING_BASE` must be 0 (a fresh ring). `GET_VRING_BASE` stops the device: the
//!   core resets (it has no per-queue stop) and the answer is the queue's next avail index.
//!
//! # Placement
//!
//! A vhost-user frontend owns the shared memory region; the device has no mirror of it.
//! [`ShmemPlacer`] is the [`Placer`] of this mode: `map` sends
//! `SHMEM_MAP { shmid 1, shm_offset, len, fd_offset, flags: WRITABLE }` with the blob's fd
//! on the backend channel and waits for the ack (`REPLY_ACK`); a refusal (non-zero ack,
//! broken channel, no channel) fails the guest's command with `ERR_UNSPEC`. `unmap` sends
//! `SHMEM_UNMAP` likewise. The command handler ([`Gpu`]) is unchanged: it checked the offset,
//! the size and overlaps before the placer is asked.
//!
//! # Reset and disconnect
//!
//! Resets the frontend starts (`RESET_DEVICE`, `RESET_OWNER`, `GET_VRING_BASE`, a closed
//! socket) drop every blob and context locally without `SHMEM_UNMAP`: the frontend is
//! waiting for our reply on the main socket at that moment and would not read the backend
//! channel (a deadlock), and a frontend resets its own region with the device. When the
//! frontend disconnects the device resets and [`serve_listener`] accepts the next
//! connection on the listening socket, with a fresh backend.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hostmem_base::mmap::{is_page_aligned, Prot};
use hostmem_ipc::protocol::QueueSetup;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMMap, VhostUserMMapFlags, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as Channel, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut, VhostUserFrontendReqHandler,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use crate::backend::Backend;
use crate::gpu::{Gpu, MapRequest, PlaceError, Placer};
use crate::virtio::{GuestMemoryMmap, VirtioGpu, NUM_QUEUES, QUEUE_MAX_SIZE};
use crate::{Error, Result};

/// The shared memory region's id: virtio-gpu's host-visible region.
pub const SHMEM_ID: u8 = 1;
/// Default size of the shared memory region (a power of two: QEMU makes it a PCI BAR).
pub const DEFAULT_SHMEM_SIZE: u64 = 256 << 20;
/// Memory slots offered with `CONFIGURE_MEM_SLOTS` (QEMU's x86 maximum).
pub const MAX_MEM_SLOTS: u64 = 509;
/// `sizeof(struct virtio_gpu_config)`: events_read, events_clear, num_scanouts,
/// num_capsets. QEMU's `vhost-user-test-device-pci` wants `config_size=16`.
pub const CONFIG_SIZE: usize = 16;
/// Largest config read answered (QEMU's `VHOST_USER_MAX_CONFIG_SIZE`).
const MAX_CONFIG_READ: usize = 256;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_RING_EVENT_IDX`.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_GPU_F_VIRGL`.
pub const VIRTIO_GPU_F_VIRGL: u64 = 1 << 0;
/// `VIRTIO_GPU_F_RESOURCE_BLOB`.
pub const VIRTIO_GPU_F_RESOURCE_BLOB: u64 = 1 << 3;
/// `VIRTIO_GPU_F_CONTEXT_INIT`.
pub const VIRTIO_GPU_F_CONTEXT_INIT: u64 = 1 << 4;
/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// The virtio features the backend offers.
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_RING_EVENT_IDX
    | VIRTIO_GPU_F_VIRGL
    | VIRTIO_GPU_F_RESOURCE_BLOB
    | VIRTIO_GPU_F_CONTEXT_INIT
    | VHOST_USER_F_PROTOCOL_FEATURES;

/// The protocol features the backend offers (`vhost` adds `REPLY_ACK` itself too).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::SHMEM
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// How the backend serves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Renderer backend name (`shm`, `virgl`).
    pub backend: String,
    /// The backend's test ops.
    pub test_ops: bool,
    /// Size of shared memory region 1 (page-aligned).
    pub shmem_size: u64,
    /// Stop after this many connections (tests); `None`: serve forever.
    pub max_connections: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backend: "shm".into(),
            test_ops: false,
            shmem_size: DEFAULT_SHMEM_SIZE,
            max_connections: None,
        }
    }
}

/// Counters of the backend channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShmemStats {
    /// `SHMEM_MAP`s the frontend acked.
    pub maps: u64,
    /// `SHMEM_UNMAP`s the frontend acked.
    pub unmaps: u64,
    /// Requests refused (nack, broken or missing channel).
    pub refused: u64,
}

/// The [`Placer`] of vhost-user mode: `SHMEM_MAP`/`SHMEM_UNMAP` on the backend channel.
#[derive(Default)]
pub struct ShmemPlacer {
    channel: Option<Channel>,
    size: u64,
    stats: ShmemStats,
}

impl std::fmt::Debug for ShmemPlacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmemPlacer")
            .field("channel", &self.channel.is_some())
            .field("size", &self.size)
            .field("stats", &self.stats)
            .finish()
    }
}

impl ShmemPlacer {
    /// A placer for a region of `size` bytes, with no backend channel yet.
    pub fn new(size: u64) -> Self {
        ShmemPlacer {
            channel: None,
            size,
            stats: ShmemStats::default(),
        }
    }

    /// Takes the backend channel (`SET_BACKEND_REQ_FD`).
    pub fn set_channel(&mut self, channel: Channel) {
        self.channel = Some(channel);
    }

    /// Drops the backend channel: later unmaps are local only (frontend-started resets).
    pub fn detach(&mut self) -> Option<Channel> {
        self.channel.take()
    }

    /// The counters.
    pub fn stats(&self) -> ShmemStats {
        self.stats
    }

    fn refused(&mut self, what: &str, e: impl std::fmt::Display) -> PlaceError {
        self.stats.refused += 1;
        log::warn!("vhost-user: {what} refused: {e}");
        PlaceError::Unspec(format!("frontend refused {what}: {e}"))
    }
}

impl Placer for ShmemPlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> std::result::Result<(), PlaceError> {
        let flags = if req.prot == Prot::READ_WRITE {
            VhostUserMMapFlags::WRITABLE
        } else {
            VhostUserMMapFlags::empty()
        };
        let msg = VhostUserMMap {
            shmid: SHMEM_ID,
            fd_offset: req.blob.fd_offset,
            shm_offset: req.offset,
            len: req.len,
            flags: flags.bits(),
            ..Default::default()
        };
        let Some(ch) = self.channel.as_ref() else {
            return Err(self.refused("SHMEM_MAP", "no backend channel (BACKEND_REQ)"));
        };
        match ch.shmem_map(&msg, &req.blob.fd.as_fd()) {
            Ok(_) => {
                self.stats.maps += 1;
                Ok(())
            }
            Err(e) => Err(self.refused("SHMEM_MAP", e)),
        }
    }

    fn unmap(
        &mut self,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), PlaceError> {
        let Some(ch) = self.channel.as_ref() else {
            // Detached (a reset the frontend started): nothing to tell.
            log::debug!("vhost-user: resource {resource_id} dropped at {offset:#x} locally");
            return Ok(());
        };
        let msg = VhostUserMMap {
            shmid: SHMEM_ID,
            shm_offset: offset,
            len,
            ..Default::default()
        };
        match ch.shmem_unmap(&msg) {
            Ok(_) => {
                self.stats.unmaps += 1;
                Ok(())
            }
            Err(e) => Err(self.refused("SHMEM_UNMAP", e)),
        }
    }

    fn window_size(&self) -> u64 {
        self.size
    }
}

/// One guest memory region as the frontend described it.
#[derive(Debug)]
struct MemRegion {
    gpa: u64,
    size: u64,
    user_addr: u64,
    fd_offset: u64,
    file: File,
}

/// One ring's setup as it arrives, message by message.
#[derive(Debug, Default)]
struct Ring {
    size: u16,
    /// Frontend virtual addresses: descriptor table, used ring, avail ring.
    addrs: Option<(u64, u64, u64)>,
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    enabled: bool,
    started: bool,
    /// The next avail index when the ring was stopped (`GET_VRING_BASE`).
    stopped_at: u16,
}

/// The backend's state for one connection: the device core plus what the vhost-user
/// messages set up.
pub struct VuGpu {
    dev: VirtioGpu<ShmemPlacer>,
    num_capsets: u32,
    acked_features: u64,
    acked_protocol: u64,
    regions: Vec<MemRegion>,
    rings: [Ring; NUM_QUEUES],
    /// Memory changed since the queues' memory was taken.
    memory_dirty: bool,
}

impl std::fmt::Debug for VuGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VuGpu")
            .field("dev", &self.dev)
            .field("regions", &self.regions.len())
            .field("rings", &self.rings)
            .finish()
    }
}

fn bad<T>(why: impl std::fmt::Display) -> VuResult<T> {
    log::warn!("vhost-user: refused: {why}");
    Err(VuError::InvalidParam)
}

impl VuGpu {
    /// A backend state around `backend` with a shared memory region of `shmem_size` bytes.
    pub fn new(backend: Box<dyn Backend>, shmem_size: u64) -> Self {
        let num_capsets = u32::try_from(backend.capsets().len()).unwrap_or(u32::MAX);
        VuGpu {
            dev: VirtioGpu::new(Gpu::new(backend, ShmemPlacer::new(shmem_size))),
            num_capsets,
            acked_features: 0,
            acked_protocol: 0,
            regions: Vec::new(),
            rings: Default::default(),
            memory_dirty: true,
        }
    }

    /// The device core.
    pub fn device(&self) -> &VirtioGpu<ShmemPlacer> {
        &self.dev
    }

    /// The device core, mutably.
    pub fn device_mut(&mut self) -> &mut VirtioGpu<ShmemPlacer> {
        &mut self.dev
    }

    /// `struct virtio_gpu_config`: no events, no scanouts, the backend's capsets.
    pub fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[12..16].copy_from_slice(&self.num_capsets.to_le_bytes());
        c
    }

    /// A reset the frontend started (or a disconnect): every blob and context dropped
    /// without telling the frontend, rings stopped, the backend channel kept unless
    /// `drop_channel`.
    pub fn reset(&mut self, drop_channel: bool) {
        for (i, r) in self.rings.iter_mut().enumerate() {
            if let Some(n) = self.dev.next_avail(i as u16) {
                r.stopped_at = n;
            }
            r.started = false;
            r.enabled = false;
            r.kick = None;
        }
        let channel = self.dev.gpu_mut().placer_mut().detach();
        self.dev.reset();
        if let (Some(ch), false) = (channel, drop_channel) {
            self.dev.gpu_mut().placer_mut().set_channel(ch);
        }
        self.memory_dirty = true;
    }

    fn proto(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol & f.bits() != 0
    }

    /// Translates a frontend virtual address to a guest-physical one.
    fn translate(&self, va: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = va.checked_sub(r.user_addr)?;
            (off < r.size).then(|| r.gpa.checked_add(off)).flatten()
        })
    }

    fn add_region(&mut self, r: &VhostUserMemoryRegion, file: File) -> VuResult<()> {
        let (gpa, size, user_addr, fd_offset) =
            (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
        if size == 0 || !is_page_aligned(gpa) || !is_page_aligned(size) {
            return bad(format!("region {gpa:#x}+{size:#x} not page-aligned"));
        }
        if !is_page_aligned(fd_offset) {
            return bad(format!("region {gpa:#x}: mmap offset {fd_offset:#x}"));
        }
        let Some(end) = gpa.checked_add(size) else {
            return bad(format!("region {gpa:#x}+{size:#x} overflows"));
        };
        if user_addr.checked_add(size).is_none() || fd_offset.checked_add(size).is_none() {
            return bad(format!("region {gpa:#x}: address or offset overflows"));
        }
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return bad("no memory slot left");
        }
        if let Some(o) = self
            .regions
            .iter()
            .find(|o| o.gpa < end && gpa < o.gpa + o.size)
        {
            return bad(format!(
                "region {gpa:#x}+{size:#x} overlaps {:#x}+{:#x}",
                o.gpa, o.size
            ));
        }
        self.regions.push(MemRegion {
            gpa,
            size,
            user_addr,
            fd_offset,
            file,
        });
        self.memory_dirty = true;
        Ok(())
    }

    /// Maps the regions for the device core.
    fn build_memory(&self) -> Result<GuestMemoryMmap> {
        let gm = |why: String| Error::GuestMemory(why);
        let mut built = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let need = r.fd_offset.saturating_add(r.size);
            let have = r
                .file
                .metadata()
                .map_err(|e| gm(format!("region {:#x}: fstat: {e}", r.gpa)))?
                .len();
            if have < need {
                return Err(gm(format!(
                    "region {:#x}: fd holds {have:#x} bytes, needs {need:#x}",
                    r.gpa
                )));
            }
            let file = r
                .file
                .try_clone()
                .map_err(|e| gm(format!("region {:#x}: dup: {e}", r.gpa)))?;
            let len = usize::try_from(r.size).map_err(|_| gm("region too large".into()))?;
            let mapping = MmapRegion::from_file(FileOffset::new(file, r.fd_offset), len)
                .map_err(|e| gm(format!("region {:#x}: mmap: {e}", r.gpa)))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
                .ok_or_else(|| gm(format!("region {:#x} overflows", r.gpa)))?;
            built.push(region);
        }
        GuestMemoryMmap::from_regions(built).map_err(|e| gm(e.to_string()))
    }

    /// Starts ring `index` once everything it needs is there.
    fn try_start(&mut self, index: usize) -> VuResult<()> {
        let Some(r) = self.rings.get(index) else {
            return bad(format!("no queue {index}"));
        };
        if r.started || !r.enabled || r.kick.is_none() || r.call.is_none() {
            return Ok(());
        }
        let Some((desc, used, avail)) = r.addrs else {
            return Ok(());
        };
        let (Some(desc), Some(used), Some(avail)) = (
            self.translate(desc),
            self.translate(used),
            self.translate(avail),
        ) else {
            return bad(format!(
                "queue {index}: ring addresses outside guest memory"
            ));
        };
        let any_started = self.rings.iter().any(|r| r.started);
        if self.memory_dirty && !any_started {
            let mem = self.build_memory().or_else(bad)?;
            self.dev.set_memory(mem).or_else(bad)?;
            self.memory_dirty = false;
        }
        let setup = QueueSetup {
            index: index as u16,
            size: r.size,
            desc,
            avail,
            used,
            event_idx: self.acked_features & VIRTIO_F_RING_EVENT_IDX != 0,
        };
        let dup = |fd: &Option<OwnedFd>| fd.as_ref().map(|f| f.try_clone());
        let (Some(Ok(kick)), Some(Ok(call))) = (dup(&r.kick), dup(&r.call)) else {
            return bad("dup of the ring's eventfds failed");
        };
        self.dev.enable_queue(&setup, kick, call).or_else(bad)?;
        if let Some(r) = self.rings.get_mut(index) {
            r.started = true;
        }
        Ok(())
    }

    fn ring_mut(&mut self, index: u32) -> VuResult<&mut Ring> {
        match self.rings.get_mut(index as usize) {
            Some(r) => Ok(r),
            None => bad(format!("no queue {index}")),
        }
    }

    /// Kick fds of the started queues, to poll.
    pub fn kick_fds(&self) -> Vec<(u16, BorrowedFd<'_>)> {
        self.dev.kick_fds()
    }
}

impl VhostUserBackendReqHandlerMut for VuGpu {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset(false);
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset(false);
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(OFFERED_FEATURES)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !OFFERED_FEATURES != 0 {
            return bad(format!("features {features:#x} not offered"));
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if files.len() != ctx.len() || ctx.is_empty() {
            return bad(format!("{} regions with {} fds", ctx.len(), files.len()));
        }
        let old = std::mem::take(&mut self.regions);
        for (r, f) in ctx.iter().zip(files) {
            if let Err(e) = self.add_region(r, f) {
                self.regions = old;
                return Err(e);
            }
        }
        self.memory_dirty = true;
        log::info!("vhost-user: memory table of {} regions", self.regions.len());
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let size = match u16::try_from(num) {
            Ok(n) if n.is_power_of_two() && n <= QUEUE_MAX_SIZE => n,
            _ => return bad(format!("queue {index}: size {num}")),
        };
        self.ring_mut(index)?.size = size;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.ring_mut(index)?.addrs = Some((descriptor, used, available));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let r = self.ring_mut(index)?;
        if r.started {
            return bad(format!("queue {index}: SET_VRING_BASE while running"));
        }
        if base != 0 {
            return bad(format!("queue {index}: base {base} (only fresh rings)"));
        }
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.ring_mut(index)?;
        if self.rings.iter().any(|r| r.started) {
            log::info!("vhost-user: GET_VRING_BASE {index}: the device stops (reset)");
            self.reset(false);
        }
        let num = self.ring_mut(index)?.stopped_at;
        Ok(VhostUserVringState::new(index, u32::from(num)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let Some(fd) = fd else {
            return bad(format!("queue {index}: polling mode (no kick fd)"));
        };
        let proto = self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let r = self.ring_mut(u32::from(index))?;
        if r.started {
            return bad(format!("queue {index}: new kick fd while running"));
        }
        r.kick = Some(OwnedFd::from(fd));
        // Without PROTOCOL_FEATURES a ring starts enabled at its kick fd (vhost-user spec).
        if !proto {
            r.enabled = true;
        }
        self.try_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let Some(fd) = fd else {
            return bad(format!("queue {index}: no call fd"));
        };
        let fd = OwnedFd::from(fd);
        let r = self.ring_mut(u32::from(index))?;
        if r.started {
            let copy = fd.try_clone().or_else(bad)?;
            r.call = Some(fd);
            self.dev.set_call(u16::from(index), copy).or_else(bad)?;
            return Ok(());
        }
        r.call = Some(fd);
        self.try_start(usize::from(index))
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        // The device never reports ring errors through an eventfd.
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if features & !protocol_features().bits() != 0 {
            return bad(format!("protocol features {features:#x} not offered"));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(NUM_QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let r = self.ring_mut(index)?;
        if !enable {
            if r.started {
                log::info!("vhost-user: queue {index} disabled: the device stops (reset)");
                self.reset(false);
            }
            return Ok(());
        }
        r.enabled = true;
        self.try_start(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let (off, len) = (offset as usize, size as usize);
        let Some(end) = off.checked_add(len).filter(|&e| e <= MAX_CONFIG_READ) else {
            return bad(format!("config read {offset}+{size}"));
        };
        let mut all = [0u8; MAX_CONFIG_READ];
        all[..CONFIG_SIZE].copy_from_slice(&self.config());
        Ok(all[off..end].to_vec())
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // events_clear (offset 4) is the only writable field; there are no events to clear.
        log::debug!("vhost-user: config write {offset}+{} ignored", buf.len());
        Ok(())
    }

    fn set_backend_req_fd(&mut self, channel: Channel) {
        channel.set_reply_ack_flag(self.proto(VhostUserProtocolFeatures::REPLY_ACK));
        channel.set_shmem_flag(self.proto(VhostUserProtocolFeatures::SHMEM));
        self.dev.gpu_mut().placer_mut().set_channel(channel);
        log::info!("vhost-user: backend channel set");
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        bad("GPU_SET_SOCKET (vhost-user-gpu's display protocol) is not supported")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        bad("GET_SHARED_OBJECT is not supported")
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        bad("INFLIGHT_SHMFD is not offered")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        bad("INFLIGHT_SHMFD is not offered")
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let r: VhostUserMemoryRegion = **region;
        self.add_region(&r, fd)?;
        if self.rings.iter().any(|r| r.started) {
            let (gpa, size) = (r.guest_phys_addr, r.memory_size);
            log::debug!(
                "vhost-user: region {gpa:#x}+{size:#x} added while queues run: recorded only"
            );
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let before = self.regions.len();
        self.regions.retain(|r| !(r.gpa == gpa && r.size == size));
        if self.regions.len() == before {
            return bad(format!("no region {gpa:#x}+{size:#x} to remove"));
        }
        self.memory_dirty = true;
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        bad("DEVICE_STATE (migration) is not offered")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        bad("DEVICE_STATE (migration) is not offered")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        let size = self.dev.gpu().placer().window_size();
        let mut sizes = [0u64; 2];
        sizes[usize::from(SHMEM_ID)] = size;
        Ok(VhostUserShMemConfig::new(1, &sizes))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        bad("LOG_SHMFD is not offered")
    }
}

/// Locks the shared state; a poisoned lock (a panic elsewhere) still yields the state.
fn lock(vu: &Mutex<VuGpu>) -> MutexGuard<'_, VuGpu> {
    vu.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed its socket.
    Disconnected,
    /// The frontend broke the protocol (the connection was closed).
    ProtocolError(String),
}

/// Serves one frontend connection until it ends: the poll loop over the socket and the
/// started queues' kick eventfds. The caller resets the state afterwards.
pub fn serve_connection(stream: UnixStream, vu: &Arc<Mutex<VuGpu>>) -> Result<ConnectionEnd> {
    let mut handler = BackendReqHandler::from_stream(stream, vu.clone());
    // The handler keeps its socket to itself; a duplicate (same open file description)
    // is what the loop polls.
    let sock = handler
        .try_clone_connection()
        .map_err(|e| Error::Protocol(format!("dup of the vhost-user socket: {e}")))?;
    loop {
        let (socket_ready, kicked, busy) = {
            let g = lock(vu);
            let busy = g.dev.busy();
            let kicks = g.kick_fds();
            let mut fds = vec![PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                kicks
                    .iter()
                    .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            let timeout = if busy {
                PollTimeout::ZERO
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::Poll(e)),
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let s = fds.first().is_some_and(ready);
            let k: Vec<u16> = kicks
                .iter()
                .zip(fds.iter().skip(1))
                .filter(|(_, f)| ready(f))
                .map(|((i, _), _)| *i)
                .collect();
            (s, k, busy)
        };
        if socket_ready {
            match handler.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected) | Err(VuError::PartialMessage) => {
                    return Ok(ConnectionEnd::Disconnected)
                }
                Err(VuError::SocketBroken(e)) if e.raw_os_error() == Some(libc_econnreset()) => {
                    return Ok(ConnectionEnd::Disconnected)
                }
                Err(e) => {
                    log::warn!("vhost-user: frontend broke the protocol: {e}: closing");
                    return Ok(ConnectionEnd::ProtocolError(e.to_string()));
                }
            }
        }
        let mut g = lock(vu);
        if busy {
            g.dev.process_busy();
        }
        for index in kicked {
            g.dev.kick(index);
        }
    }
}

/// `ECONNRESET`, as `vhost` reports a peer that went away mid-message.
fn libc_econnreset() -> i32 {
    Errno::ECONNRESET as i32
}

/// Accepts frontends on `listener` one after the other, each with a fresh backend; after a
/// disconnect the device has reset (every blob and mapping dropped). Returns after
/// `opts.max_connections` connections, or never.
pub fn serve_listener(listener: &UnixListener, opts: &Options) -> Result<()> {
    let mut served = 0usize;
    loop {
        if opts.max_connections.is_some_and(|m| served >= m) {
            return Ok(());
        }
        let (stream, _) = listener
            .accept()
            .map_err(|e| Error::Protocol(format!("accept on the vhost-user socket: {e}")))?;
        served += 1;
        let backend = crate::process::make_backend_with(&opts.backend, opts.test_ops, None)?;
        log::info!(
            "vhost-user: frontend {served} connected (backend {}, region {:#x} bytes)",
            backend.name(),
            opts.shmem_size
        );
        let vu = Arc::new(Mutex::new(VuGpu::new(backend, opts.shmem_size)));
        let end = serve_connection(stream, &vu)?;
        let mut g = lock(&vu);
        g.reset(true);
        log::info!("vhost-user: frontend {served} gone ({end:?}): device reset");
    }
}
