//! `hostmem bench`: the memslot-per-blob problem measured side by side, with the physical
//! floor, all on real KVM.
//!
//! Six cases run the **same** blobs (sizes, offsets, fill seeds from one seed) in one run,
//! interleaved in round-robin batches so that machine noise hits them alike:
//!
//! | case | what it is |
//! |---|---|
//! | `floor` | `Window::place` + `Window::restore` (MAP_FIXED) in one process, no checks, no IPC |
//! | `fixed-inproc` | the device's [`Gpu`](hostmem_device::gpu::Gpu) handler in the VMM's process, placing through [`Hostmem`](crate::hostmem::Hostmem) in fixed mode (QEMU with the map_fixed patch) |
//! | `slot-inproc` | the same with a memslot per blob (QEMU before it) |
//! | `fixed-sandboxed` | the product: jailed device, commands on its real virtqueue (the host-side [`QueueDriver`](crate::queue_driver::QueueDriver)), tubes, validation, mirror placement in both processes |
//! | `slot-sandboxed` | the same path with a memslot per blob |
//! | `fixed-sandboxed-pipelined` | as `fixed-sandboxed`, with `queue_depth` commands in flight |
//! | `vhost-user-sandboxed` | as `fixed-sandboxed` over vhost-user (`SHMEM_MAP` into the VMM's window), run with it ([`vhost_user`]) |
//!
//! Every case owns a VM whose window is read by a ring-3 [`GuestProbe`](crate::probe::GuestProbe) vCPU. One cycle is
//! MAP_BLOB (timed), the guest reads the blob (must see its pattern), UNMAP_BLOB (timed), the
//! guest reads the offset again (must no longer see the blob), then the guest re-reads a
//! fixed working set of its own RAM and that time is the **refault** cost (a memslot delete
//! makes KVM zap far more than the blob). Levels of background placements (4 KiB blobs that
//! stay mapped) give the cycle cost against live placements.
//!
//! After the timed levels, a **remap test** per case: synchronous remaps of two blobs with
//! different patterns at one offset (the guest reads after every acknowledged map/unmap:
//! seeing the previous content is a *stale read*, an access without memory behind it is a
//! *hole*), then thousands of remaps while a vCPU spins on reads of that offset on another
//! thread (holes counted; zeros between an unmap and the next map are the background the
//! design requires and are reported separately), and a final check that the spinning guest
//! sees the last blob and nothing older.
//!
//! Throughput and latency are separate columns: latency is per command, from the kick to
//! the used-ring entry; throughput is map+unmap pairs per second of wall time; each is
//! compared with the floor's same figure. A traced run of synchronous commands gives the
//! per-hop breakdown (`breakdown`), and `--growth` the window's cost as it grows
//! (`growth`).
//!
//! Every ratio is also computed per round (round `r` of one case over round `r` of the
//! other: batches that met the same noise), and the targets are judged on the median of the
//! rounds, reported with its interquartile range. Each case's CPU time per pair (the VMM's,
//! the device's, the guest's part) is measured over the same batches (`cpu`; decision 037).
//! `--repeat N` runs it all N times and summarizes (`repeat`).
//!
//! Also measured: the device's cold start (spawn, jail, seccomp, handshake → Ready) and its
//! resident memory, after every timed batch and 100 ms apart (a stopped device's namespaces
//! are torn down by kernel workers for a while, and a start right after another skips a
//! grace period); with `limits`, the largest number of simultaneously mapped blobs in each
//! mode and what stopped it.

mod breakdown;
mod cases;
mod cpu;
mod growth;
mod limits;
mod plot;
mod repeat;
mod report;
mod runner;
pub mod vhost_user;

pub use breakdown::{Breakdown, Hop, PipelineTrace};
pub use cases::{BlobSpec, CaseKind, InprocPlacer, Workload};
pub use growth::GrowthPoint;
pub use limits::run_limits;
pub use plot::plot;
pub use repeat::{
    render_repeat, render_summary, summarize, write_repeat, RepeatReport, RepeatSummary,
    TargetAcross,
};
pub use report::{
    ratios, render, round_ratios, targets, write_out, BenchReport, CaseReport, Checks, CpuReport,
    DeviceMemory, LimitReport, Machine, OptionsReport, RemapReport, RoundRatios, RoundReport,
    SweepPoint, Target,
};
pub use runner::run;

use serde::Serialize;

use crate::device::DeviceConfig;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Cases to run (interleaved).
    pub cases: Vec<CaseKind>,
    /// Window size in bytes.
    pub window: u64,
    /// Seed of blob sizes, offsets and fill patterns.
    pub seed: u64,
    /// Largest blob (bytes).
    pub max_blob: u64,
    /// Blobs cycled through per case (at least `queue_depth`).
    pub blobs: usize,
    /// Background placements (4 KiB blobs kept mapped) per level; the first level gives the
    /// headline numbers.
    pub levels: Vec<usize>,
    /// Rounds per level; in each round every case runs one batch.
    pub rounds: usize,
    /// Map+unmap cycles per batch.
    pub batch: usize,
    /// Commands in flight in the pipelined case.
    pub queue_depth: usize,
    /// Guest RAM re-read after every cycle (bytes).
    pub working_set: u64,
    /// Remaps while a vCPU spins on the offset.
    pub remaps: u64,
    /// Remaps each followed by a guest read.
    pub sync_remaps: u64,
    /// Device cold starts to time.
    pub cold_starts: usize,
    /// Also find the largest number of simultaneously mapped blobs per mode.
    pub limits: bool,
    /// Synchronous map/unmap pairs traced for the per-hop breakdown (0: none).
    pub breakdown: usize,
    /// Also measure the window's cost as it grows (windows 256 MiB to 16 GiB, 0 to 10k
    /// live placements).
    pub growth: bool,
    /// Stop a limits search here (blobs).
    pub limit_cap: usize,
    /// Stop a limits search after this many seconds.
    pub limit_seconds: f64,
    /// How to start the device.
    pub device: DeviceConfig,
    /// Progress on stderr when it is a terminal.
    pub show_progress: bool,
    /// Also run `vhost-user-sandboxed` (when `fixed-sandboxed` runs; [`vhost_user`]).
    pub vhost_user: bool,
    /// Where the bench's threads and the devices run.
    pub cpu_layout: CpuLayout,
    /// With the split layout: also run `fixed-sandboxed` and `fixed-sandboxed-pipelined`
    /// unpinned (the [`CpuLayout::None`] way, as `hostmem run` runs by default), as
    /// `fixed-sandboxed-unpinned` and `fixed-sandboxed-pipelined-unpinned`, in the same
    /// interleaved rounds, so both layouts' ratios to the floor come from one run.
    pub also_unpinned: bool,
}

/// Where the bench's driver (the guest's vCPU), the devices and the mapping services run
/// ([`crate::affinity`] says why it matters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CpuLayout {
    /// One CPU per process: the VMM's threads (the driver, i.e. the guest's vCPU, and the
    /// mapping services) on the first allowed CPU, every device on the last. Neither
    /// address space is live on the other's CPU, so no MAP_FIXED needs a TLB-shootdown IPI,
    /// and the device's CPU does nothing but the device's work, so the devices may poll up
    /// to 1 ms when idle (`runner::DEDICATED_IDLE_POLL_MAX`) (needs two CPUs; with one it
    /// is `none`).
    Split,
    /// Nothing pinned: the scheduler places every thread.
    None,
}

impl BenchOptions {
    /// The default run (a few minutes on 2 cores).
    pub fn full(device: DeviceConfig) -> Self {
        BenchOptions {
            cases: CaseKind::ALL.to_vec(),
            window: 256 << 20,
            seed: 1,
            max_blob: 2 << 20,
            blobs: 16,
            levels: vec![0, 32, 128, 512],
            rounds: 30,
            batch: 48,
            queue_depth: 16,
            working_set: 1 << 20,
            remaps: 4000,
            sync_remaps: 400,
            cold_starts: 40,
            limits: false,
            breakdown: 200,
            growth: false,
            limit_cap: 40_000,
            limit_seconds: 60.0,
            device,
            show_progress: true,
            vhost_user: true,
            cpu_layout: CpuLayout::Split,
            also_unpinned: false,
        }
    }

    /// `--quick`: under a minute on 2 cores.
    pub fn quick(device: DeviceConfig) -> Self {
        BenchOptions {
            levels: vec![0, 128],
            rounds: 12,
            batch: 32,
            remaps: 2000,
            sync_remaps: 200,
            cold_starts: 12,
            limit_seconds: 20.0,
            also_unpinned: true,
            ..BenchOptions::full(device)
        }
    }

    /// A tiny run for tests (correctness, not speed).
    pub fn tiny(device: DeviceConfig) -> Self {
        BenchOptions {
            window: 32 << 20,
            max_blob: 64 << 10,
            blobs: 4,
            levels: vec![0, 4],
            rounds: 2,
            batch: 4,
            queue_depth: 4,
            working_set: 64 << 10,
            remaps: 40,
            sync_remaps: 8,
            cold_starts: 2,
            breakdown: 8,
            limit_cap: 64,
            limit_seconds: 10.0,
            show_progress: false,
            vhost_user: false,
            // Tests run side by side: leave the scheduler alone.
            cpu_layout: CpuLayout::None,
            ..BenchOptions::full(device)
        }
    }
}
