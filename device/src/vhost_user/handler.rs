//! [`VuGpu`]: the backend's state (guest memory regions, rings, the device) and its
//! `vhost` request handler.

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};

use hostmem_base::mmap::is_page_aligned;
use hostmem_ipc::protocol::QueueSetup;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as Channel, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use crate::backend::Backend;
use crate::gpu::{Gpu, Placer};
use crate::virtio::{GuestMemoryMmap, VirtioGpu, NUM_QUEUES, QUEUE_MAX_SIZE};
use crate::{Error, Result};

use super::{
    protocol_features, ShmemPlacer, CONFIG_SIZE, MAX_CONFIG_READ, MAX_MEM_SLOTS, OFFERED_FEATURES,
    SHMEM_ID, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_EVENT_IDX,
};

/// One guest memory region as the frontend described it.
#[derive(Debug)]
struct MemRegion {
    gpa: u64,
    size: u64,
    user_addr: u64,
    fd_offset: u64,
    file: File,
    /// Added while queues ran (QEMU's region for a `SHMEM_MAP`): never backing.
    late: bool,
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
    pub(super) dev: VirtioGpu<ShmemPlacer>,
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

/// What the frontend made the device refuse, by kind (logged the 1st, 2nd, 4th, … time).
pub static VHOST_USER_WARNINGS: hostmem_base::log_limit::LogLimiter =
    hostmem_base::log_limit::LogLimiter::new("hostmem_device::vhost_user");

fn bad<T>(why: impl std::fmt::Display) -> VuResult<T> {
    VHOST_USER_WARNINGS.warn(
        "frontend request refused",
        format_args!("vhost-user: refused: {why}"),
    );
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

    /// `struct virtio_gpu_config`: no events, the display's scanouts, the backend's capsets.
    pub fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let scanouts = self.dev.gpu().display().num_scanouts();
        c[8..12].copy_from_slice(&scanouts.to_le_bytes());
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
        self.dev.gpu_mut().placer_mut().suspend();
        self.dev.reset();
        let placer = self.dev.gpu_mut().placer_mut();
        placer.resume();
        if drop_channel {
            let timeout = placer.ack_timeout();
            *placer = ShmemPlacer::new(placer.window_size());
            placer.set_ack_timeout(timeout);
        }
        self.memory_dirty = true;
    }

    pub(super) fn proto(&self, f: VhostUserProtocolFeatures) -> bool {
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
        let late = self.rings.iter().any(|r| r.started);
        self.regions.push(MemRegion {
            gpa,
            size,
            user_addr,
            fd_offset,
            file,
            late,
        });
        self.memory_dirty = true;
        self.update_exclusions();
        Ok(())
    }

    /// Tells the handler which regions are never backing: those added while queues ran.
    fn update_exclusions(&mut self) {
        let late: Vec<(u64, u64)> = self
            .regions
            .iter()
            .filter(|r| r.late)
            .map(|r| (r.gpa, r.size))
            .collect();
        self.dev.gpu_mut().set_backing_exclusions(late);
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
                self.update_exclusions();
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

    fn set_backend_req_fd(&mut self, _channel: Channel) {
        // Never reached: the poll loop takes SET_BACKEND_REQ_FD off the socket itself
        // ([`take_backend_channel`]), because `vhost`'s `Backend` keeps the socket to itself
        // and blocks on every ack (see [`BackendChannel`]).
        log::warn!("vhost-user: SET_BACKEND_REQ_FD through vhost's handler: ignored");
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
        self.update_exclusions();
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
