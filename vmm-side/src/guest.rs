//! The KVM guest that runs hostmem's virtio-gpu **guest driver** (`vmm-side/guest/`,
//! freestanding C built by `build.rs`).
//!
//! Guest RAM is a memfd: the VMM registers it with KVM as memslot [`RAM_SLOT`] at GPA 0 and
//! hands the same memfd to the device (the virtio-pci transport sends it as
//! `TransportMsg::GuestMemory`), so the driver's virtqueues live in memory both see. The
//! vCPU runs in 64-bit ring 3 (this machine's KVM emulates ring 0; ring 3 runs natively),
//! with IOPL 3 for port I/O and interrupts off: the driver polls the used ring.
//!
//! [`GuestVm::run_until_event`] runs the vCPU and serves its exits: PCI configuration ports
//! and BAR0 go to the [`VirtioPciGpu`] transport, reads of window ranges without a memslot
//! (per-blob-slot mode's holes) read zero and are counted, and the driver's event port
//! ends the call with a [`GuestEvent`]. Queue notifications never exit: they are
//! `KVM_IOEVENTFD`s the device waits on.
//!
//! The ABI (params and results pages, events) is `guest/abi.h`; the offsets below mirror it
//! and the C side checks them with `_Static_assert`.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use hostmem_base::kvm::kvm_bindings::kvm_regs;
use hostmem_base::kvm::kvm_ioctls::VcpuExit;
use hostmem_base::kvm::{Vcpu, Vm};
use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_ipc::protocol::GuestRegion;
use serde::Serialize;

use crate::probe::{long_mode_sregs, write_tables};
use crate::virtio_pci::VirtioPciGpu;

/// The guest driver's flat image.
const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-driver.bin"));

/// Memslot of guest RAM.
pub const RAM_SLOT: u32 = 0;
/// Guest RAM size: page tables, params/results, the driver image (rings and command
/// buffers in its bss) and its stack fit in 2 MiB; the rest is room.
pub const RAM_SIZE: usize = 8 << 20;

/// The TSS, whose I/O permission bitmap allows every port. Ring 3 with IOPL 3 should not
/// need one, but this KVM's port I/O emulation checks the bitmap anyway: with no bitmap
/// inside the TSS limit (the probe's 0x67-byte TSS) every port from 0x340 up (the PCI
/// configuration ports among them) raised #GP and the guest triple-faulted.
const TSS_GPA: u64 = 0x6_0000;
/// Offset of the I/O bitmap in the TSS (right after the 104-byte 64-bit TSS).
const IO_BITMAP_OFFSET: u64 = 0x68;
const PARAMS_GPA: u64 = 0x8_0000;
const RESULTS_GPA: u64 = 0x8_1000;
const RESULTS_LEN: usize = 8720;
const IMAGE_GPA: u64 = 0x10_0000;
const IMAGE_MAX: usize = 0xf_0000;
const STACK_TOP: u64 = 0x20_0000;
const EVENT_PORT: u16 = 0x11;
const PARAMS_MAGIC: u64 = 0x4853_4f4d_454d_4850;

/// Guest failures.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Setting up guest RAM, page tables or the vCPU failed.
    #[error("guest setup: {0}")]
    Setup(String),
    /// A vCPU ioctl failed.
    #[error("vCPU: {0}")]
    Vcpu(#[from] hostmem_base::kvm::kvm_ioctls::Error),
    /// The guest stopped in a way it never should (shutdown, internal error, an access to
    /// an address nobody serves).
    #[error("guest stopped: {0}")]
    Stopped(String),
}

fn setup<E: std::fmt::Display>(e: E) -> GuestError {
    GuestError::Setup(e.to_string())
}

/// [`GuestParams::ops_capset`] (`OPS_NONE` in `abi.h`): the backend takes no FILL or
/// CHECKSUM streams (virgl without its test ops), so the guest writes each blob's pattern
/// through the window itself and checks it there.
pub const OPS_NONE: u32 = u32::MAX;

/// What the driver is asked to do (`struct params`).
#[derive(Debug, Clone, Copy)]
pub struct GuestParams {
    /// Blobs to create and map.
    pub blobs: u64,
    /// Seed of the driver's generator.
    pub seed: u64,
    /// Most blobs mapped at once (the driver caps it at 4096).
    pub max_live: u64,
    /// Commands per batch (blobs created, filled and mapped with one kick), at most 16.
    pub batch: u64,
    /// Capset of the context the blobs live in (0: the default).
    pub ctx_capset: u32,
    /// Non-zero: FILL and CHECKSUM streams go to a second context of this capset;
    /// [`OPS_NONE`]: no streams, the guest writes each blob's pattern itself.
    pub ops_capset: u32,
    /// Per-blob-slot mode: unmapped window ranges are holes.
    pub holes_expected: bool,
    /// Test knob (0 in real runs): after the warm-up the driver raises `EV_PROGRESS` (past
    /// the workload), `EV_WARMED_UP` and `EV_DEVICE_LOST` this many times each, as a
    /// hostile guest could.
    pub flood_events: u64,
}

/// An event the driver raised (`EV_*` in `abi.h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// The warm-up blob is done: take the resource baseline now.
    WarmedUp,
    /// This many blobs are done.
    Progress(u64),
    /// The driver has polled this long for a response: look at the device.
    Waiting(u64),
    /// Everything is unmapped and unreferenced.
    Drained,
    /// The driver saw DEVICE_NEEDS_RESET with this many blobs live and resets the device.
    DeviceLost(u64),
    /// The driver finished; the results are final.
    Done,
    /// The driver gave up (the reason).
    Fatal(String),
    /// After a loss, the driver set the new device up; no blob is live yet.
    Reinitialised,
    /// Not the driver's: the transport declared the device lost
    /// ([`VirtioPciGpu::lost`]) during the guest's last access, which completes when the
    /// vCPU runs again. The supervisor must stop the device (and
    /// [`VirtioPciGpu::detach`]) first.
    TransportLost(String),
}

/// [`run_vcpu`]'s code for [`GuestEvent::TransportLost`] (the driver's codes are 1..=8).
const TRANSPORT_LOST: u32 = u32::MAX;

/// Latency summary from the driver's histograms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TickLatency {
    /// Median in TSC ticks.
    pub p50_ticks: u64,
    /// 99th percentile in TSC ticks.
    pub p99_ticks: u64,
    /// Samples.
    pub samples: u64,
}

/// Width of the test pattern the driver draws on scanout 0 (`DRAW_WIDTH` in `abi.h`).
pub const DRAW_WIDTH: u32 = 64;
/// Its height (`DRAW_HEIGHT`).
pub const DRAW_HEIGHT: u32 = 64;
const DRAW_SALT: u64 = 0x6472_6177;

/// Pixel `(x, y)` of the driver's test pattern for `seed` (`draw_pixel` in `driver.c`):
/// B8G8R8X8 as a little-endian `u32`, X = 0xff.
pub fn draw_pixel(seed: u64, x: u32, y: u32) -> u32 {
    let mut z = (seed ^ DRAW_SALT ^ (u64::from(y) << 32 | u64::from(x)))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32 | 0xff00_0000
}

/// Pixels of `frame` (`width × 4` bytes a row, B8G8R8X8) that are not the driver's test
/// pattern for `seed`; a frame of another size counts every pixel of the pattern.
pub fn draw_mismatches(seed: u64, width: u32, height: u32, pixels: &[u8]) -> u64 {
    let n = u64::from(DRAW_WIDTH) * u64::from(DRAW_HEIGHT);
    if (width, height) != (DRAW_WIDTH, DRAW_HEIGHT) || pixels.len() as u64 != n * 4 {
        return n;
    }
    pixels
        .chunks_exact(4)
        .enumerate()
        .filter(|(i, p)| {
            let (x, y) = ((*i as u32) % DRAW_WIDTH, (*i as u32) / DRAW_WIDTH);
            u32::from_le_bytes([p[0], p[1], p[2], p[3]]) != draw_pixel(seed, x, y)
        })
        .count() as u64
}

/// Width and height of the cursor image the driver sends (`CURSOR_SIZE` in `abi.h`).
pub const CURSOR_SIZE: u32 = 64;
const CURSOR_SALT: u64 = 0x6375_7273;
const BLOB_SCANOUT_SALT: u64 = 0x626c_6f62;

/// The cursor image the driver sends for `seed` (`cursor` in `driver.c`): [`draw_pixel`]
/// of `seed ^ CURSOR_SALT`, B8G8R8A8, `CURSOR_SIZE × 4` bytes a row.
pub fn cursor_image(seed: u64) -> Vec<u8> {
    (0..CURSOR_SIZE)
        .flat_map(|y| (0..CURSOR_SIZE).map(move |x| (x, y)))
        .flat_map(|(x, y)| draw_pixel(seed ^ CURSOR_SALT, x, y).to_le_bytes())
        .collect()
}

/// The bytes of the blob the driver shows with `SET_SCANOUT_BLOB` (`blob_scanout` in
/// `driver.c`): the shm backend's FILL pattern of `seed ^ BLOB_SCANOUT_SALT`, its first
/// `DRAW_WIDTH × DRAW_HEIGHT × 4` bytes (stride = a row, offset 0).
pub fn blob_scanout_bytes(seed: u64) -> Vec<u8> {
    let len = (DRAW_WIDTH * DRAW_HEIGHT * 4) as usize;
    hostmem_device::backend::shm::pattern_bytes(seed ^ BLOB_SCANOUT_SALT, 0, len)
}

/// Pixels (4 bytes each) of a `width × height` frame that are not the driver's scanout
/// blob for `seed`; a frame of another size counts every pixel.
pub fn blob_scanout_mismatches(seed: u64, width: u32, height: u32, pixels: &[u8]) -> u64 {
    let want = blob_scanout_bytes(seed);
    if (width, height) != (DRAW_WIDTH, DRAW_HEIGHT) || pixels.len() != want.len() {
        return u64::from(DRAW_WIDTH) * u64::from(DRAW_HEIGHT);
    }
    pixels
        .chunks_exact(4)
        .zip(want.chunks_exact(4))
        .filter(|(a, b)| a != b)
        .count() as u64
}

/// The driver's results page (`struct results`).
#[derive(Debug, Clone, Default)]
pub struct GuestResults {
    /// Commands completed through the controlq.
    pub commands: u64,
    /// Commands answered with an error or an unexpected response type.
    pub errors: u64,
    /// Most commands in the controlq at once.
    pub in_flight_max: u64,
    /// Checks that matched.
    pub verified: u64,
    /// Checks that did not.
    pub mismatches: u64,
    /// Blobs mapped.
    pub blobs_mapped: u64,
    /// Used-ring polls while waiting.
    pub polls: u64,
    /// Notify writes (kicks).
    pub kicks: u64,
    /// GET_CAPSET_INFO answered.
    pub capsets: u64,
    /// Device re-initialisations after a loss.
    pub device_resets: u64,
    /// Commands in flight when the device was lost.
    pub lost_commands: u64,
    /// Resets that read DEVICE_NEEDS_RESET instead of 0 (the device was lost during them;
    /// the driver reset again).
    pub resets_refused: u64,
    /// Test patterns the driver drew and flushed on scanout 0 ([`draw_pixel`]).
    pub frames_drawn: u64,
    /// `UPDATE_CURSOR`s and `MOVE_CURSOR`s sent and used.
    pub cursor_commands: u64,
    /// The cursor as the driver left it: scanout, x, y, resource, hot_x, hot_y.
    pub cursor_sent: [u32; 6],
    /// Blobs shown with `SET_SCANOUT_BLOB` on scanout 0 and flushed.
    pub blob_scanouts: u64,
    /// `num_scanouts` of the device configuration, as the driver read it.
    pub num_scanouts: u64,
    /// TSC at the start and the end of the workload.
    pub tsc: (u64, u64),
    /// MAP_BLOB latency (submit to used entry seen).
    pub map: TickLatency,
    /// UNMAP_BLOB (or UNREF of a mapped blob) latency.
    pub unmap: TickLatency,
    /// Last error: (response type, command type).
    pub last_error: (u64, u64),
    /// Window offsets of the first mismatches.
    pub mismatch_at: Vec<u64>,
    /// The driver's message (why it gave up, or a note).
    pub message: String,
}

/// The representative value of histogram bucket `b` (`record` in `driver.c`).
fn bucket_ticks(b: usize) -> u64 {
    let (lg, mant) = ((b / 16) as u32, (b % 16) as u64);
    if lg >= 4 {
        ((16 + mant) << (lg - 4)) + ((1u64 << (lg - 4)) >> 1)
    } else {
        (16 + mant) >> (4 - lg)
    }
}

fn hist_latency(h: &[u32]) -> TickLatency {
    let total: u64 = h.iter().map(|&c| u64::from(c)).sum();
    let at = |q: f64| -> u64 {
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (b, &c) in h.iter().enumerate() {
            seen += u64::from(c);
            if seen >= want {
                return bucket_ticks(b);
            }
        }
        0
    };
    if total == 0 {
        return TickLatency::default();
    }
    TickLatency {
        p50_ticks: at(0.5),
        p99_ticks: at(0.99),
        samples: total,
    }
}

/// The guest: its RAM memfd, the vCPU and the exits it serves.
pub struct GuestVm {
    vcpu: Vcpu,
    ram_fd: SharedMemory,
    ram: Arc<MemoryMapping>,
    window_gpa: u64,
    window_size: u64,
    holes: u64,
    exits: u64,
}

impl std::fmt::Debug for GuestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestVm")
            .field("window_gpa", &self.window_gpa)
            .field("window_size", &self.window_size)
            .field("holes", &self.holes)
            .field("exits", &self.exits)
            .finish()
    }
}

impl GuestVm {
    /// Guest RAM (a memfd, memslot [`RAM_SLOT`] at GPA 0), page tables covering RAM, the
    /// window and BAR0 (`bar0`: its GPA range), the driver image and its params. The vCPU
    /// must be created after the in-kernel irqchip, so the transport exists first.
    pub fn new(
        vm: Arc<Vm>,
        window_gpa: u64,
        window_size: u64,
        bar0: (u64, u64),
        params: &GuestParams,
    ) -> Result<GuestVm, GuestError> {
        let window_end = window_gpa
            .checked_add(window_size)
            .filter(|_| window_size > 0)
            .ok_or_else(|| setup("empty or overflowing window"))?;
        if window_gpa < RAM_SIZE as u64 {
            return Err(setup("the window must lie above guest RAM"));
        }
        if IMAGE.len() > IMAGE_MAX {
            return Err(setup(format!(
                "guest driver image of {} bytes is too large",
                IMAGE.len()
            )));
        }
        let ram_fd = SharedMemory::new("hostmem-guest-ram", RAM_SIZE as u64).map_err(setup)?;
        // The device maps guest RAM too: it must never shrink it under KVM's mapping (a guest
        // access would fail KVM_RUN, a VMM access raise SIGBUS) nor add a seal the VMM did
        // not put there (issue 14).
        ram_fd.seal_for_sharing().map_err(setup)?;
        let ram = Arc::new(
            MemoryMapping::from_fd(
                std::os::fd::AsFd::as_fd(&ram_fd),
                0,
                RAM_SIZE,
                Prot::READ_WRITE,
            )
            .map_err(setup)?,
        );
        write_tables(&ram, &[(window_gpa, window_end), bar0]).map_err(setup)?;
        ram.write_slice(IMAGE_GPA as usize, IMAGE).map_err(setup)?;
        let mut p = [0u8; 64];
        for (at, v) in [
            (0, PARAMS_MAGIC),
            (8, params.blobs),
            (16, params.seed),
            (24, params.max_live),
            (32, params.batch),
            (40, params.flood_events),
        ] {
            p[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        for (at, v) in [
            (48, params.ctx_capset),
            (52, params.ops_capset),
            (56, u32::from(params.holes_expected)),
        ] {
            p[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        ram.write_slice(PARAMS_GPA as usize, &p).map_err(setup)?;
        vm.set_region(RAM_SLOT, 0, ram.clone(), 0, RAM_SIZE)
            .map_err(setup)?;
        let vcpu = vm.create_vcpu(0).map_err(setup)?;
        // TSS: I/O map base at 0x66, an all-zero bitmap (every port allowed) and the 0xff
        // byte the architecture wants after it.
        ram.write_slice(
            (TSS_GPA + 0x66) as usize,
            &(IO_BITMAP_OFFSET as u16).to_le_bytes(),
        )
        .map_err(setup)?;
        ram.write_slice((TSS_GPA + IO_BITMAP_OFFSET + 8192) as usize, &[0xff])
            .map_err(setup)?;
        let mut sregs = long_mode_sregs(vcpu.get_sregs()?);
        sregs.tr.base = TSS_GPA;
        sregs.tr.limit = (IO_BITMAP_OFFSET + 8192) as u32;
        vcpu.set_sregs(&sregs)?;
        vcpu.set_regs(&kvm_regs {
            rip: IMAGE_GPA,
            rsp: STACK_TOP,
            rflags: 0x3002, // IOPL 3 so ring 3 may use port I/O; IF clear; bit 1 reserved
            ..Default::default()
        })?;
        Ok(GuestVm {
            vcpu,
            ram_fd,
            ram,
            window_gpa,
            window_size,
            holes: 0,
            exits: 0,
        })
    }

    /// Guest RAM as the transport hands it to devices: the region and a dup of its memfd.
    pub fn ram_region(&self) -> Result<(GuestRegion, OwnedFd), GuestError> {
        Ok((
            GuestRegion {
                gpa: 0,
                size: RAM_SIZE as u64,
                fd_offset: 0,
            },
            self.ram_fd.try_clone_fd().map_err(setup)?,
        ))
    }

    /// Reads of window ranges with no memslot behind them (per-blob-slot mode).
    pub fn holes(&self) -> u64 {
        self.holes
    }

    /// Exits the VMM served (port I/O and MMIO), events included.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// Runs the vCPU until the driver raises an event, serving PCI and BAR0 accesses
    /// through `pci` on the way.
    pub fn run_until_event(&mut self, pci: &mut VirtioPciGpu) -> Result<GuestEvent, GuestError> {
        let window = (self.window_gpa, self.window_size);
        let (mut holes, mut exits) = (0u64, 0u64);
        let code = run_vcpu(&mut self.vcpu, window, pci, &mut holes, &mut exits);
        self.holes += holes;
        self.exits += exits;
        let code = code?;
        if code == TRANSPORT_LOST {
            return Ok(GuestEvent::TransportLost(
                pci.lost().unwrap_or("the device is lost").to_string(),
            ));
        }
        let arg = self.read_u64(RESULTS_GPA)?;
        Ok(match code {
            1 => GuestEvent::Done,
            2 => GuestEvent::WarmedUp,
            3 => GuestEvent::Progress(arg),
            4 => GuestEvent::Waiting(arg),
            5 => GuestEvent::Drained,
            6 => GuestEvent::DeviceLost(arg),
            7 => GuestEvent::Fatal(self.results()?.message),
            8 => GuestEvent::Reinitialised,
            other => GuestEvent::Fatal(format!("unknown guest event {other}")),
        })
    }

    fn read_u64(&self, gpa: u64) -> Result<u64, GuestError> {
        let mut b = [0u8; 8];
        self.ram.read_slice(gpa as usize, &mut b).map_err(setup)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The driver's results page as it is now.
    pub fn results(&self) -> Result<GuestResults, GuestError> {
        let mut page = vec![0u8; RESULTS_LEN];
        self.ram
            .read_slice(RESULTS_GPA as usize, &mut page)
            .map_err(setup)?;
        let q = |at: usize| {
            page.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let hist = |at: usize| -> Vec<u32> {
            page.get(at..at + 4096)
                .unwrap_or(&[])
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let mismatches = q(40);
        let message = page.get(8400..8656).unwrap_or(&[]);
        let end = message
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(message.len());
        Ok(GuestResults {
            commands: q(8),
            errors: q(16),
            in_flight_max: q(24),
            verified: q(32),
            mismatches,
            blobs_mapped: q(48),
            polls: q(56),
            kicks: q(64),
            capsets: q(72),
            device_resets: q(80),
            lost_commands: q(88),
            resets_refused: q(8656),
            frames_drawn: q(8664),
            cursor_commands: q(8672),
            cursor_sent: std::array::from_fn(|i| {
                page.get(8680 + 4 * i..8684 + 4 * i)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u32::from_le_bytes)
            }),
            blob_scanouts: q(8704),
            num_scanouts: q(8712),
            tsc: (q(96), q(104)),
            map: hist_latency(&hist(208)),
            unmap: hist_latency(&hist(4304)),
            last_error: (q(128), q(136)),
            mismatch_at: (0..mismatches.min(8) as usize)
                .map(|i| q(144 + 8 * i))
                .collect(),
            message: String::from_utf8_lossy(&message[..end]).into_owned(),
        })
    }
}

fn in_window(window: (u64, u64), gpa: u64, len: usize) -> bool {
    gpa >= window.0
        && gpa
            .checked_add(len as u64)
            .is_some_and(|end| end <= window.0 + window.1)
}

/// Runs `vcpu` until the driver's event port; returns the event code.
fn run_vcpu(
    vcpu: &mut Vcpu,
    window: (u64, u64),
    pci: &mut VirtioPciGpu,
    holes: &mut u64,
    exits: &mut u64,
) -> Result<u32, GuestError> {
    loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(GuestError::Vcpu(e)),
        };
        *exits += 1;
        let event = match exit {
            VcpuExit::IoOut(EVENT_PORT, data) => {
                let mut code = [0u8; 4];
                let n = data.len().min(4);
                code[..n].copy_from_slice(&data[..n]);
                Some(u32::from_le_bytes(code))
            }
            VcpuExit::IoOut(port, data) => {
                if !pci.pio_write(port, data) {
                    log::debug!("guest wrote {data:?} to unclaimed port {port:#x}");
                }
                None
            }
            VcpuExit::IoIn(port, data) => {
                if !pci.pio_read(port, data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::MmioRead(gpa, data) => {
                if !pci.mmio_read(gpa, data) {
                    data.fill(0);
                    if in_window(window, gpa, data.len()) {
                        *holes += 1;
                    } else {
                        return Err(GuestError::Stopped(format!(
                            "read of {} bytes at {gpa:#x}: no memory and no device there",
                            data.len()
                        )));
                    }
                }
                None
            }
            VcpuExit::MmioWrite(gpa, data) => {
                if !pci.mmio_write(gpa, data) {
                    if in_window(window, gpa, data.len()) {
                        *holes += 1;
                    } else {
                        return Err(GuestError::Stopped(format!(
                            "write of {} bytes at {gpa:#x}: no memory and no device there",
                            data.len()
                        )));
                    }
                }
                None
            }
            VcpuExit::Intr => None,
            VcpuExit::Hlt => {
                return Err(GuestError::Stopped(
                    "the driver returned from driver_main (hlt)".into(),
                ))
            }
            other => {
                let what = format!("{other:?}");
                let at = vcpu
                    .get_regs()
                    .map(|r| format!(" at rip {:#x} rsp {:#x}", r.rip, r.rsp))
                    .unwrap_or_default();
                return Err(GuestError::Stopped(format!("{what}{at}")));
            }
        };
        if let Some(code) = event {
            return Ok(code);
        }
        if pci.lost().is_some() {
            // The access that made the transport give up on the device (a reset it did not
            // complete) completes only after the supervisor stopped the device.
            return Ok(TRANSPORT_LOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_round_trip_within_a_sixteenth() {
        // The C side's bucket of `t` (record() in driver.c).
        let bucket = |t: u64| {
            let lg = 63 - (t | 1).leading_zeros();
            let mant = if lg >= 4 {
                (t >> (lg - 4)) & 0xf
            } else {
                (t << (4 - lg)) & 0xf
            };
            (lg * 16) as usize + mant as usize
        };
        for t in [1u64, 7, 16, 17, 100, 4096, 123_456, 98_765_432] {
            let v = bucket_ticks(bucket(t));
            assert!(v.abs_diff(t) * 16 <= t.max(16), "{t} -> {v}");
        }
        let mut h = vec![0u32; 1024];
        h[bucket(1000)] = 99;
        h[bucket(50_000)] = 1;
        let l = hist_latency(&h);
        assert_eq!(l.samples, 100);
        assert!(l.p50_ticks.abs_diff(1000) < 64, "{l:?}");
        assert!(l.p99_ticks.abs_diff(1000) < 64, "{l:?}");
        assert_eq!(hist_latency(&[0; 1024]).samples, 0);
    }

    #[test]
    fn the_image_is_built_and_fits() {
        assert!(!IMAGE.is_empty() && IMAGE.len() <= IMAGE_MAX);
    }
}
