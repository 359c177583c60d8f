//! `hostmem bench`'s `vhost-user-sandboxed` case: one map+unmap cycle through the same
//! jailed device binary served over **vhost-user**, with the VMM as its frontend
//! ([`crate::vhost_frontend`]): `MAP_BLOB` on the device's virtqueue → `SHMEM_MAP` with the
//! blob fd on the backend channel → every mapping-service check and MAP_FIXED in the VMM's
//! one-memslot window → ack → used ring. Measured like `fixed-sandboxed` (same blobs, same
//! host-side [`QueueDriver`] and guest checks, interleaved in the same rounds) so the two
//! differ only in the transport: the mirror placement and the mapping tube's pipelined
//! verdicts on one side, `SHMEM_MAP` with `REPLY_ACK` on the other. The remap test is not
//! run for it.
//!
//! Kept in a file of its own so that the runner only calls it (see [`VhostUserCase`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use hostmem_base::kvm::Vm;
use hostmem_device::backend::shm::{encode_stream, ShmOp};

use super::cpu::{self, batch_cost, DeviceClock, Reading};
use super::report::case_report;
use super::runner::{settle, Samples};
use super::{BenchOptions, BlobSpec, CaseKind, CaseReport, Checks, Workload};
use crate::hostmem::{Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA};
use crate::probe::{GuestProbe, ProbeRead};
use crate::queue_driver::QueueDriver;
use crate::vhost_frontend::VhostUserDevice;
use crate::virtio_pci::REPLY_TIMEOUT;

/// The case's name in reports.
pub const NAME: &str = "vhost-user-sandboxed";
/// The context the case's blobs live in.
const CTX: u32 = 1;

/// The case: its VM, window, guest probe, device and driver.
pub struct VhostUserCase {
    hostmem: Arc<Hostmem>,
    probe: GuestProbe,
    driver: Option<QueueDriver>,
    device: Option<VhostUserDevice>,
    cursor: usize,
    bg_live: usize,
    bg_created: usize,
    checks: Checks,
    levels: Vec<(usize, Samples)>,
    failed: Option<String>,
    device_clock: DeviceClock,
}

impl VhostUserCase {
    /// Whether the bench runner should run it: asked for, alongside `fixed-sandboxed`.
    pub fn wanted(opts: &BenchOptions) -> bool {
        opts.vhost_user && opts.cases.contains(&CaseKind::FixedSandboxed)
    }

    /// A VM with the window in fixed mode, its guest probe, the jailed device over
    /// vhost-user, the workload's blobs created and one warm-up cycle checked by host and
    /// guest.
    pub fn setup(opts: &BenchOptions, wl: &Workload) -> anyhow::Result<VhostUserCase> {
        let vm = Arc::new(Vm::open()?);
        let hostmem = Arc::new(Hostmem::new(
            opts.window,
            Some(vm.clone()),
            DEFAULT_WINDOW_GPA,
            Mode::Fixed,
            Limits::default(),
        )?);
        let ram = (opts.working_set + (4 << 20)) as usize;
        let probe = GuestProbe::new(vm, DEFAULT_WINDOW_GPA, opts.window, ram)?;
        let mut device = VhostUserDevice::start(&opts.device, hostmem.clone(), REPLY_TIMEOUT)
            .context("starting the vhost-user device")?;
        let mut driver = QueueDriver::new(device.transport()?, &hostmem)?;
        // The driver waits as fixed-sandboxed's does: the backend polls after its work as
        // the native device does, so a sleeping driver costs it no wake-up.
        super::cases::wait_as_the_layout_wants(&mut driver, opts);
        driver.ctx_create(CTX, 0).context("CTX_CREATE")?;
        let device_clock = DeviceClock::of(device.pid());
        let mut c = VhostUserCase {
            hostmem,
            probe,
            driver: Some(driver),
            device: Some(device),
            cursor: 0,
            bg_live: 0,
            bg_created: 0,
            checks: Checks::default(),
            levels: vec![],
            failed: None,
            device_clock,
        };
        for b in &wl.cycling {
            c.create(b)?;
        }
        for b in &wl.cycling {
            c.map(b)?;
            c.host_check(b, true)?;
            c.guest_check(b, true)?;
            c.unmap(b)?;
            c.host_check(b, false)?;
            c.guest_check(b, false)?;
        }
        c.probe.touch_ram(opts.working_set)?;
        Ok(c)
    }

    fn driver(&mut self) -> anyhow::Result<&mut QueueDriver> {
        self.driver.as_mut().ok_or_else(|| anyhow!("driver gone"))
    }

    fn create(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
        let d = self.driver()?;
        d.create_blob(CTX, b.res, 0, b.size)
            .with_context(|| format!("CREATE_BLOB {}", b.res))?;
        let fill = encode_stream(&[ShmOp::Fill {
            resource_id: b.res,
            offset: 0,
            len: b.size,
            seed: b.seed,
        }]);
        d.submit_3d(CTX, fill)
            .with_context(|| format!("SUBMIT_3D fill {}", b.res))?;
        Ok(())
    }

    fn map(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
        self.driver()?
            .map_blob(CTX, b.res, b.offset)
            .with_context(|| format!("MAP_BLOB {} at {:#x}", b.res, b.offset))?;
        Ok(())
    }

    fn unmap(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
        self.driver()?
            .unmap_blob(CTX, b.res)
            .with_context(|| format!("UNMAP_BLOB {}", b.res))?;
        Ok(())
    }

    /// The VMM's own window shows the blob, then zeros.
    fn host_check(&mut self, b: &BlobSpec, mapped: bool) -> anyhow::Result<()> {
        let mut q = [0u8; 8];
        self.hostmem.window().read(b.offset, &mut q)?;
        let want = if mapped { b.first_qword() } else { 0 };
        if u64::from_le_bytes(q) == want {
            self.checks.host_verified += 1;
        } else {
            self.checks.host_mismatches += 1;
        }
        Ok(())
    }

    /// The guest sees the blob after a map and the background after an unmap.
    fn guest_check(&mut self, b: &BlobSpec, mapped: bool) -> anyhow::Result<()> {
        let read = self.probe.read_u64(b.offset)?;
        let c = &mut self.checks;
        match (read, mapped) {
            (ProbeRead::Value(v), true) if v == b.first_qword() => c.guest_verified += 1,
            (ProbeRead::Value(0), false) => c.guest_verified += 1,
            (ProbeRead::Value(0), true) => c.stale_reads += 1,
            (ProbeRead::Value(v), false) if v == b.first_qword() => c.stale_reads += 1,
            (ProbeRead::Hole { .. }, _) => c.guest_holes += 1,
            (ProbeRead::Value(_), _) => c.guest_mismatches += 1,
        }
        Ok(())
    }

    /// `n` background blobs mapped (as the other cases' levels).
    pub fn set_background(&mut self, n: usize, wl: &Workload) {
        if self.failed.is_some() {
            return;
        }
        let r = (|| -> anyhow::Result<()> {
            while self.bg_live < n {
                let b = *wl
                    .background
                    .get(self.bg_live)
                    .ok_or_else(|| anyhow!("no background blob {}", self.bg_live))?;
                if self.bg_created <= self.bg_live {
                    self.create(&b)?;
                    self.bg_created += 1;
                }
                self.map(&b)?;
                self.bg_live += 1;
            }
            while self.bg_live > n {
                let b = wl.background[self.bg_live - 1];
                self.unmap(&b)?;
                self.bg_live -= 1;
            }
            Ok(())
        })();
        if let Err(e) = r {
            self.failed = Some(format!("background {n}: {e:#}"));
        }
    }

    fn samples(&mut self) -> &mut Samples {
        if self.levels.last().map(|(l, _)| *l) != Some(self.bg_live) {
            self.levels.push((self.bg_live, Samples::default()));
        }
        &mut self.levels.last_mut().expect("just pushed").1
    }

    /// One batch of `opts.batch` cycles, timed like `fixed-sandboxed`'s (its round, with
    /// its CPU time).
    pub fn batch(&mut self, opts: &BenchOptions, wl: &Workload) {
        if self.failed.is_some() {
            return;
        }
        let slots0 = self.hostmem.memslot_changes();
        let tlb0 = hostmem_base::procfs::tlb_shootdowns();
        let mark = self.samples().mark();
        let mut guest = Duration::ZERO;
        let start = Reading::take(Some(self.device_clock));
        let r = (|| -> anyhow::Result<()> {
            for _ in 0..opts.batch {
                let b = wl.cycling[self.cursor % wl.cycling.len()];
                self.cursor += 1;
                let t = Instant::now();
                self.map(&b)?;
                let m = t.elapsed();
                let g = cpu::this_thread();
                self.guest_check(&b, true)?;
                guest += cpu::this_thread().saturating_sub(g);
                let t = Instant::now();
                self.unmap(&b)?;
                let u = t.elapsed();
                let g = cpu::this_thread();
                self.guest_check(&b, false)?;
                let rf = self.probe.touch_ram(opts.working_set)?;
                guest += cpu::this_thread().saturating_sub(g);
                self.samples().cycle(m, u, rf);
            }
            Ok(())
        })();
        let end = Reading::take(Some(self.device_clock));
        let d = self.hostmem.memslot_changes() - slots0;
        self.samples().memslot_changes += d;
        self.samples().add_tlb_since(tlb0);
        if let Err(e) = r {
            log::error!("{NAME}: {e:#}");
            self.failed = Some(format!("{e:#}"));
            return;
        }
        settle(opts);
        let idle = Reading::take(Some(self.device_clock));
        let cost = batch_cost(start, end, idle, guest);
        self.samples().end_round(mark, cost);
    }

    /// Stops the device and reports the case (first level as the headline, as the others).
    pub fn report(mut self) -> CaseReport {
        drop(self.driver.take());
        if let Some(d) = self.device.take() {
            d.finish_with("bench done", log::Level::Debug);
        }
        CaseReport {
            memslot_changes: self.hostmem.memslot_changes(),
            peak_live: self.hostmem.max_live_seen(),
            failed: self.failed.clone(),
            ..case_report(
                NAME,
                Mode::Fixed,
                &self.levels,
                self.checks,
                Some(self.device_clock),
            )
        }
    }
}
