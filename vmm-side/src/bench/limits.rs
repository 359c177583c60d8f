//! `--limits`: the largest number of blobs mapped at once in each mode, through the VMM
//! alone and through the jailed device, and what stopped it.

use std::sync::Arc;
use std::time::Instant;

use hostmem_base::kvm::Vm;
use hostmem_base::mmap::Prot;
use hostmem_base::shm::SharedMemory;
use hostmem_ipc::protocol::Outcome;

use super::cases::{BG_STRIDE, CTX, PAGE};
use super::report::LimitReport;
use super::BenchOptions;
use crate::device::Device;
use crate::hostmem::{Hostmem, Limits, MapEvent, Mode, DEFAULT_WINDOW_GPA};
use crate::queue_driver::QueueDriver;

/// The `--limits` search for both modes, through the VMM alone and through the device.
pub fn run_limits(opts: &BenchOptions) -> Vec<LimitReport> {
    let mut out = Vec::new();
    let unlimited = Limits {
        max_live: usize::MAX,
        ..Limits::default()
    };
    for (mode, limits) in [
        (Mode::PerBlobSlot, Limits::default()),
        (Mode::PerBlobSlot, unlimited),
        (Mode::Fixed, Limits::default()),
        (Mode::Fixed, unlimited),
    ] {
        out.push(
            limit_vmm(mode, limits, opts).unwrap_or_else(|e| LimitReport {
                mode: mode.name(),
                path: "vmm",
                max_live_limit: Some(limits.max_live).filter(|m| *m != usize::MAX),
                mapped: 0,
                stopped_by: format!("setup failed: {e:#}"),
                seconds: 0.0,
            }),
        );
    }
    for mode in [Mode::PerBlobSlot, Mode::Fixed] {
        out.push(limit_sandboxed(mode, opts).unwrap_or_else(|e| LimitReport {
            mode: mode.name(),
            path: "sandboxed",
            max_live_limit: Some(Limits::default().max_live),
            mapped: 0,
            stopped_by: format!("setup failed: {e:#}"),
            seconds: 0.0,
        }));
    }
    out
}

fn limit_window(cap: usize) -> u64 {
    (cap as u64 * BG_STRIDE)
        .next_multiple_of(2 << 20)
        .max(8 << 20)
}

/// Maps blob `n` = 0, 1, ... with `step` until it says why it stopped (`Some`), or the
/// bench's blob or time cap is reached: how many were mapped, why it stopped, in how many
/// seconds.
fn fill(
    opts: &BenchOptions,
    mut step: impl FnMut(usize) -> anyhow::Result<Option<String>>,
) -> anyhow::Result<(usize, String, f64)> {
    let cap = opts.limit_cap;
    let t = Instant::now();
    let mut mapped = 0usize;
    let stopped_by = loop {
        if mapped >= cap {
            break format!("bench cap ({cap} blobs)");
        }
        if t.elapsed().as_secs_f64() > opts.limit_seconds {
            break format!("bench time cap ({} s)", opts.limit_seconds);
        }
        if let Some(why) = step(mapped)? {
            break why;
        }
        mapped += 1;
    };
    Ok((mapped, stopped_by, t.elapsed().as_secs_f64()))
}

/// The VMM's own limit: placement events for 4 KiB blobs (fds of one sealed memfd, closed
/// after each placement as a received fd is) until one is refused.
fn limit_vmm(mode: Mode, limits: Limits, opts: &BenchOptions) -> anyhow::Result<LimitReport> {
    let vm = Arc::new(Vm::open()?);
    let cap = opts.limit_cap;
    let hm = Hostmem::new(
        limit_window(cap),
        Some(vm),
        DEFAULT_WINDOW_GPA,
        mode,
        limits,
    )?;
    let src = SharedMemory::new("bench-limit", PAGE)?;
    src.seal_size()?;
    let (mapped, stopped_by, seconds) = fill(opts, |n| {
        let ev = MapEvent {
            resource_id: 1 + n as u32,
            offset: n as u64 * BG_STRIDE,
            len: PAGE,
            fd_offset: 0,
            prot: Prot::READ_WRITE.bits(),
        };
        let fd = src.try_clone_fd()?;
        Ok(match hm.handle_map(&ev, Some(fd)) {
            Outcome::Ok => None,
            Outcome::Refused { code, reason } => Some(format!("{code:?}: {reason}")),
        })
    })?;
    hm.reset()?;
    Ok(LimitReport {
        mode: mode.name(),
        path: "vmm",
        max_live_limit: Some(limits.max_live).filter(|m| *m != usize::MAX),
        mapped,
        stopped_by,
        seconds,
    })
}

/// The product path's limit: the jailed device creates and maps 4 KiB shm blobs until a
/// command fails.
fn limit_sandboxed(mode: Mode, opts: &BenchOptions) -> anyhow::Result<LimitReport> {
    let vm = Arc::new(Vm::open()?);
    let cap = opts.limit_cap;
    let hm = Arc::new(Hostmem::new(
        limit_window(cap),
        Some(vm),
        DEFAULT_WINDOW_GPA,
        mode,
        Limits::default(),
    )?);
    let device = Device::start(&opts.device, hm.clone())?;
    let mut driver = QueueDriver::new(device.transport(), &hm)?;
    driver.ctx_create(CTX, 0)?;
    let (mapped, stopped_by, seconds) = fill(opts, |n| {
        let res = 1 + n as u32;
        if let Err(e) = driver.create_blob(CTX, res, 0, PAGE) {
            return Ok(Some(format!("CREATE_BLOB #{}: {e}", n + 1)));
        }
        if let Err(e) = driver.map_blob(CTX, res, n as u64 * BG_STRIDE) {
            return Ok(Some(format!("MAP_BLOB #{}: {e}", n + 1)));
        }
        Ok(None)
    })?;
    drop(driver);
    device.finish_with("bench limits done", log::Level::Debug);
    Ok(LimitReport {
        mode: mode.name(),
        path: "sandboxed",
        max_live_limit: Some(Limits::default().max_live),
        mapped,
        stopped_by,
        seconds,
    })
}
