//! `hostmem run --transport vhost-user`: our VMM as a vhost-user **frontend** of the jailed
//! device, with every `SHMEM_MAP` placed in the one-memslot window.
//!
//! QEMU 11.1 turns each `SHMEM_MAP` into a memory region of its own (under KVM a memslot
//! per blob), and crosvm's vhost-user GPU frontend does the same. Here a `SHMEM_MAP` is a
//! placement event like the native mapping tube's: [`ShmemService`] hands it to
//! [`Hostmem::handle_map`] — the very function the mapping service (`crate::service`)
//! calls, so alignment, range, overlap, the fd's kind, size and seals, protection and the
//! live-placement limit all apply — which places the blob with MAP_FIXED in the window KVM
//! already maps, and only then acks it. A refusal is a nack (`-errno`), and the device
//! fails the guest's `MAP_BLOB`. `SHMEM_UNMAP` goes to [`Hostmem::handle_unmap`]: the
//! background is back before the ack, so the guest's `UNMAP_BLOB` completes only when the
//! blob is gone.
//!
//! # Launch
//!
//! [`VhostUserDevice::start`] uses the supervisor's launch (`crate::vhost_user::start_backend`):
//! the same binary, jail, `gpu_device_vhost_user.policy` and `/proc` check as
//! `hostmem vhost-user`, so the run proves the code path any frontend uses. That launch wants
//! a listening socket (the device only ever `accept`s); it is bound in a private directory
//! (mode 0700) that is removed, socket file and all, as soon as our connection is made: the
//! device keeps the listening fd, nothing is left on the filesystem, and no device change
//! or extra syscall (a socketpair would need the device to tell a connected socket from a
//! listening one) was needed.
//!
//! # Threads (the deadlock)
//!
//! The device sends `SHMEM_MAP` from inside a guest command and waits for the ack; it reads
//! the main socket only between commands. The main socket is driven by the vCPU thread
//! (the transport's MMIO exits: queue enable, reset) and blocks on each reply. If the same
//! thread served the backend channel, a request from the transport made while the device
//! waits for an ack would deadlock both. So the backend channel is served on a thread of
//! its own (`channel.rs`) that never touches the main socket; Hostmem's lock is the only
//! state it shares, and the vCPU thread never holds it while it waits for the device.
//!
//! # Messages
//!
//! `SET_OWNER`, `GET_FEATURES`, `GET/SET_PROTOCOL_FEATURES` (`MQ`, `REPLY_ACK`,
//! `BACKEND_REQ`, `BACKEND_SEND_FD`, `CONFIG`, `SHMEM`, `RESET_DEVICE` required),
//! `GET_QUEUE_NUM`, `GET_SHMEM_CONFIG` (region 1 must be the window's size), `GET_CONFIG`
//! (`num_capsets`), `SET_BACKEND_REQ_FD`, then per device `SET_MEM_TABLE` (the KVM guest's
//! RAM memfd; the "user address" of a region is its guest-physical address, so ring
//! addresses are GPAs), and per queue the guest enables `SET_FEATURES` (the driver's
//! features), `SET_VRING_NUM/ADDR/BASE(0)/KICK/CALL/ENABLE` with the transport's kick and
//! call eventfds (their `KVM_IOEVENTFD`/`KVM_IRQFD` stay in the VMM). Every request without
//! a reply carries `NEED_REPLY`, so each completes only when the device answered, as the
//! transport tube's messages do. A guest reset is `RESET_DEVICE`; the device drops its
//! blobs without `SHMEM_UNMAP` then (we are blocked on its reply), so the whole window is
//! restored ([`Hostmem::reset`]) after the ack.
//!
//! # Every wait is bounded
//!
//! The socket's read timeout bounds nothing: the `vhost` crate's receive loop retries on
//! `EAGAIN`, so a device that never answers (one busy in a long `SUBMIT_3D`, a stopped
//! one) would hold the vCPU in `wait_for_ack` for as long as it likes. Each request, from
//! `SET_OWNER` on, therefore runs under a deadline (`deadline.rs`: a watchdog thread
//! `shutdown(2)`s the socket when the deadline passes, the crate's blocked receive returns
//! end of file). A request that missed its deadline fails as a broken link: the transport
//! declares the device lost (the guest reads `DEVICE_NEEDS_RESET`; a reset it wrote is not
//! complete) and the supervisor kills the device and restores the window, as for a native
//! device that misses its transport tube's reply timeout. The socket stays shut down.
//!
//! vhost-user's `SHMEM_MAP` carries no resource id: a placement is keyed by its page index
//! in the window (unique, since live placements cannot overlap), and an unmap must name the
//! same offset and length.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hostmem_base::kvm::eventfd_from_fd;
use hostmem_base::kvm::EventFd;
use hostmem_device::vhost_user::{CONFIG_SIZE, SHMEM_ID, VHOST_USER_F_PROTOCOL_FEATURES};
use hostmem_ipc::protocol::{GuestRegion, QueueSetup, QueueStats, TransportMsg, TransportReply};
use hostmem_ipc::Tube;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Error as VuError, Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use crate::device::{DeviceConfig, DeviceExit, DeviceFacts};
use crate::hostmem::Hostmem;
use crate::vhost_user::{bind_socket, start_backend, vhost_user_device, BackendDevice};
use crate::virtio_pci::{
    DeviceLink, Error as PciError, MAX_QUEUE_SIZE, NUM_QUEUES, OFFERED_FEATURES,
    VIRTIO_F_RING_EVENT_IDX,
};
use hostmem_jail::launch::ExitInfo;

mod channel;
mod deadline;

use channel::Channel;
pub use channel::ShmemService;
use deadline::Watchdog;

const PAGE: u64 = 4096;

/// The protocol features the frontend needs from the device.
pub fn required_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::SHMEM
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// The transport's link over vhost-user (see the module doc).
pub struct VhostUserLink {
    fe: Frontend,
    /// Shuts the socket down when a request misses its deadline.
    watchdog: Arc<Watchdog>,
    /// Each request's deadline.
    timeout: Duration,
    hostmem: Arc<Hostmem>,
    /// Virtio features the device offered (GET_FEATURES).
    device_features: u64,
    /// Virtio features last sent (`None` after a reset).
    features: Option<u64>,
}

impl std::fmt::Debug for VhostUserLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserLink")
            .field("features", &self.features)
            .finish()
    }
}

impl VhostUserLink {
    /// One request to the device, ended at its deadline (see the module doc).
    fn bounded<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Frontend) -> Result<T, vhost::Error>,
    ) -> Result<T, PciError> {
        let (fe, timeout) = (&mut self.fe, self.timeout);
        let (res, late) = self.watchdog.bounded(timeout, || f(fe));
        if late {
            return Err(PciError::Link {
                what,
                reason: format!(
                    "no answer within {timeout:?}: the device is lost (its socket is shut down)"
                ),
            });
        }
        res.map_err(|e| link_err(what, e))
    }
}

/// A vhost error as the transport's: a nack is the device's refusal, anything else a
/// broken link.
fn link_err(what: &'static str, e: vhost::Error) -> PciError {
    match e {
        vhost::Error::VhostUserProtocol(VuError::BackendInternalError) => PciError::Refused {
            what,
            reason: "nacked".into(),
        },
        e => PciError::Link {
            what,
            reason: e.to_string(),
        },
    }
}

impl DeviceLink for VhostUserLink {
    fn name(&self) -> &'static str {
        "vhost-user"
    }

    fn guest_memory(
        &mut self,
        regions: &[GuestRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), PciError> {
        let table: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .zip(fds)
            .map(|(r, fd)| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                // Our "address space" for the device is the guest's: rings are given by GPA.
                userspace_addr: r.gpa,
                mmap_offset: r.fd_offset,
                mmap_handle: fd.as_raw_fd(),
            })
            .collect();
        self.bounded("SET_MEM_TABLE", |fe| fe.set_mem_table(&table))
            .map(|_| ())
    }

    fn queue_enable(
        &mut self,
        setup: &QueueSetup,
        driver_features: u64,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), PciError> {
        let features = driver_features | VHOST_USER_F_PROTOCOL_FEATURES;
        let missing = features & !self.device_features;
        if missing != 0 {
            return Err(PciError::Refused {
                what: "SET_FEATURES",
                reason: format!("the device does not offer features {missing:#x}"),
            });
        }
        if self.features != Some(features) {
            self.bounded("SET_FEATURES", |fe| fe.set_features(features))?;
            self.features = Some(features);
        }
        let q = usize::from(setup.index);
        self.bounded("SET_VRING_NUM", |fe| fe.set_vring_num(q, setup.size))?;
        let addrs = VringConfigData {
            queue_max_size: MAX_QUEUE_SIZE,
            queue_size: setup.size,
            flags: 0,
            desc_table_addr: setup.desc,
            used_ring_addr: setup.used,
            avail_ring_addr: setup.avail,
            log_addr: None,
        };
        self.bounded("SET_VRING_ADDR", |fe| fe.set_vring_addr(q, &addrs))?;
        self.bounded("SET_VRING_BASE", |fe| fe.set_vring_base(q, 0))?;
        self.bounded("SET_VRING_KICK", |fe| fe.set_vring_kick(q, kick))?;
        self.bounded("SET_VRING_CALL", |fe| fe.set_vring_call(q, call))?;
        self.bounded("SET_VRING_ENABLE", |fe| fe.set_vring_enable(q, true))
    }

    fn reset(&mut self) -> Result<(), PciError> {
        self.bounded("RESET_DEVICE", |fe| fe.reset_device())?;
        self.features = None;
        // The device dropped its blobs without SHMEM_UNMAP (we were blocked on its reply).
        let n = self.hostmem.reset().map_err(|e| PciError::Link {
            what: "restoring the window after RESET_DEVICE",
            reason: format!("{e:#}"),
        })?;
        if n > 0 {
            log::info!("vhost-user frontend: reset: {n} placements restored to background");
        }
        Ok(())
    }

    fn stats(&self) -> Result<QueueStats, PciError> {
        Err(PciError::Unsupported("virtqueue counters"))
    }
}

/// A private directory for the listening socket, removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> anyhow::Result<SocketDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hostmem-vu-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(SocketDir(dir))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The jailed device serving vhost-user to us, its backend channel and its link (until the
/// transport takes it).
pub struct VhostUserDevice {
    backend: Option<BackendDevice>,
    channel: Channel,
    link: Option<VhostUserLink>,
    /// [`VhostUserDevice::transport`]: our end of the shim's tube and the shim.
    shim: Option<(Arc<Tube>, JoinHandle<()>)>,
    /// The thread reading the device's frames and cursor off the control tube into
    /// `hostmem`'s [`crate::display::Frames`], and that tube.
    feed: Option<(Arc<Tube>, JoinHandle<()>)>,
    hostmem: Arc<Hostmem>,
    facts: DeviceFacts,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("facts", &self.facts)
            .finish()
    }
}

impl VhostUserDevice {
    /// Starts the device jailed (`cfg`, with the vhost-user policy from the same folder:
    /// [`vhost_user_device`]; virgl with its render server as the native device has it),
    /// connects, negotiates (see the module doc) and starts serving the backend channel.
    /// `timeout` bounds every reply on the main socket. Region 1 is the window.
    pub fn start(
        cfg: &DeviceConfig,
        hostmem: Arc<Hostmem>,
        timeout: Duration,
    ) -> anyhow::Result<VhostUserDevice> {
        if cfg.render_server.is_some() && !cfg.backend.is_virgl() {
            bail!(
                "a render server is for the virgl backend, not {}",
                cfg.backend
            );
        }
        let size = hostmem.window().size();
        if !size.is_power_of_two() {
            bail!("--transport vhost-user needs a power-of-two window (the device's region 1), not {size:#x}");
        }
        let cfg = vhost_user_device(cfg.clone());
        let dir = SocketDir::new()?;
        let path = dir.0.join("gpu.sock");
        let listener = bind_socket(&path)?;
        let backend = start_backend(&cfg, &listener, size)?;
        let pid = backend.facts().pid;
        let connected = (|| -> anyhow::Result<(VhostUserLink, Channel, u32)> {
            let stream = UnixStream::connect(&path)
                .with_context(|| format!("connecting to {}", path.display()))?;
            // Connected: the device keeps the listening fd, nothing stays on the filesystem.
            drop(listener);
            drop(dir);
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            let watchdog = Arc::new(Watchdog::new(
                stream.try_clone()?,
                format!("vhost-user-deadline-{pid}"),
            )?);
            let mut fe = Frontend::from_stream(stream, u64::from(NUM_QUEUES));
            negotiate(
                &mut fe,
                Deadline { watchdog, timeout },
                hostmem.clone(),
                size,
                pid,
                cfg.service_cpus.clone(),
            )
        })();
        match connected {
            Ok((link, channel, num_capsets)) => {
                let mut facts = backend.facts().clone();
                if facts.num_capsets != num_capsets {
                    log::warn!(
                        "vhost-user device: Ready said {} capsets, GET_CONFIG {num_capsets}",
                        facts.num_capsets
                    );
                }
                facts.num_capsets = num_capsets;
                log::info!(
                    "vhost-user device pid {pid} connected ({num_capsets} capsets, region 1 = window of {size:#x} bytes)"
                );
                let feed = Some((backend.control().clone(), backend.feed(hostmem.frames())));
                Ok(VhostUserDevice {
                    backend: Some(backend),
                    channel,
                    link: Some(link),
                    shim: None,
                    feed,
                    hostmem,
                    facts,
                })
            }
            Err(e) => {
                let why = backend.end().described.unwrap_or_default();
                Err(e.context(format!("vhost-user device pid {pid} ({why})")))
            }
        }
    }

    /// The link for the virtio-pci transport ([`crate::virtio_pci::VirtioPciGpu::attach_link`]);
    /// `None` once taken.
    pub fn take_link(&mut self) -> Option<Box<dyn DeviceLink>> {
        self.link.take().map(|l| Box::new(l) as Box<dyn DeviceLink>)
    }

    /// The device's link behind a transport tube, for host-side drivers written against
    /// the native transport ([`crate::queue_driver::QueueDriver`], the bench): a thread
    /// turns each [`TransportMsg`] into the link's vhost-user requests (queues with the
    /// virtio-pci transport's feature set). Only the set-up goes through it: commands still
    /// travel in the rings and eventfds, and `SHMEM_MAP`s on the backend channel. Takes the
    /// link ([`VhostUserDevice::take_link`] then yields `None`).
    pub fn transport(&mut self) -> anyhow::Result<Arc<Tube>> {
        let link = self.take_link().context("the link is taken")?;
        let (ours, theirs) = Tube::pair()?;
        let theirs = Arc::new(theirs);
        let tube = theirs.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user-shim-{}", self.facts.pid))
            .spawn(move || serve_tube(link, &tube))?;
        self.shim = Some((theirs, thread));
        Ok(Arc::new(ours))
    }

    /// What was checked at start (`num_capsets` from `GET_CONFIG`).
    pub fn facts(&self) -> &DeviceFacts {
        &self.facts
    }

    /// Host pid.
    pub fn pid(&self) -> i32 {
        self.facts.pid
    }

    /// Sends `signal` to the device (fault injection).
    pub fn kill(&self, signal: i32) {
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.facts.pid),
            nix::sys::signal::Signal::try_from(signal).ok(),
        ) {
            log::warn!("vhost-user device pid {}: kill: {e}", self.facts.pid);
        }
    }

    /// True if the device process ended or its backend channel closed. Does not block.
    pub fn has_ended(&self) -> bool {
        if self.channel.is_finished() {
            return true;
        }
        crate::device::process_ended(self.facts.pid)
    }

    /// Ends the device (a vhost-user backend serves until it is killed), stops the backend
    /// channel, restores the whole window and reports how the device ended (logged at
    /// warn: for a device that died or broke its link).
    pub fn stop(self, cause: &str) -> DeviceExit {
        self.end(cause, None)
    }

    /// [`VhostUserDevice::stop`] for a device the VMM is done with (the run finished): a
    /// normal end is logged at info. A normal end: the device was still serving when asked
    /// to stop, so our SIGKILL ended it, and no seccomp violation was seen; any other end is
    /// logged at warn. ([`crate::device::Device::finish`] for the native device.)
    pub fn finish(self, cause: &str) -> DeviceExit {
        self.end(cause, Some(log::Level::Info))
    }

    /// [`VhostUserDevice::finish`] with the level of a normal end (the bench uses debug).
    pub fn finish_with(self, cause: &str, normal: log::Level) -> DeviceExit {
        self.end(cause, Some(normal))
    }

    /// Ends the device; `normal` is the level of a clean end (`None`: warn whatever the end).
    fn end(mut self, cause: &str, normal: Option<log::Level>) -> DeviceExit {
        let pid = self.facts.pid;
        let ended_before = self.has_ended();
        let end = self.backend.take().map(BackendDevice::end);
        if let Some((tube, thread)) = self.feed.take() {
            // The device is gone: the feed takes what it sent before and ends at the hangup
            // (bounded, should anything else hold the device's end open).
            let t0 = Instant::now();
            while !thread.is_finished() && t0.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = tube.shutdown();
            if thread.join().is_err() {
                log::error!("vhost-user frontend: the frame feed panicked");
            }
        }
        // No SHMEM_MAP can arrive after this: the device is gone and the channel joined.
        self.channel.stop();
        if let Some((tube, thread)) = self.shim.take() {
            let _ = tube.shutdown();
            if thread.join().is_err() {
                log::error!("vhost-user frontend: the transport shim panicked");
            }
        }
        let restored = match self.hostmem.reset() {
            Ok(n) => n,
            Err(e) => {
                log::error!("restoring the window after the vhost-user device ended: {e:#}");
                0
            }
        };
        if let Err(e) = self.hostmem.audit() {
            log::error!("after the device ended the window is not what the VMM thinks: {e:#}");
        }
        let mut exit = DeviceExit {
            pid,
            code: None,
            signal: None,
            syscall: None,
            sigsys: Default::default(),
            restored,
            seccomp_violations: vec![],
            oom_killed: false,
            max_memory: 0,
            cause: cause.to_string(),
        };
        let mut described = None;
        if let Some(end) = end {
            match end.info {
                Some(ExitInfo::Exited(c)) => exit.code = Some(c),
                Some(ExitInfo::Signaled { signal, .. }) => exit.signal = Some(signal),
                None => {}
            }
            exit.syscall = end.syscall;
            exit.sigsys = end.sigsys;
            exit.seccomp_violations = end.violations;
            exit.oom_killed = end.oom_killed;
            exit.max_memory = end.max_memory;
            described = end.described;
        }
        crate::device::note_oom(&mut exit, &self.facts.memory_limit);
        let clean = !ended_before
            && !exit.oom_killed
            && exit.signal == Some(libc::SIGKILL)
            && exit.seccomp_violations.is_empty();
        log::log!(
            normal.filter(|_| clean).unwrap_or(log::Level::Warn),
            "vhost-user device pid {pid} ended ({}): {}; {restored} placements restored to background",
            exit.cause,
            described.unwrap_or_else(|| "unknown status".into())
        );
        exit
    }
}

impl Drop for VhostUserDevice {
    /// A device dropped without [`VhostUserDevice::stop`] (an error path) does not outlive us.
    fn drop(&mut self) {
        if let Some(b) = self.backend.take() {
            b.end();
        }
    }
}

/// The deadline every request of a connection runs under.
struct Deadline {
    watchdog: Arc<Watchdog>,
    timeout: Duration,
}

impl Deadline {
    /// `f` (one request) bounded by the deadline; `what` names it in the error.
    fn run<T>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> Result<T, vhost::Error>,
    ) -> anyhow::Result<T> {
        match self.watchdog.bounded(self.timeout, f) {
            (_, true) => bail!(
                "{what}: no answer within {:?}: the device is lost",
                self.timeout
            ),
            (res, false) => res.with_context(|| what),
        }
    }
}

/// Everything between the connection and the first guest request (see the module doc);
/// the backend channel's thread runs on `service_cpus`. Every request is bounded by
/// `deadline`.
fn negotiate(
    fe: &mut Frontend,
    deadline: Deadline,
    hostmem: Arc<Hostmem>,
    size: u64,
    pid: i32,
    service_cpus: Vec<usize>,
) -> anyhow::Result<(VhostUserLink, Channel, u32)> {
    let d = &deadline;
    d.run("SET_OWNER", || fe.set_owner())?;
    let features = d.run("GET_FEATURES", || fe.get_features())?;
    if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        bail!("the device offers no protocol features ({features:#x})");
    }
    let need = required_protocol_features();
    let offered = d.run("GET_PROTOCOL_FEATURES", || fe.get_protocol_features())?;
    if !offered.contains(need) {
        bail!(
            "the device lacks protocol features {:?}",
            need.difference(offered)
        );
    }
    d.run("SET_PROTOCOL_FEATURES", || fe.set_protocol_features(need))?;
    // From here every request without a reply is acked (REPLY_ACK): each completes only
    // when the device answered.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let queues = d.run("GET_QUEUE_NUM", || fe.get_queue_num())?;
    if queues < u64::from(NUM_QUEUES) {
        bail!("the device has {queues} queues, virtio-gpu needs {NUM_QUEUES}");
    }
    let shmem = d.run("GET_SHMEM_CONFIG", || fe.get_shmem_config())?;
    let (nregions, region) = (
        shmem.nregions,
        shmem.memory_sizes.get(usize::from(SHMEM_ID)).copied(),
    );
    if nregions != 1 || region != Some(size) {
        bail!("GET_SHMEM_CONFIG: {nregions} regions, region 1 {region:?} bytes; the window is {size:#x}");
    }
    let (_, config) = d.run("GET_CONFIG", || {
        fe.get_config(
            0,
            CONFIG_SIZE as u32,
            VhostUserConfigFlags::empty(),
            &[0u8; CONFIG_SIZE],
        )
    })?;
    let num_capsets = config
        .get(12..16)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .context("GET_CONFIG: short config")?;
    // SET_BACKEND_REQ_FD (acked) is the channel's one request on this socket.
    let (channel, late) = d.watchdog.bounded(d.timeout, || {
        Channel::start(fe, hostmem.clone(), pid, service_cpus)
    });
    if late {
        bail!(
            "SET_BACKEND_REQ_FD: no answer within {:?}: the device is lost",
            d.timeout
        );
    }
    let channel = channel?;
    Ok((
        VhostUserLink {
            fe: fe.clone(),
            watchdog: deadline.watchdog.clone(),
            timeout: deadline.timeout,
            hostmem,
            device_features: features,
            features: None,
        },
        channel,
        num_capsets,
    ))
}

/// [`VhostUserDevice::transport`]'s thread: serves [`TransportMsg`]s with `link` until the
/// tube hangs up.
fn serve_tube(mut link: Box<dyn DeviceLink>, tube: &Tube) {
    loop {
        let (msg, fds) = match tube.recv::<TransportMsg>() {
            Ok(m) => m,
            Err(hostmem_ipc::Error::Hangup) => return,
            Err(e) => {
                log::warn!("vhost-user shim: {e}; stopped");
                return;
            }
        };
        let (seq, res) = match msg {
            TransportMsg::GuestMemory { seq, regions } => {
                let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                (seq, link.guest_memory(&regions, &fds))
            }
            TransportMsg::QueueEnable { seq, queue } => {
                let mut fds = fds.into_iter();
                match (fds.next(), fds.next()) {
                    (Some(kick), Some(call)) => {
                        let (kick, call) = (eventfd_from_fd(kick), eventfd_from_fd(call));
                        (
                            seq,
                            // The driver's ring layout choice is a feature here.
                            link.queue_enable(
                                &queue,
                                OFFERED_FEATURES
                                    | if queue.event_idx {
                                        VIRTIO_F_RING_EVENT_IDX
                                    } else {
                                        0
                                    },
                                &kick,
                                &call,
                            ),
                        )
                    }
                    _ => (
                        seq,
                        Err(PciError::Link {
                            what: "QueueEnable",
                            reason: "without its two eventfds".into(),
                        }),
                    ),
                }
            }
            TransportMsg::Reset { seq } => (seq, link.reset()),
            TransportMsg::Stats { seq } => (seq, link.stats().map(|_| ())),
            // Hop tracing is the native transport's bench mode: vhost-user has no such message.
            #[cfg(feature = "trace")]
            TransportMsg::Trace { seq, .. } | TransportMsg::TraceTake { seq } => (
                seq,
                Err(PciError::Unsupported("hop tracing over vhost-user")),
            ),
        };
        let reply = TransportReply::Done {
            seq,
            error: res.err().map(|e| e.to_string()),
        };
        if tube.send(&reply, &[]).is_err() {
            return;
        }
    }
}

/// Backend requests the frontend refused before they reached `Hostmem`, by kind.
pub fn backend_request_warnings() -> std::collections::BTreeMap<String, u64> {
    channel::NACKS.counts()
}
