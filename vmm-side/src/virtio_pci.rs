//! The virtio-pci transport of the GPU (virtio 1.2 §4.1), the supervisor side of a
//! crosvm-style split: the guest's PCI config cycles and BAR0 accesses exit to the VMM and
//! land here; everything the device process must know (guest RAM, queue addresses with kick
//! and call eventfds, resets) travels over the transport tube as [`TransportMsg`]s, each
//! answered before the guest's access completes. The guest's commands never come through
//! here: they live in virtqueues in guest RAM, kicks go from KVM straight to the device
//! (ioeventfd on the notify address) and used-buffer notifications from the device straight
//! into KVM (irqfd on GSI [`PciLayout::irq_gsi`]).
//!
//! The layout is fixed (the VMM and the guest driver both follow it, see the constants):
//! bus 0 device 1 function 0, config mechanism #1 on ports 0xCF8/0xCFC; BAR0 (64-bit MMIO,
//! 16 KiB) holds common cfg @0x0000, ISR @0x1000, device cfg @0x2000, notify @0x3000
//! (multiplier 4, queue i at 0x3000 + 4 i); BAR2 (64-bit prefetchable) is the hostmem window,
//! described by the shared memory capability. The BARs cannot move: writes of a new address
//! are ignored (only all-ones sizing writes are honoured), because the kick ioeventfds are
//! registered on the fixed notify addresses and the window's memslot is fixed too.
//!
//! Choices worth knowing:
//! * No MSI-X capability: `msix_config`/`queue_msix_vector` read `NO_VECTOR`; the queues
//!   interrupt through INTx pin A = GSI 10.
//! * ISR bit 0 (queue interrupt) reads 1 whenever DRIVER_OK is set. The device raises its
//!   used-buffer notifications through the irqfd, inside KVM, so the VMM never sees them and
//!   cannot latch them; an INTx handler (Linux's `vp_interrupt`) that found 0 would count the
//!   interrupt as spurious and eventually disable the line. Reporting "maybe" costs a
//!   used-ring scan per read; our ring-3 guest polls the rings and never reads it. Bit 1
//!   (configuration change) is latched: set on detach, on a device error and when the device
//!   configuration changes; a read clears it.
//! * Queues are enabled between FEATURES_OK and DRIVER_OK (virtio 1.2 §3.1.1; we offer no
//!   `VIRTIO_F_RING_RESET`, so no enabling afterwards) and the rings must lie in guest RAM.
//! * Nothing the guest does panics: refused values leave the state as it was, with one log
//!   line (`warn` for what a correct driver never does, `debug` for harmless oddities).
//!
//! The transport is the only reader of the transport tube (it waits for each reply).
//!
//! The link to the device is a [`DeviceLink`]: [`TubeLink`] (the transport tube to a device
//! started by [`crate::device::Device`]) or `crate::vhost_frontend::VhostUserLink` (the
//! same messages as vhost-user requests to a device serving vhost-user). Everything the
//! guest sees (config space, BAR0, the queue registers, resets) is this one shared code.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostmem_base::kvm::{eventfd_as_fd, EventFd, KvmError, Vm, EFD_NONBLOCK};
use hostmem_ipc::protocol::{GuestRegion, QueueSetup, QueueStats, TransportMsg, TransportReply};
use hostmem_ipc::{Tube, MAX_FDS};

/// PCI vendor id (Red Hat, virtio).
pub const VENDOR_ID: u16 = 0x1af4;
/// PCI device id: 0x1040 + virtio device id 16 (GPU).
pub const DEVICE_ID: u16 = 0x1050;
/// PCI revision (1: a modern-only device).
pub const REVISION: u8 = 1;
/// PCI subsystem vendor id.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// PCI subsystem id.
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// PCI class code (display controller).
pub const CLASS: u8 = 0x03;
/// PCI subclass (other display controller).
pub const SUBCLASS: u8 = 0x80;
/// The GPU's PCI device number on bus 0 (function 0).
pub const PCI_DEVICE: u8 = 1;

/// First port of config mechanism #1 (the address register).
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// First data port of config mechanism #1.
pub const CONFIG_DATA_PORT: u16 = 0xcfc;

/// BAR0's size.
pub const BAR0_SIZE: u64 = 0x4000;
/// Offset of `struct virtio_pci_common_cfg` in BAR0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Offset of the ISR byte in BAR0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of `struct virtio_gpu_config` in BAR0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notify area in BAR0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// `notify_off_multiplier`: queue i notifies at `NOTIFY_OFFSET + i * 4`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Length of the common configuration (up to and including `queue_reset`).
pub const COMMON_CFG_LEN: u32 = 0x3c;
/// Length of the device configuration (`struct virtio_gpu_config`).
pub const DEVICE_CFG_LEN: u32 = 16;

/// Queues: 0 controlq, 1 cursorq.
pub const NUM_QUEUES: u16 = 2;
/// Largest queue size offered (and the initial `queue_size`).
pub const MAX_QUEUE_SIZE: u16 = 256;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_RING_EVENT_IDX` (not offered; forwarded to the device if it ever is).
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_GPU_F_VIRGL`.
pub const VIRTIO_GPU_F_VIRGL: u64 = 1 << 0;
/// `VIRTIO_GPU_F_RESOURCE_BLOB`.
pub const VIRTIO_GPU_F_RESOURCE_BLOB: u64 = 1 << 3;
/// `VIRTIO_GPU_F_CONTEXT_INIT`.
pub const VIRTIO_GPU_F_CONTEXT_INIT: u64 = 1 << 4;
/// The features the device offers.
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_GPU_F_VIRGL
    | VIRTIO_GPU_F_RESOURCE_BLOB
    | VIRTIO_GPU_F_CONTEXT_INIT;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// ISR bit 0: a queue interrupt may be pending.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// How long the transport waits for the device's reply by default.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// `VIRTIO_MSI_NO_VECTOR`.
const NO_VECTOR: u16 = 0xffff;
/// Config space: status register bit "capability list present".
const PCI_STATUS_CAP_LIST: u16 = 0x10;
/// Command register bit "memory space enable".
const PCI_COMMAND_MEMORY: u16 = 0x2;
/// BAR flags: 64-bit memory.
const BAR_MEM64: u32 = 0x4;
/// BAR flags: prefetchable.
const BAR_PREFETCH: u32 = 0x8;
/// First capability's offset in config space.
const CAP_START: usize = 0x40;
/// `PCI_CAP_ID_VNDR`.
const CAP_VENDOR: u8 = 0x09;
/// `VIRTIO_GPU_SHM_ID_HOST_VISIBLE`.
const SHM_ID_HOST_VISIBLE: u8 = 1;

/// Where the device sits in the guest's physical address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciLayout {
    /// BAR0 (`0xC000_0000`), 16 KiB, aligned to its size.
    pub bar0_gpa: u64,
    /// The hostmem window = BAR2's address, aligned to BAR2's size.
    pub window_gpa: u64,
    /// The window's size; BAR2 is this rounded up to a power of two.
    pub window_size: u64,
    /// The GSI the call eventfds raise (10, INTx pin A's interrupt line).
    pub irq_gsi: u32,
}

impl PciLayout {
    /// The fixed layout for a window of `window_size` bytes at `window_gpa`.
    pub fn new(window_gpa: u64, window_size: u64) -> PciLayout {
        PciLayout {
            bar0_gpa: 0xC000_0000,
            window_gpa,
            window_size,
            irq_gsi: 10,
        }
    }

    /// BAR2's size: the window size rounded up to a power of two (`None` if that overflows
    /// or the window is empty).
    pub fn bar2_size(&self) -> Option<u64> {
        if self.window_size == 0 {
            return None;
        }
        self.window_size.checked_next_power_of_two()
    }

    /// The guest-physical notify address of `queue`.
    pub fn notify_gpa(&self, queue: u16) -> Option<u64> {
        let off = NOTIFY_OFFSET.checked_add(u64::from(queue) * u64::from(NOTIFY_OFF_MULTIPLIER))?;
        self.bar0_gpa.checked_add(off)
    }

    fn check(&self) -> Result<(), Error> {
        let bad = |why: &str| Err(Error::BadLayout(format!("{self:?}: {why}")));
        let Some(bar2) = self.bar2_size() else {
            return bad("empty or oversized window");
        };
        if !self.bar0_gpa.is_multiple_of(BAR0_SIZE)
            || self.bar0_gpa.checked_add(BAR0_SIZE).is_none()
        {
            return bad("BAR0 misaligned or past the end of the address space");
        }
        if !self.window_gpa.is_multiple_of(bar2) || self.window_gpa.checked_add(bar2).is_none() {
            return bad("window not aligned to BAR2's size or past the end of the address space");
        }
        // The window's BAR is 64-bit; BAR0 must fit the address decode of a 64-bit BAR too,
        // and the two must not overlap.
        let bar0_end = self.bar0_gpa + BAR0_SIZE;
        let win_end = self.window_gpa + bar2;
        if self.bar0_gpa < win_end && self.window_gpa < bar0_end {
            return bad("BAR0 overlaps the window");
        }
        Ok(())
    }
}

/// Everything that can fail in the virtio-pci transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layout is unusable (misaligned, overlapping, empty window).
    #[error("bad PCI layout: {0}")]
    BadLayout(String),
    /// More guest RAM regions than one tube message can carry fds for.
    #[error("{got} guest RAM regions, at most {max} fit one message")]
    TooManyRegions {
        /// Regions given.
        got: usize,
        /// The limit ([`MAX_FDS`]).
        max: usize,
    },
    /// Creating an eventfd failed.
    #[error("creating the {what} eventfd of queue {queue}: {source}")]
    EventFd {
        /// "kick" or "call".
        what: &'static str,
        /// Queue index.
        queue: u16,
        /// The cause.
        source: std::io::Error,
    },
    /// Registering a kick ioeventfd or a call irqfd with KVM failed.
    #[error("binding the {what} eventfd of queue {queue}: {source}")]
    Bind {
        /// "kick" or "call".
        what: &'static str,
        /// Queue index.
        queue: u16,
        /// The cause.
        source: KvmError,
    },
    /// No device is attached.
    #[error("no device attached")]
    NotAttached,
    /// Setting the transport tube's timeouts failed.
    #[error("setting the transport tube's timeouts: {0}")]
    Timeouts(hostmem_ipc::Error),
    /// Sending a message to the device failed.
    #[error("sending {what} to the device: {source}")]
    Send {
        /// Which message.
        what: &'static str,
        /// The cause.
        source: hostmem_ipc::Error,
    },
    /// Receiving the device's reply failed (timeout, hang-up, malformed).
    #[error("waiting for the device's reply to {what}: {source}")]
    Recv {
        /// Which message.
        what: &'static str,
        /// The cause.
        source: hostmem_ipc::Error,
    },
    /// The device answered with a reply that does not fit the message.
    #[error("the device answered {what} (seq {seq}) with {got}")]
    UnexpectedReply {
        /// Which message.
        what: &'static str,
        /// Its sequence number.
        seq: u64,
        /// What came back.
        got: String,
    },
    /// The device refused the message.
    #[error("the device refused {what}: {reason}")]
    Refused {
        /// Which message.
        what: &'static str,
        /// Its reason.
        reason: String,
    },
    /// The link to the device failed (a vhost-user socket error, a hang-up, a timeout).
    #[error("{what} to the device: {reason}")]
    Link {
        /// Which message.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The link has no such operation (e.g. virtqueue counters over vhost-user).
    #[error("{0} is not available over this link")]
    Unsupported(&'static str),
}

/// The transport's link to the device: what it must tell the device process when the guest
/// sets the device up. Every call completes only when the device has answered.
pub trait DeviceLink: Send + std::fmt::Debug {
    /// Short name for logs and reports (`transport-tube`, `vhost-user`).
    fn name(&self) -> &'static str;
    /// Guest RAM: the regions and their memfds (sent once per device, at attach).
    fn guest_memory(
        &mut self,
        regions: &[GuestRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error>;
    /// The driver enabled queue `setup.index` with these ring addresses (guest-physical);
    /// `driver_features` are the features it accepted. `kick`/`call` are bound in KVM and
    /// stay the transport's.
    fn queue_enable(
        &mut self,
        setup: &QueueSetup,
        driver_features: u64,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), Error>;
    /// Device status 0: the device drops every queue, context and blob.
    fn reset(&mut self) -> Result<(), Error>;
    /// The device's virtqueue counters.
    fn stats(&self) -> Result<QueueStats, Error>;
}

/// The native link: [`TransportMsg`]s over the transport tube.
#[derive(Debug)]
pub struct TubeLink {
    tube: Arc<Tube>,
    /// One request/reply exchange at a time (`stats` takes `&self`).
    exchange: Mutex<()>,
    seq: AtomicU64,
}

impl TubeLink {
    /// A link over `tube`, each exchange bounded by `timeout`.
    pub fn new(tube: Arc<Tube>, timeout: Duration) -> Result<TubeLink, Error> {
        tube.set_recv_timeout(Some(timeout))
            .map_err(Error::Timeouts)?;
        tube.set_send_timeout(Some(timeout))
            .map_err(Error::Timeouts)?;
        Ok(TubeLink {
            tube,
            exchange: Mutex::new(()),
            seq: AtomicU64::new(1),
        })
    }
}

impl DeviceLink for TubeLink {
    fn name(&self) -> &'static str {
        "transport-tube"
    }

    fn guest_memory(
        &mut self,
        regions: &[GuestRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let regions = regions.to_vec();
        let reply = request(
            self,
            "GuestMemory",
            |seq| TransportMsg::GuestMemory { seq, regions },
            fds,
        )?;
        done(reply, "GuestMemory")
    }

    fn queue_enable(
        &mut self,
        setup: &QueueSetup,
        _driver_features: u64,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), Error> {
        let fds = [eventfd_as_fd(kick), eventfd_as_fd(call)];
        let queue = *setup;
        request(
            self,
            "QueueEnable",
            |seq| TransportMsg::QueueEnable { seq, queue },
            &fds,
        )
        .and_then(|r| done(r, "QueueEnable"))
    }

    fn reset(&mut self) -> Result<(), Error> {
        request(self, "Reset", |seq| TransportMsg::Reset { seq }, &[])
            .and_then(|r| done(r, "Reset"))
    }

    fn stats(&self) -> Result<QueueStats, Error> {
        match request(self, "Stats", |seq| TransportMsg::Stats { seq }, &[])? {
            TransportReply::Stats { stats, .. } => Ok(stats),
            TransportReply::Done {
                error: Some(reason),
                ..
            } => Err(Error::Refused {
                what: "Stats",
                reason,
            }),
            other => Err(Error::UnexpectedReply {
                what: "Stats",
                seq: reply_seq(&other),
                got: format!("{other:?}"),
            }),
        }
    }
}

/// How the transport hands its eventfds to the hypervisor: kick eventfds become ioeventfds
/// on the notify addresses, call eventfds irqfds on the GSI. Implemented by [`Vm`]; tests
/// may record instead.
pub trait EventBinder: Send + Sync {
    /// Signal `fd` on any guest write to the MMIO address `gpa`.
    fn bind_kick(&self, fd: &EventFd, gpa: u64) -> Result<(), KvmError>;
    /// Undo [`EventBinder::bind_kick`].
    fn unbind_kick(&self, fd: &EventFd, gpa: u64) -> Result<(), KvmError>;
    /// Raise `gsi` on each signal of `fd`.
    fn bind_call(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError>;
    /// Undo [`EventBinder::bind_call`].
    fn unbind_call(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError>;
}

impl EventBinder for Vm {
    fn bind_kick(&self, fd: &EventFd, gpa: u64) -> Result<(), KvmError> {
        self.register_ioevent_mmio(fd, gpa)
    }
    fn unbind_kick(&self, fd: &EventFd, gpa: u64) -> Result<(), KvmError> {
        self.unregister_ioevent_mmio(fd, gpa)
    }
    fn bind_call(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.register_irqfd(fd, gsi)
    }
    fn unbind_call(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.unregister_irqfd(fd, gsi)
    }
}

/// One virtqueue as the driver configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Queue {
    size: u16,
    /// What the guest reads in `queue_enable`.
    enabled: bool,
    /// The device has it (QueueEnable answered Done).
    live: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl Queue {
    const INITIAL: Queue = Queue {
        size: MAX_QUEUE_SIZE,
        enabled: false,
        live: false,
        desc: 0,
        driver: 0,
        device: 0,
    };
}

/// The virtio state a reset returns to its initial values.
#[derive(Debug, Clone, Copy)]
struct VirtioState {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    /// The driver's status bits (DEVICE_NEEDS_RESET is `needs_reset`).
    status: u8,
    needs_reset: bool,
    queue_select: u16,
    queues: [Queue; NUM_QUEUES as usize],
    isr_config: bool,
    events_read: u32,
}

impl VirtioState {
    const INITIAL: VirtioState = VirtioState {
        device_feature_select: 0,
        driver_feature_select: 0,
        driver_features: 0,
        status: 0,
        needs_reset: false,
        queue_select: 0,
        queues: [Queue::INITIAL; NUM_QUEUES as usize],
        isr_config: false,
        events_read: 0,
    };
}

/// The kick and call eventfds of one queue (bound for the transport's whole life).
#[derive(Debug)]
struct QueueEvents {
    kick: EventFd,
    kick_gpa: u64,
    call: EventFd,
}

/// Fields of the common configuration, by offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Common {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    MsixConfig,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDesc,
    QueueDriver,
    QueueDevice,
    QueueNotifyData,
    QueueReset,
}

/// `(offset, length, field)` of every common configuration field.
const COMMON_FIELDS: [(u64, usize, Common); 18] = [
    (0x00, 4, Common::DeviceFeatureSelect),
    (0x04, 4, Common::DeviceFeature),
    (0x08, 4, Common::DriverFeatureSelect),
    (0x0c, 4, Common::DriverFeature),
    (0x10, 2, Common::MsixConfig),
    (0x12, 2, Common::NumQueues),
    (0x14, 1, Common::DeviceStatus),
    (0x15, 1, Common::ConfigGeneration),
    (0x16, 2, Common::QueueSelect),
    (0x18, 2, Common::QueueSize),
    (0x1a, 2, Common::QueueMsixVector),
    (0x1c, 2, Common::QueueEnable),
    (0x1e, 2, Common::QueueNotifyOff),
    (0x20, 8, Common::QueueDesc),
    (0x28, 8, Common::QueueDriver),
    (0x30, 8, Common::QueueDevice),
    (0x38, 2, Common::QueueNotifyData),
    (0x3a, 2, Common::QueueReset),
];

/// A virtio PCI capability: cfg_type, bar, id, offset, length, extra dwords.
type CapSpec<'a> = (u8, u8, u8, u64, u64, &'a [u32]);

/// The virtio-gpu PCI function: config space, BAR0 registers, and the link to the device.
#[derive(Debug)]
pub struct VirtioPciGpu {
    binder: Arc<dyn EventBinderDebug>,
    layout: PciLayout,
    bar2_size: u64,
    guest_ram: Vec<(GuestRegion, OwnedFd)>,
    events: Vec<QueueEvents>,
    link: Option<Box<dyn DeviceLink>>,
    reply_timeout: Duration,
    /// Last num_capsets a device reported (the device cfg keeps it while detached).
    num_capsets: u32,
    config_generation: u8,
    v: VirtioState,
    // PCI state (a virtio reset leaves it alone).
    config_address: u32,
    command: u16,
    interrupt_line: u8,
    /// BAR register i was last written all-ones: it reads its size mask.
    bar_sizing: [bool; 6],
    /// Notify writes that exited to the VMM (see `notify_exit`).
    notify_exits: u64,
}

/// [`EventBinder`] + `Debug` (so the transport can derive `Debug`).
pub trait EventBinderDebug: EventBinder + std::fmt::Debug {}
impl<T: EventBinder + std::fmt::Debug> EventBinderDebug for T {}

impl VirtioPciGpu {
    /// Registers one ioeventfd per queue on its notify address and one irqfd per call
    /// eventfd on `layout.irq_gsi` (creating the eventfds; the VM needs its in-kernel irqchip,
    /// [`Vm::create_irqchip`]). `guest_ram`: the RAM regions and their memfds, sent to every
    /// device that attaches.
    pub fn new(
        vm: Arc<Vm>,
        layout: PciLayout,
        guest_ram: Vec<(GuestRegion, OwnedFd)>,
    ) -> Result<Self, Error> {
        Self::with_binder(vm, layout, guest_ram)
    }

    /// [`VirtioPciGpu::new`] with any [`EventBinder`] (tests record the bindings instead of
    /// asking KVM).
    pub fn with_binder(
        binder: Arc<dyn EventBinderDebug>,
        layout: PciLayout,
        guest_ram: Vec<(GuestRegion, OwnedFd)>,
    ) -> Result<Self, Error> {
        layout.check()?;
        let bar2_size = layout
            .bar2_size()
            .ok_or_else(|| Error::BadLayout("empty window".into()))?;
        if guest_ram.len() > MAX_FDS {
            return Err(Error::TooManyRegions {
                got: guest_ram.len(),
                max: MAX_FDS,
            });
        }
        let mut gpu = VirtioPciGpu {
            binder,
            layout,
            bar2_size,
            guest_ram,
            events: Vec::new(),
            link: None,
            reply_timeout: REPLY_TIMEOUT,
            num_capsets: 0,
            config_generation: 0,
            v: VirtioState::INITIAL,
            config_address: 0,
            command: 0,
            interrupt_line: 10,
            bar_sizing: [false; 6],
            notify_exits: 0,
        };
        // On an error, Drop unbinds what was bound so far.
        for queue in 0..NUM_QUEUES {
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                what: "kick",
                queue,
                source,
            })?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                what: "call",
                queue,
                source,
            })?;
            let kick_gpa = layout
                .notify_gpa(queue)
                .ok_or_else(|| Error::BadLayout("notify address overflows".into()))?;
            gpu.binder
                .bind_kick(&kick, kick_gpa)
                .map_err(|source| Error::Bind {
                    what: "kick",
                    queue,
                    source,
                })?;
            if let Err(source) = gpu.binder.bind_call(&call, layout.irq_gsi) {
                if let Err(e) = gpu.binder.unbind_kick(&kick, kick_gpa) {
                    log::warn!("virtio-pci: unbinding kick of queue {queue}: {e}");
                }
                return Err(Error::Bind {
                    what: "call",
                    queue,
                    source,
                });
            }
            gpu.events.push(QueueEvents {
                kick,
                kick_gpa,
                call,
            });
        }
        Ok(gpu)
    }

    /// How long each exchange with the device may take before it counts as failed
    /// (default [`REPLY_TIMEOUT`]); applies from the next [`VirtioPciGpu::attach`].
    pub fn set_reply_timeout(&mut self, t: Duration) {
        self.reply_timeout = t;
    }

    /// A (new) device behind its transport tube: [`VirtioPciGpu::attach_link`] with a
    /// [`TubeLink`] whose exchanges are bounded by the reply timeout.
    pub fn attach(&mut self, transport: Arc<Tube>, num_capsets: u32) -> Result<(), Error> {
        let link = TubeLink::new(transport, self.reply_timeout)?;
        self.attach_link(Box::new(link), num_capsets)
    }

    /// A (new) device: remember its link and num_capsets, send guest RAM and wait for the
    /// answer. Queues the guest enabled while no device was attached are then sent (unless
    /// the status says DEVICE_NEEDS_RESET: the driver must reset first). On an error the
    /// device is not attached.
    pub fn attach_link(
        &mut self,
        mut link: Box<dyn DeviceLink>,
        num_capsets: u32,
    ) -> Result<(), Error> {
        if self.link.is_some() {
            log::warn!("virtio-pci: a device attaches while another is attached; replacing it");
            self.detach();
        }
        let regions: Vec<GuestRegion> = self.guest_ram.iter().map(|(r, _)| *r).collect();
        let fds: Vec<BorrowedFd<'_>> = self.guest_ram.iter().map(|(_, fd)| fd.as_fd()).collect();
        link.guest_memory(&regions, &fds)?;
        if num_capsets != self.num_capsets {
            self.num_capsets = num_capsets;
            self.config_changed();
        }
        log::info!(
            "virtio-pci: device attached over {} ({num_capsets} capsets)",
            link.name()
        );
        self.link = Some(link);
        if !self.v.needs_reset {
            for index in 0..NUM_QUEUES {
                let pending = self.queue(index).is_some_and(|q| q.enabled && !q.live);
                if pending {
                    self.send_queue_enable(index);
                }
            }
        }
        if self.link.is_none() {
            return Err(Error::NotAttached);
        }
        Ok(())
    }

    /// The device died: forget it; set DEVICE_NEEDS_RESET in device_status and the ISR's
    /// config-change bit, bump config_generation; queues are no longer live.
    pub fn detach(&mut self) {
        if self.link.take().is_some() {
            log::info!("virtio-pci: device detached; the driver must reset");
        }
        self.v.needs_reset = true;
        for q in &mut self.v.queues {
            q.live = false;
        }
        self.config_changed();
    }

    /// Whether a device is attached.
    pub fn is_attached(&self) -> bool {
        self.link.is_some()
    }

    /// The device's QueueStats (TransportMsg::Stats), when attached.
    pub fn stats(&self) -> Result<QueueStats, Error> {
        self.link.as_ref().ok_or(Error::NotAttached)?.stats()
    }

    /// The device status the guest reads.
    pub fn device_status(&self) -> u8 {
        let needs = if self.v.needs_reset {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.v.status | needs
    }

    /// The features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn negotiated_features(&self) -> u64 {
        self.v.driver_features
    }

    /// `config_generation` as the guest reads it.
    pub fn config_generation(&self) -> u8 {
        self.config_generation
    }

    /// The layout this transport decodes.
    pub fn layout(&self) -> PciLayout {
        self.layout
    }

    /// The kick eventfd of `queue` (bound to its notify address).
    pub fn kick_eventfd(&self, queue: u16) -> Option<&EventFd> {
        self.events.get(usize::from(queue)).map(|e| &e.kick)
    }

    /// The call eventfd of `queue` (bound to the GSI).
    pub fn call_eventfd(&self, queue: u16) -> Option<&EventFd> {
        self.events.get(usize::from(queue)).map(|e| &e.call)
    }

    /// Whether the device has `queue` (the guest enabled it and the device said Done).
    pub fn queue_live(&self, queue: u16) -> bool {
        self.queue(queue).is_some_and(|q| q.live)
    }

    // ---- Port I/O: config mechanism #1 ----

    /// Port I/O exits: 0xCF8..=0xCFF. Returns false if the port is not ours.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        if !(CONFIG_ADDRESS_PORT..=CONFIG_DATA_PORT + 3).contains(&port) {
            return false;
        }
        data.fill(0xff);
        if port == CONFIG_ADDRESS_PORT && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
        } else if port >= CONFIG_DATA_PORT {
            let off = usize::from(port - CONFIG_DATA_PORT);
            if let Some(reg) = self.selected_register(off, data.len()) {
                let dword = self.config_read(reg).to_le_bytes();
                if let Some(src) = dword.get(off..off + data.len()) {
                    data.copy_from_slice(src);
                }
            }
        }
        true
    }

    /// Port I/O writes: 0xCF8..=0xCFF. Returns false if the port is not ours.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        if !(CONFIG_ADDRESS_PORT..=CONFIG_DATA_PORT + 3).contains(&port) {
            return false;
        }
        if port == CONFIG_ADDRESS_PORT {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.config_address = u32::from_le_bytes(bytes);
            } else {
                log::debug!("virtio-pci: {}-byte write to 0xcf8 ignored", data.len());
            }
        } else if port >= CONFIG_DATA_PORT {
            let off = usize::from(port - CONFIG_DATA_PORT);
            if let Some(reg) = self.selected_register(off, data.len()) {
                self.config_write(reg, off, data);
            }
        } else {
            log::debug!("virtio-pci: write to port {port:#x} ignored");
        }
        true
    }

    /// The config register (dword-aligned offset) of our function that 0xCF8 selects, if
    /// the access of `len` bytes at data port offset `off` fits the dword.
    fn selected_register(&self, off: usize, len: usize) -> Option<u8> {
        if len == 0 || off.checked_add(len)? > 4 {
            return None;
        }
        let a = self.config_address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let device = (a >> 11) & 0x1f;
        let function = (a >> 8) & 0x7;
        if !enabled || bus != 0 || device != u32::from(PCI_DEVICE) || function != 0 {
            return None;
        }
        Some((a & 0xfc) as u8)
    }

    fn bar_flags(&self, pair: usize) -> Option<(u64, u64, u32)> {
        match pair {
            0 => Some((self.layout.bar0_gpa, BAR0_SIZE, BAR_MEM64)),
            1 => Some((
                self.layout.window_gpa,
                self.bar2_size,
                BAR_MEM64 | BAR_PREFETCH,
            )),
            _ => None,
        }
    }

    /// BAR register `index`: its address, or its size mask while `sizing`.
    fn bar_value(&self, index: usize, sizing: bool) -> u32 {
        let Some((addr, size, flags)) = self.bar_flags(index / 2) else {
            return 0; // BAR4/BAR5 are not implemented: they size to 0.
        };
        let value = if sizing { !(size - 1) } else { addr };
        if index.is_multiple_of(2) {
            (value as u32 & !0xf) | flags
        } else {
            (value >> 32) as u32
        }
    }

    fn bar_read(&self, index: usize) -> u32 {
        let sizing = self.bar_sizing.get(index).copied().unwrap_or(false);
        self.bar_value(index, sizing)
    }

    /// One dword of our config space.
    fn config_read(&self, reg: u8) -> u32 {
        let le16 = |lo: u16, hi: u16| u32::from(lo) | (u32::from(hi) << 16);
        match reg {
            0x00 => le16(VENDOR_ID, DEVICE_ID),
            0x04 => le16(self.command, PCI_STATUS_CAP_LIST),
            0x08 => u32::from_le_bytes([REVISION, 0, SUBCLASS, CLASS]),
            0x0c => 0, // header type 0, single function
            0x10..=0x27 => self.bar_read(usize::from((reg - 0x10) / 4)),
            0x2c => le16(SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID),
            0x34 => CAP_START as u32,
            0x3c => u32::from_le_bytes([self.interrupt_line, 1, 0, 0]),
            _ => {
                let caps = self.capabilities();
                let at = usize::from(reg).wrapping_sub(CAP_START);
                match caps.get(at..at.saturating_add(4)) {
                    Some(b) if usize::from(reg) >= CAP_START => {
                        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                    }
                    _ => 0,
                }
            }
        }
    }

    fn config_write(&mut self, reg: u8, off: usize, data: &[u8]) {
        let mut bytes = self.config_read(reg).to_le_bytes();
        if let Some(dst) = bytes.get_mut(off..off + data.len()) {
            dst.copy_from_slice(data);
        }
        let value = u32::from_le_bytes(bytes);
        match reg {
            0x04 => {
                // The status half is RW1C and has nothing to clear.
                self.command = value as u16;
            }
            0x10..=0x27 => {
                let index = usize::from((reg - 0x10) / 4);
                let sizing = value == u32::MAX;
                if let Some(s) = self.bar_sizing.get_mut(index) {
                    *s = sizing;
                }
                if !sizing && value & !0xf != self.bar_value(index, false) & !0xf {
                    log::debug!("virtio-pci: BAR{index} write {value:#x} ignored (BARs are fixed)");
                }
            }
            0x3c => self.interrupt_line = value as u8,
            _ => log::debug!("virtio-pci: config write {value:#x} at {reg:#x} ignored"),
        }
    }

    /// The capability list, from config offset [`CAP_START`] on.
    fn capabilities(&self) -> Vec<u8> {
        let mut caps = Vec::with_capacity(0x60);
        // (cfg_type, bar, id, offset, length, extra dwords)
        let list: [CapSpec<'_>; 5] = [
            (1, 0, 0, COMMON_CFG_OFFSET, u64::from(COMMON_CFG_LEN), &[]),
            (
                2,
                0,
                0,
                NOTIFY_OFFSET,
                u64::from(NUM_QUEUES) * u64::from(NOTIFY_OFF_MULTIPLIER),
                &[NOTIFY_OFF_MULTIPLIER],
            ),
            (3, 0, 0, ISR_OFFSET, 1, &[]),
            (4, 0, 0, DEVICE_CFG_OFFSET, u64::from(DEVICE_CFG_LEN), &[]),
            (
                8,
                2,
                SHM_ID_HOST_VISIBLE,
                0,
                self.layout.window_size,
                // virtio_pci_cap64: offset_hi, length_hi.
                &[0, (self.layout.window_size >> 32) as u32],
            ),
        ];
        let last = list.len() - 1;
        for (i, (cfg_type, bar, id, offset, length, extra)) in list.iter().enumerate() {
            let len = 16 + 4 * extra.len();
            let next = if i == last {
                0
            } else {
                CAP_START + caps.len() + len
            };
            caps.extend_from_slice(&[
                CAP_VENDOR, next as u8, len as u8, *cfg_type, *bar, *id, 0, 0,
            ]);
            caps.extend_from_slice(&(*offset as u32).to_le_bytes());
            caps.extend_from_slice(&(*length as u32).to_le_bytes());
            for d in *extra {
                caps.extend_from_slice(&d.to_le_bytes());
            }
        }
        caps
    }

    // ---- BAR0 MMIO ----

    /// BAR0 offset of an access, if it starts inside BAR0.
    fn bar0_offset(&self, gpa: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.layout.bar0_gpa)?;
        (off < BAR0_SIZE).then_some(off)
    }

    /// MMIO exits inside BAR0. Returns false if the address is not ours.
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        let Some(off) = self.bar0_offset(gpa) else {
            return false;
        };
        data.fill(0xff);
        let Some((region, within)) = self.mmio_access(off, data.len()) else {
            return true;
        };
        match region {
            COMMON_CFG_OFFSET => copy_from_image(&self.common_image(), within, data),
            ISR_OFFSET => {
                data.fill(0);
                if within == 0 {
                    if let Some(b) = data.first_mut() {
                        *b = self.isr_read();
                    }
                }
            }
            DEVICE_CFG_OFFSET => copy_from_image(&self.device_cfg_image(), within, data),
            _ => data.fill(0), // notify: write-only
        }
        true
    }

    /// MMIO writes inside BAR0. Returns false if the address is not ours.
    pub fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(off) = self.bar0_offset(gpa) else {
            return false;
        };
        let Some((region, within)) = self.mmio_access(off, data.len()) else {
            return true;
        };
        match region {
            COMMON_CFG_OFFSET => self.common_write(within, data),
            ISR_OFFSET => log::debug!("virtio-pci: write to the read-only ISR ignored"),
            DEVICE_CFG_OFFSET => self.device_cfg_write(within, data),
            _ => self.notify_exit(within),
        }
        true
    }

    /// A notify write that reached the VMM (the ioeventfd should have taken it, so this is
    /// a KVM that does not match it): signal the queue's kick eventfd ourselves, so the
    /// device still sees the kick. Counted in [`VirtioPciGpu::notify_exits`].
    fn notify_exit(&mut self, within: u64) {
        self.notify_exits += 1;
        let queue = within / u64::from(NOTIFY_OFF_MULTIPLIER);
        match self.kick_eventfd(queue as u16) {
            Some(k) if within.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) => {
                if self.notify_exits == 1 {
                    log::warn!(
                        "virtio-pci: a notify write reached the VMM (no ioeventfd match); \
                         kicking queue {queue} by hand"
                    );
                }
                if let Err(e) = k.write(1) {
                    log::warn!("virtio-pci: kicking queue {queue}: {e}");
                }
            }
            _ => log::debug!("virtio-pci: notify write at notify+{within:#x} ignored"),
        }
    }

    /// Notify writes that exited to the VMM instead of hitting the ioeventfd.
    pub fn notify_exits(&self) -> u64 {
        self.notify_exits
    }

    /// `(region base, offset in region)` of an access the BAR decodes: memory decoding on,
    /// 1..=8 bytes, inside one 4 KiB region.
    fn mmio_access(&self, off: u64, len: usize) -> Option<(u64, u64)> {
        if self.command & PCI_COMMAND_MEMORY == 0 {
            log::debug!("virtio-pci: BAR0 access with memory decoding off ignored");
            return None;
        }
        let within = off % 0x1000;
        if len == 0 || len > 8 || within + len as u64 > 0x1000 {
            log::debug!("virtio-pci: {len}-byte access at BAR0+{off:#x} ignored");
            return None;
        }
        Some((off - within, within))
    }

    fn queue(&self, index: u16) -> Option<&Queue> {
        self.v.queues.get(usize::from(index))
    }

    fn selected(&self) -> Option<&Queue> {
        self.queue(self.v.queue_select)
    }

    fn isr_read(&mut self) -> u8 {
        let mut isr = 0;
        if self.v.status & status::DRIVER_OK != 0 {
            isr |= ISR_QUEUE;
        }
        if std::mem::take(&mut self.v.isr_config) {
            isr |= ISR_CONFIG;
        }
        isr
    }

    fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.v.isr_config = true;
    }

    fn common_value(&self, field: Common) -> u64 {
        let q = self.selected();
        let features = |select: u32, bits: u64| match select {
            0 => bits & 0xffff_ffff,
            1 => bits >> 32,
            _ => 0,
        };
        match field {
            Common::DeviceFeatureSelect => u64::from(self.v.device_feature_select),
            Common::DeviceFeature => features(self.v.device_feature_select, OFFERED_FEATURES),
            Common::DriverFeatureSelect => u64::from(self.v.driver_feature_select),
            Common::DriverFeature => features(self.v.driver_feature_select, self.v.driver_features),
            Common::MsixConfig | Common::QueueMsixVector => u64::from(NO_VECTOR),
            Common::NumQueues => u64::from(NUM_QUEUES),
            Common::DeviceStatus => u64::from(self.device_status()),
            Common::ConfigGeneration => u64::from(self.config_generation),
            Common::QueueSelect => u64::from(self.v.queue_select),
            Common::QueueSize => q.map_or(0, |q| u64::from(q.size)),
            Common::QueueEnable => q.map_or(0, |q| u64::from(q.enabled)),
            Common::QueueNotifyOff => {
                if q.is_some() {
                    u64::from(self.v.queue_select)
                } else {
                    0
                }
            }
            Common::QueueDesc => q.map_or(0, |q| q.desc),
            Common::QueueDriver => q.map_or(0, |q| q.driver),
            Common::QueueDevice => q.map_or(0, |q| q.device),
            Common::QueueNotifyData | Common::QueueReset => 0,
        }
    }

    fn common_image(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let mut image = [0u8; COMMON_CFG_LEN as usize];
        for (offset, len, field) in COMMON_FIELDS {
            let bytes = self.common_value(field).to_le_bytes();
            let at = offset as usize;
            if let (Some(dst), Some(src)) = (image.get_mut(at..at + len), bytes.get(..len)) {
                dst.copy_from_slice(src);
            }
        }
        image
    }

    fn common_write(&mut self, within: u64, data: &[u8]) {
        let end = within + data.len() as u64;
        let Some(&(start, len, field)) = COMMON_FIELDS
            .iter()
            .find(|(s, l, _)| *s <= within && end <= s + *l as u64)
        else {
            log::warn!(
                "virtio-pci: {}-byte common cfg write at {within:#x} does not fit one field; ignored",
                data.len()
            );
            return;
        };
        // Merge the written bytes into the field's current value (a 32-bit half of a 64-bit
        // address, a byte of a 16-bit field).
        let mut bytes = self.common_value(field).to_le_bytes();
        let at = (within - start) as usize;
        if let Some(dst) = bytes.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
        let value = u64::from_le_bytes(bytes) & (u64::MAX >> (64 - 8 * len as u32));
        self.common_set(field, value);
    }

    fn common_set(&mut self, field: Common, value: u64) {
        let sel = self.v.queue_select;
        match field {
            Common::DeviceFeatureSelect => self.v.device_feature_select = value as u32,
            Common::DriverFeatureSelect => self.v.driver_feature_select = value as u32,
            Common::DriverFeature => self.write_driver_features(value as u32),
            Common::DeviceStatus => self.write_status(value as u8),
            Common::QueueSelect => self.v.queue_select = value as u16,
            Common::QueueSize => self.write_queue_size(value as u16),
            Common::QueueEnable => match value {
                1 => self.enable_queue(sel),
                _ => log::warn!("virtio-pci: queue_enable {value} on queue {sel} ignored"),
            },
            Common::QueueDesc | Common::QueueDriver | Common::QueueDevice => {
                let Some(q) = self.v.queues.get_mut(usize::from(sel)) else {
                    log::warn!("virtio-pci: ring address for missing queue {sel} ignored");
                    return;
                };
                if q.enabled {
                    log::warn!("virtio-pci: ring address of enabled queue {sel} ignored");
                    return;
                }
                match field {
                    Common::QueueDesc => q.desc = value,
                    Common::QueueDriver => q.driver = value,
                    _ => q.device = value,
                }
            }
            Common::MsixConfig | Common::QueueMsixVector => {
                // No MSI-X: the register keeps reading NO_VECTOR, which tells the driver.
                log::debug!("virtio-pci: MSI-X vector {value:#x} ignored (no MSI-X)");
            }
            Common::QueueReset => {
                log::debug!("virtio-pci: queue_reset ignored (VIRTIO_F_RING_RESET not offered)")
            }
            Common::DeviceFeature
            | Common::NumQueues
            | Common::ConfigGeneration
            | Common::QueueNotifyOff
            | Common::QueueNotifyData => {
                log::warn!("virtio-pci: write to read-only {field:?} ignored")
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.v.status & status::FEATURES_OK != 0 {
            log::warn!("virtio-pci: driver features written after FEATURES_OK; ignored");
            return;
        }
        let f = &mut self.v.driver_features;
        match self.v.driver_feature_select {
            0 => *f = (*f & !0xffff_ffff) | u64::from(value),
            1 => *f = (*f & 0xffff_ffff) | (u64::from(value) << 32),
            sel if value != 0 => {
                log::warn!(
                    "virtio-pci: driver features {value:#x} in word {sel} ignored (none offered)"
                )
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.v.status;
        // DEVICE_NEEDS_RESET is the device's bit: a driver writing back what it read may
        // include it.
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        if old & !new != 0 {
            log::warn!(
                "virtio-pci: status {value:#x} clears bits of {old:#x} (only a reset may); ignored"
            );
            return;
        }
        let added = new & !old;
        if added & status::FEATURES_OK != 0 {
            let f = self.v.driver_features;
            if f & !OFFERED_FEATURES != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                log::warn!(
                    "virtio-pci: FEATURES_OK refused: driver features {f:#x} (offered {OFFERED_FEATURES:#x}, VERSION_1 required)"
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            log::warn!("virtio-pci: DRIVER_OK without FEATURES_OK refused");
            new &= !status::DRIVER_OK;
        }
        self.v.status = new;
    }

    fn write_queue_size(&mut self, size: u16) {
        let sel = self.v.queue_select;
        let Some(q) = self.v.queues.get_mut(usize::from(sel)) else {
            log::warn!("virtio-pci: queue_size for missing queue {sel} ignored");
            return;
        };
        if q.enabled {
            log::warn!("virtio-pci: queue_size of enabled queue {sel} ignored");
        } else if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            log::warn!("virtio-pci: queue_size {size} for queue {sel} refused (power of two <= {MAX_QUEUE_SIZE})");
        } else {
            q.size = size;
        }
    }

    /// Whether `gpa..gpa + len` lies inside one guest RAM region.
    fn in_guest_ram(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.guest_ram.iter().any(|(r, _)| {
            r.gpa
                .checked_add(r.size)
                .is_some_and(|r_end| r.gpa <= gpa && end <= r_end)
        })
    }

    fn enable_queue(&mut self, index: u16) {
        let Some(q) = self.queue(index).copied() else {
            log::warn!("virtio-pci: enabling missing queue {index} refused");
            return;
        };
        let st = self.device_status();
        let why = if q.enabled {
            Some("already enabled".to_string())
        } else if st & status::FEATURES_OK == 0 {
            Some("before FEATURES_OK".into())
        } else if st & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            Some(format!(
                "in status {st:#x} (queues are set up before DRIVER_OK)"
            ))
        } else {
            let n = u64::from(q.size);
            let event = u64::from(self.v.driver_features & VIRTIO_F_RING_EVENT_IDX != 0) * 2;
            // virtio 1.2 §2.7: descriptor table 16 n, available ring 6 + 2 n (+ used_event),
            // used ring 6 + 8 n (+ avail_event).
            let rings = [
                ("descriptor table", q.desc, 16, 16 * n),
                ("available ring", q.driver, 2, 6 + 2 * n + event),
                ("used ring", q.device, 4, 6 + 8 * n + event),
            ];
            rings.iter().find_map(|(what, gpa, align, len)| {
                if !gpa.is_multiple_of(*align) {
                    Some(format!("{what} at {gpa:#x} not {align}-byte aligned"))
                } else if !self.in_guest_ram(*gpa, *len) {
                    Some(format!("{what} at {gpa:#x}+{len:#x} outside guest RAM"))
                } else {
                    None
                }
            })
        };
        if let Some(why) = why {
            log::warn!("virtio-pci: enabling queue {index} refused: {why}");
            return;
        }
        if let Some(q) = self.v.queues.get_mut(usize::from(index)) {
            q.enabled = true;
        }
        if self.link.is_some() {
            self.send_queue_enable(index);
        } else {
            log::debug!(
                "virtio-pci: queue {index} enabled with no device attached; sent on attach"
            );
        }
    }

    /// Sends QueueEnable for `index` and waits. On a refusal the queue is disabled and the
    /// device needs a reset; on a tube failure the device is detached as well.
    fn send_queue_enable(&mut self, index: u16) {
        let (Some(link), Some(q), Some(ev)) = (
            self.link.as_mut(),
            self.v.queues.get(usize::from(index)).copied(),
            self.events.get(usize::from(index)),
        ) else {
            return;
        };
        let setup = QueueSetup {
            index,
            size: q.size,
            desc: q.desc,
            avail: q.driver,
            used: q.device,
            event_idx: self.v.driver_features & VIRTIO_F_RING_EVENT_IDX != 0,
        };
        let got = link.queue_enable(&setup, self.v.driver_features, &ev.kick, &ev.call);
        match got {
            Ok(()) => {
                if let Some(q) = self.v.queues.get_mut(usize::from(index)) {
                    q.live = true;
                }
            }
            Err(e) => {
                log::error!("virtio-pci: queue {index}: {e}; the device needs a reset");
                let transport_failed = !matches!(e, Error::Refused { .. });
                if let Some(q) = self.v.queues.get_mut(usize::from(index)) {
                    q.enabled = false;
                }
                if transport_failed {
                    self.detach();
                } else {
                    self.v.needs_reset = true;
                    self.config_changed();
                }
            }
        }
    }

    /// Device status 0: the device drops everything (the write completes only after its
    /// Done), then every virtio register is back to its initial value.
    fn reset(&mut self) {
        if let Some(link) = self.link.as_mut() {
            if let Err(e) = link.reset() {
                // The driver polls the status for 0 after a reset, so it must read 0 even so;
                // the device's next answer (or its supervisor) tells what became of it.
                log::error!("virtio-pci: device reset failed: {e}");
            }
        }
        self.v = VirtioState::INITIAL;
    }

    fn device_cfg_image(&self) -> [u8; DEVICE_CFG_LEN as usize] {
        let mut image = [0u8; DEVICE_CFG_LEN as usize];
        // events_read, events_clear (reads 0), num_scanouts 0, num_capsets.
        image[0..4].copy_from_slice(&self.v.events_read.to_le_bytes());
        image[12..16].copy_from_slice(&self.num_capsets.to_le_bytes());
        image
    }

    fn device_cfg_write(&mut self, within: u64, data: &[u8]) {
        // Only events_clear (offset 4) is writable: write 1 to clear.
        let end = within + data.len() as u64;
        if within < 4 || end > 8 {
            log::warn!("virtio-pci: write to read-only device cfg at {within:#x} ignored");
            return;
        }
        let mut clear = [0u8; 4];
        let at = (within - 4) as usize;
        if let Some(dst) = clear.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
        self.v.events_read &= !u32::from_le_bytes(clear);
    }
}

impl Drop for VirtioPciGpu {
    fn drop(&mut self) {
        for (queue, ev) in self.events.iter().enumerate() {
            if let Err(e) = self.binder.unbind_kick(&ev.kick, ev.kick_gpa) {
                log::warn!("virtio-pci: unbinding kick of queue {queue}: {e}");
            }
            if let Err(e) = self.binder.unbind_call(&ev.call, self.layout.irq_gsi) {
                log::warn!("virtio-pci: unbinding call of queue {queue}: {e}");
            }
        }
    }
}

fn copy_from_image(image: &[u8], within: u64, data: &mut [u8]) {
    data.fill(0);
    let at = within as usize;
    for (i, b) in data.iter_mut().enumerate() {
        if let Some(v) = image.get(at + i) {
            *b = *v;
        }
    }
}

fn reply_seq(r: &TransportReply) -> u64 {
    match r {
        TransportReply::Done { seq, .. } | TransportReply::Stats { seq, .. } => *seq,
    }
}

/// One exchange: send, then wait for the reply with the same seq (older replies, left by
/// an exchange that timed out, are skipped).
fn request(
    link: &TubeLink,
    what: &'static str,
    msg: impl FnOnce(u64) -> TransportMsg,
    fds: &[BorrowedFd<'_>],
) -> Result<TransportReply, Error> {
    let _one_at_a_time = link.exchange.lock().unwrap_or_else(|p| p.into_inner());
    let seq = link.seq.fetch_add(1, Ordering::Relaxed);
    link.tube
        .send(&msg(seq), fds)
        .map_err(|source| Error::Send { what, source })?;
    loop {
        let (reply, _fds) = link
            .tube
            .recv::<TransportReply>()
            .map_err(|source| Error::Recv { what, source })?;
        let got = reply_seq(&reply);
        if got == seq {
            return Ok(reply);
        }
        if got > seq {
            return Err(Error::UnexpectedReply {
                what,
                seq,
                got: format!("{reply:?}"),
            });
        }
        log::warn!("virtio-pci: stale reply {reply:?} while waiting for {what} {seq}; skipped");
    }
}

/// `Ok` for `Done { error: None }`.
fn done(reply: TransportReply, what: &'static str) -> Result<(), Error> {
    match reply {
        TransportReply::Done { error: None, .. } => Ok(()),
        TransportReply::Done {
            error: Some(reason),
            ..
        } => Err(Error::Refused { what, reason }),
        other => Err(Error::UnexpectedReply {
            what,
            seq: reply_seq(&other),
            got: format!("{other:?}"),
        }),
    }
}
