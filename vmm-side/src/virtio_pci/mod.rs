//! The virtio-pci transport of the GPU (virtio 1.2 §4.1), the supervisor side of a
//! crosvm-style split: the guest's PCI config cycles and BAR0 accesses exit to the VMM and
//! land here; everything the device process must know (guest RAM, queue addresses with kick
//! and call eventfds, resets) travels over the transport tube as [`TransportMsg`](hostmem_ipc::protocol::TransportMsg)s, each
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
//!
//! Files: this one holds the layout, the errors, the state and the accessors;
//! `config_space.rs` the PCI configuration space, `bar0.rs` the registers in BAR0 (common
//! configuration, ISR, device configuration, notify), `link.rs` the [`DeviceLink`] trait, the
//! native [`TubeLink`] and the exchanges with the device process.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use hostmem_base::kvm::{EventFd, KvmError, Vm, EFD_NONBLOCK};
use hostmem_base::log_limit::LogLimiter;
use hostmem_base::shm::{file_facts, FileFacts};
use hostmem_ipc::protocol::GuestRegion;
use hostmem_ipc::MAX_FDS;

mod bar0;
mod config_space;
mod link;

pub use link::{DeviceLink, TubeLink};

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

// The feature bits, shared with the vhost-user backend (`VIRTIO_F_RING_EVENT_IDX` is not
// offered here; forwarded to the device if it ever is).
pub use hostmem_device::features::{
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_GPU_F_CONTEXT_INIT, VIRTIO_GPU_F_EDID,
    VIRTIO_GPU_F_RESOURCE_BLOB, VIRTIO_GPU_F_RESOURCE_UUID, VIRTIO_GPU_F_VIRGL,
};
/// The features the device offers: the GPU's ([`hostmem_device::features::GPU_FEATURES`]).
pub const OFFERED_FEATURES: u64 = hostmem_device::features::GPU_FEATURES;

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
    /// A guest RAM memfd is not sealed for sharing (F_SEAL_SHRINK|GROW|SEAL): a device it
    /// is handed to could shrink it under KVM's mapping or write-seal it.
    #[error("guest RAM region {index}: not sealed for sharing (seals {seals:?})")]
    UnsealedRam {
        /// Which region.
        index: usize,
        /// Its seals (`None`: not a memfd).
        seals: Option<i32>,
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
    /// The device did not answer within the exchange's deadline (it sent only stale
    /// replies meanwhile).
    #[error("the device did not answer {what} within {timeout:?}")]
    NoAnswer {
        /// Which message.
        what: &'static str,
        /// The deadline.
        timeout: Duration,
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

/// The virtio-gpu PCI function: config space, BAR0 registers, and the link to the device.
#[derive(Debug)]
pub struct VirtioPciGpu {
    binder: Arc<dyn EventBinderDebug>,
    layout: PciLayout,
    bar2_size: u64,
    guest_ram: Vec<(GuestRegion, OwnedFd)>,
    events: Vec<QueueEvents>,
    link: Option<Box<dyn DeviceLink>>,
    /// The device was declared lost (a reset it did not complete, a link that failed): why.
    /// Until its supervisor has stopped it ([`VirtioPciGpu::detach`]) no reset completes.
    lost: Option<String>,
    /// The window the device places in: after a reset the device answered, nothing of it
    /// may be left there.
    window: Option<Arc<crate::hostmem::Hostmem>>,
    reply_timeout: Duration,
    /// Last num_capsets a device reported (the device cfg keeps it while detached).
    num_capsets: u32,
    /// num_scanouts of the device cfg: the last device's (`Ready`), 1 before any (Linux's
    /// driver refuses a GPU without scanouts).
    num_scanouts: u32,
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
    /// What the guest (bad register writes) or the device (refused queue set-ups) made the
    /// transport refuse, by kind: logged the 1st, 2nd, 4th, … time, all counted.
    warnings: LogLimiter,
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
        // Every device that attaches gets these fds, over either link (the transport tube
        // or vhost-user's SET_MEM_TABLE): only RAM the device can neither resize nor seal.
        for (index, (_, fd)) in guest_ram.iter().enumerate() {
            let facts = file_facts(fd.as_fd()).ok();
            if !facts.as_ref().is_some_and(FileFacts::sealed_for_sharing) {
                return Err(Error::UnsealedRam {
                    index,
                    seals: facts.and_then(|f| f.seals),
                });
            }
        }
        let mut gpu = VirtioPciGpu {
            binder,
            layout,
            bar2_size,
            guest_ram,
            events: Vec::new(),
            link: None,
            lost: None,
            window: None,
            reply_timeout: REPLY_TIMEOUT,
            num_capsets: 0,
            num_scanouts: 1,
            config_generation: 0,
            v: VirtioState::INITIAL,
            config_address: 0,
            command: 0,
            interrupt_line: 10,
            bar_sizing: [false; 6],
            notify_exits: 0,
            warnings: LogLimiter::new("hostmem_vmm::virtio_pci"),
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

    /// The window the attached devices place in: a reset the device answered is complete
    /// only if no placement is left in it; otherwise the device is declared lost.
    pub fn watch_window(&mut self, hostmem: Arc<crate::hostmem::Hostmem>) {
        self.window = Some(hostmem);
    }

    /// Why the transport declared the device lost, until its supervisor stopped it (and
    /// said so with [`VirtioPciGpu::detach`]). While this is `Some`, the guest reads
    /// `DEVICE_NEEDS_RESET` and no reset completes: the supervisor must stop the device
    /// (kill it, restore the window) before the guest runs again.
    pub fn lost(&self) -> Option<&str> {
        self.lost.as_deref()
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

    /// Every warning the guest or the device caused in the transport, by kind (logged or
    /// not), with the link's stale replies.
    pub fn warnings(&self) -> std::collections::BTreeMap<String, u64> {
        let mut w = self.warnings.counts();
        hostmem_base::log_limit::merge_counts(&mut w, &link::LINK_WARNINGS.counts());
        w
    }

    /// The memfds of guest RAM that every attaching device gets (to record them with
    /// [`Hostmem::note_given`](crate::hostmem::Hostmem::note_given)).
    pub fn guest_ram_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.guest_ram.iter().map(|(_, fd)| fd.as_fd())
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

    fn queue(&self, index: u16) -> Option<&Queue> {
        self.v.queues.get(usize::from(index))
    }

    fn selected(&self) -> Option<&Queue> {
        self.queue(self.v.queue_select)
    }

    fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.v.isr_config = true;
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
