//! The window's cost as it grows (`hostmem bench --growth`): for each window size and
//! number of live placements, the map+unmap cycle cost (sandboxed, and the floor on the
//! same window) and the memory of both processes: resident set, page tables (`VmPTE`),
//! VMAs, and KVM's per-slot metadata for the window's one memslot.
//!
//! KVM's per-slot metadata (under shadow paging, `tdp_mmu=N` or PVM, KVM allocates the
//! reverse maps and large-page info of a slot when it is created: crosvm's "2.5 MiB per
//! GiB") is kernel memory that no `/proc/<pid>/status` field shows. It is measured as the
//! growth of `VmallocUsed` (`/proc/meminfo`, system-wide: the arrays are `kvcalloc`ed, and
//! large ones come from vmalloc) and of the cgroup's `memory.kmem.usage_in_bytes` (cgroup
//! v1, where present) across the memslot's registration; both are noisy when other
//! processes allocate at the same time, so each is the median of three registrations.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use hostmem_base::kvm::Vm;
use hostmem_base::mmap::Prot;
use hostmem_base::shm::SharedMemory;
use serde::Serialize;

use super::cases::CTX;
use super::report::lat;
use super::BenchOptions;
use crate::device::Device;
use crate::hostmem::{Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA, WINDOW_SLOT};
use crate::latency::Latency;
use crate::queue_driver::QueueDriver;

/// Window sizes of the study.
pub const WINDOWS: [u64; 4] = [256 << 20, 1 << 30, 4 << 30, 16 << 30];
/// Live placements of the study.
pub const LIVE: [usize; 3] = [0, 1000, 10_000];
/// Timed cycles per point.
const CYCLES: usize = 100;
/// Commands in flight while the background is built.
const DEPTH: usize = 64;
/// Stride of the background blobs (4 KiB blob, 4 KiB gap).
const STRIDE: u64 = 8192;

/// One point of the study.
#[derive(Debug, Clone, Serialize)]
pub struct GrowthPoint {
    /// Window bytes.
    pub window: u64,
    /// Live placements (4 KiB blobs, each read once by the VMM so its page is mapped).
    pub live: usize,
    /// Map+unmap of a 64 KiB blob through the jailed device (µs).
    pub cycle_us: Latency,
    /// The floor's map+unmap on the same window (µs).
    pub floor_cycle_us: Latency,
    /// KVM's metadata of the window's memslot: `VmallocUsed` growth (KiB).
    pub kvm_slot_vmalloc_kib: Option<u64>,
    /// The same as the cgroup's kernel memory growth (KiB).
    pub kvm_slot_kmem_kib: Option<u64>,
    /// VMM resident set (KiB).
    pub vmm_rss_kib: u64,
    /// VMM page tables (KiB).
    pub vmm_pte_kib: u64,
    /// VMM VMAs.
    pub vmm_vmas: usize,
    /// Device resident set (KiB).
    pub device_rss_kib: u64,
    /// Device page tables (KiB).
    pub device_pte_kib: u64,
    /// Device VMAs.
    pub device_vmas: usize,
}

fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn vmalloc_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmallocUsed:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn kmem_bytes() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))?;
    for base in [
        format!("/sys/fs/cgroup/memory{path}"),
        "/sys/fs/cgroup/memory".to_string(),
    ] {
        if let Ok(v) = std::fs::read_to_string(format!("{base}/memory.kmem.usage_in_bytes")) {
            return v.trim().parse().ok();
        }
    }
    None
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// KVM's metadata for one memslot of `size` bytes: (vmalloc KiB, kmem KiB), medians of
/// three registrations.
fn slot_metadata(size: u64) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let shm = Arc::new(SharedMemory::new("growth-slot", size)?);
    let map = Arc::new(hostmem_base::mmap::MemoryMapping::from_fd(
        std::os::fd::AsFd::as_fd(&*shm),
        0,
        usize::try_from(size)?,
        Prot::READ_WRITE,
    )?);
    let (mut vm_d, mut km_d) = (vec![], vec![]);
    for _ in 0..3 {
        let vm = Vm::open()?;
        let (v0, k0) = (vmalloc_kib(), kmem_bytes());
        vm.set_region(
            WINDOW_SLOT,
            DEFAULT_WINDOW_GPA,
            map.clone(),
            0,
            usize::try_from(size)?,
        )?;
        let (v1, k1) = (vmalloc_kib(), kmem_bytes());
        if let (Some(a), Some(b)) = (v0, v1) {
            vm_d.push(b.saturating_sub(a));
        }
        if let (Some(a), Some(b)) = (k0, k1) {
            km_d.push(b.saturating_sub(a) / 1024);
        }
        drop(vm);
    }
    Ok((median(vm_d), median(km_d)))
}

/// Submits `cmds` keeping up to [`DEPTH`] in flight; every one must succeed.
fn pipelined(d: &mut QueueDriver, cmds: &[Vec<u8>]) -> anyhow::Result<()> {
    let mut tags = std::collections::VecDeque::new();
    for c in cmds {
        if tags.len() >= DEPTH {
            if let Some(t) = tags.pop_front() {
                d.wait_ok_or_map(t)?;
            }
        }
        tags.push_back(d.submit(c)?);
    }
    for t in tags {
        d.wait_ok_or_map(t)?;
    }
    Ok(())
}

/// Runs the study.
pub fn run(opts: &BenchOptions) -> anyhow::Result<Vec<GrowthPoint>> {
    use hostmem_device::wire::{
        Command, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE, VIRTIO_GPU_BLOB_MEM_HOST3D,
    };
    let mut out = Vec::new();
    let blob = 64u64 << 10;
    let floor_blob = SharedMemory::new("growth-floor", blob)?;
    floor_blob.seal_size()?;
    for &window in &WINDOWS {
        let (vmalloc, kmem) = slot_metadata(window)?;
        let vm = Arc::new(Vm::open()?);
        let hm = Arc::new(Hostmem::new(
            window,
            Some(vm),
            DEFAULT_WINDOW_GPA,
            Mode::Fixed,
            Limits::default(),
        )?);
        let dev = Device::start(&opts.device, hm.clone()).context("growth: device")?;
        let mut d = QueueDriver::new(dev.transport(), &hm)?;
        d.ctx_create(CTX, 0)?;
        // The cycled blob (resource 1) at the top of the window, the background from 0.
        let top = window - blob;
        d.create_blob(CTX, 1, 0, blob)?;
        let mut live = 0usize;
        for &want in &LIVE {
            let new: Vec<u32> = (live..want).map(|i| 10 + i as u32).collect();
            let creates: Vec<Vec<u8>> = new
                .iter()
                .map(|&r| {
                    Command::create_blob(
                        CTX,
                        r,
                        VIRTIO_GPU_BLOB_MEM_HOST3D,
                        VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                        0,
                        4096,
                    )
                    .encode()
                })
                .collect();
            pipelined(&mut d, &creates)?;
            let maps: Vec<Vec<u8>> = new
                .iter()
                .map(|&r| Command::map_blob(CTX, r, u64::from(r - 10) * STRIDE).encode())
                .collect();
            pipelined(&mut d, &maps)?;
            // The guest would touch its blobs: each placement's page mapped in the VMM.
            let mut q = [0u8; 8];
            for i in live..want {
                hm.window().read(i as u64 * STRIDE, &mut q)?;
            }
            live = want;
            anyhow::ensure!(hm.live() == live, "{} live, {live} wanted", hm.live());
            let mut cyc = Vec::with_capacity(CYCLES);
            let mut floor = Vec::with_capacity(CYCLES);
            for _ in 0..CYCLES {
                let t = Instant::now();
                d.map_blob(CTX, 1, top)?;
                d.unmap_blob(CTX, 1)?;
                cyc.push(t.elapsed().as_secs_f64() * 1e6);
                let t = Instant::now();
                hm.window().place(
                    top,
                    blob,
                    std::os::fd::AsFd::as_fd(&floor_blob),
                    0,
                    Prot::READ_WRITE,
                )?;
                hm.window().restore(top, blob)?;
                floor.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let pid = dev.pid().to_string();
            out.push(GrowthPoint {
                window,
                live,
                cycle_us: lat(&cyc),
                floor_cycle_us: lat(&floor),
                kvm_slot_vmalloc_kib: vmalloc,
                kvm_slot_kmem_kib: kmem,
                vmm_rss_kib: status_kib("self", "VmRSS:"),
                vmm_pte_kib: status_kib("self", "VmPTE:"),
                vmm_vmas: hostmem_base::procfs::vma_count().unwrap_or(0),
                device_rss_kib: status_kib(&pid, "VmRSS:"),
                device_pte_kib: status_kib(&pid, "VmPTE:"),
                device_vmas: hostmem_base::procfs::vma_count_of(&pid).unwrap_or(0),
            });
        }
        drop(d);
        dev.finish_with("growth done", log::Level::Debug);
    }
    Ok(out)
}

/// The study as a table.
pub fn render(g: &[GrowthPoint]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "window cost as it grows (64 KiB blob cycled; KVM slot metadata: VmallocUsed / cgroup kmem growth at registration):"
    );
    let _ = writeln!(
        s,
        "  {:>8} {:>6} {:>14} {:>14} {:>19} {:>9} {:>8} {:>6} {:>9} {:>8} {:>6}",
        "window",
        "live",
        "cycle p50 µs",
        "floor p50 µs",
        "KVM slot KiB",
        "VMM RSS",
        "VMM PTE",
        "VMAs",
        "dev RSS",
        "dev PTE",
        "VMAs"
    );
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for p in g {
        let _ = writeln!(
            s,
            "  {:>7}M {:>6} {:>14.1} {:>14.1} {:>19} {:>9} {:>8} {:>6} {:>9} {:>8} {:>6}",
            p.window >> 20,
            p.live,
            p.cycle_us.p50,
            p.floor_cycle_us.p50,
            format!(
                "{} / {}",
                opt(p.kvm_slot_vmalloc_kib),
                opt(p.kvm_slot_kmem_kib)
            ),
            p.vmm_rss_kib,
            p.vmm_pte_kib,
            p.vmm_vmas,
            p.device_rss_kib,
            p.device_pte_kib,
            p.device_vmas
        );
    }
    s
}

/// The study as an SVG: the sandboxed cycle p50 against live placements, one line per
/// window, and the memory of each point (KVM's slot metadata, VMM and device RSS).
pub fn plot(g: &[GrowthPoint], path: &std::path::Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1400, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let max_cycle = g.iter().map(|p| p.cycle_us.p50).fold(1.0, f64::max) * 1.2;
    let mut ch = ChartBuilder::on(&left)
        .caption(
            "map+unmap p50 (jailed device) by live placements",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..10_500f64, 0f64..max_cycle)?;
    ch.configure_mesh()
        .x_desc("live placements")
        .y_desc("µs per map+unmap")
        .draw()?;
    for (i, w) in WINDOWS.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = g
            .iter()
            .filter(|p| p.window == *w)
            .map(|p| (p.live as f64, p.cycle_us.p50))
            .collect();
        ch.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("window {} MiB", w >> 20))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        ch.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    let floor: Vec<(f64, f64)> = g
        .iter()
        .filter(|p| p.window == WINDOWS[0])
        .map(|p| (p.live as f64, p.floor_cycle_us.p50))
        .collect();
    ch.draw_series(LineSeries::new(floor, BLACK.stroke_width(1)))?
        .label("floor (256 MiB)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    // Memory by window (0 live) and by live placements (the largest window).
    let mib = |k: u64| k as f64 / 1024.0;
    let max_mem = g
        .iter()
        .map(|p| {
            mib(p.kvm_slot_vmalloc_kib.unwrap_or(0))
                .max(mib(p.vmm_rss_kib))
                .max(mib(p.device_rss_kib))
        })
        .fold(1.0, f64::max)
        * 1.2;
    let mut ch = ChartBuilder::on(&right)
        .caption("memory by window size (0 and 10k live)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((0.2f64..20f64).log_scale(), 0f64..max_mem)?;
    ch.configure_mesh()
        .x_desc("window GiB (log scale)")
        .y_desc("MiB")
        .draw()?;
    type Pick = fn(&GrowthPoint) -> u64;
    let series: [(&str, usize, Pick); 5] = [
        ("KVM slot metadata (VmallocUsed growth)", 0, |p| {
            p.kvm_slot_vmalloc_kib.unwrap_or(0)
        }),
        ("VMM RSS, 0 live", 0, |p| p.vmm_rss_kib),
        ("VMM RSS, 10k live", 10_000, |p| p.vmm_rss_kib),
        ("device RSS, 0 live", 0, |p| p.device_rss_kib),
        ("device RSS, 10k live", 10_000, |p| p.device_rss_kib),
    ];
    for (i, (name, live, f)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i + 4).to_rgba();
        let pts: Vec<(f64, f64)> = g
            .iter()
            .filter(|p| p.live == live)
            .map(|p| (p.window as f64 / (1u64 << 30) as f64, mib(f(p))))
            .collect();
        ch.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        ch.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
