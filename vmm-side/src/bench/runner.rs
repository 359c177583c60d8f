//! Running the cases: each case's VM, probe and route (`CaseRun`), the interleaved timed
//! batches, the remap test, the device's cold starts, and [`run`], which puts the report
//! together.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hostmem_base::kvm::Vm;
use hostmem_base::procfs;

use super::cases::{BlobSpec, CaseKind, Route, Workload, CTX, SPIN_CHUNK};
use super::cpu::{self, batch_cost, CpuSums, DeviceClock, Reading};
use super::limits::run_limits;
use super::report::{
    case_report, lat, ratios, round_ratios, set_cpu_ratios, targets, BenchReport, CaseReport,
    Checks, DeviceMemory, Machine, OptionsReport, RemapReport,
};
use super::vhost_user::{self, VhostUserCase};
use super::{BenchOptions, CpuLayout};
use crate::device::{Device, DeviceConfig};
use crate::hostmem::{Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA};
use crate::probe::{GuestProbe, ProbeRead};

/// What one level of background placements measured (this runner's cases and the
/// vhost-user case alike).
#[derive(Debug, Default, Clone)]
pub(super) struct Samples {
    pub(super) map_us: Vec<f64>,
    pub(super) unmap_us: Vec<f64>,
    pub(super) cycle_us: Vec<f64>,
    pub(super) refault_us: Vec<f64>,
    pub(super) cycles: u64,
    pub(super) op_seconds: f64,
    pub(super) memslot_changes: u64,
    /// TLB-shootdown IPIs during the timed batches (the whole machine's).
    pub(super) tlb_shootdowns: u64,
    /// Each batch (one per round), in round order.
    pub(super) rounds: Vec<Round>,
    /// CPU time of the batches, summed.
    pub(super) cpu: CpuSums,
}

/// One batch of a case: its own numbers, so that each round can be compared with the
/// floor's batch of the same round.
#[derive(Debug, Default, Clone)]
pub(super) struct Round {
    /// Map+unmap latency p50 (µs) of the batch.
    pub(super) cycle_p50_us: f64,
    /// Guest re-read p50 (µs).
    pub(super) refault_p50_us: f64,
    /// Map+unmap pairs timed.
    pub(super) pairs: u64,
    /// Their time (s), as `Samples::op_seconds`.
    pub(super) op_seconds: f64,
    /// The batch's CPU time.
    pub(super) cpu: CpuSums,
}

/// Where a batch's samples begin (`Samples::mark`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Mark {
    cycle: usize,
    refault: usize,
    cycles: u64,
    op_seconds: f64,
}

struct CaseRun {
    kind: CaseKind,
    hostmem: Arc<Hostmem>,
    probe: GuestProbe,
    path: Route,
    bg_live: usize,
    bg_created: usize,
    cursor: usize,
    checks: Checks,
    levels: Vec<(usize, Samples)>,
    remap: RemapReport,
    failed: Option<String>,
    breakdown: Option<super::breakdown::Breakdown>,
    pipeline: Option<super::breakdown::PipelineTrace>,
    /// The device's CPU clock (sandboxed cases).
    device_clock: Option<DeviceClock>,
    /// The driver thread's CPU time in guest steps during the current batch.
    guest_cpu: Duration,
    /// Run unpinned beside the split layout's cases ([`BenchOptions::also_unpinned`]).
    unpinned: bool,
}

impl Samples {
    /// Adds the TLB shootdowns since `before` (a [`procfs::tlb_shootdowns`] reading taken
    /// when the batch began); nothing where the kernel does not count them.
    pub(super) fn add_tlb_since(&mut self, before: Option<u64>) {
        if let (Some(a), Some(b)) = (before, procfs::tlb_shootdowns()) {
            self.tlb_shootdowns += b.saturating_sub(a);
        }
    }

    /// Where the next batch's samples begin.
    pub(super) fn mark(&self) -> Mark {
        Mark {
            cycle: self.cycle_us.len(),
            refault: self.refault_us.len(),
            cycles: self.cycles,
            op_seconds: self.op_seconds,
        }
    }

    /// The batch that began at `m` is done: its round and its CPU time.
    pub(super) fn end_round(&mut self, m: Mark, cpu: CpuSums) {
        let p50 = |v: &[f64]| crate::latency::Latency::of(&mut v.to_vec()).p50;
        self.rounds.push(Round {
            cycle_p50_us: p50(&self.cycle_us[m.cycle..]),
            refault_p50_us: p50(&self.refault_us[m.refault..]),
            pairs: self.cycles - m.cycles,
            op_seconds: self.op_seconds - m.op_seconds,
            cpu,
        });
        self.cpu.add(&cpu);
    }

    /// One timed map+unmap cycle and the guest's RAM re-read after it.
    pub(super) fn cycle(&mut self, map: Duration, unmap: Duration, refault: Duration) {
        self.map_us.push(us(map));
        self.unmap_us.push(us(unmap));
        self.cycle_us.push(us(map + unmap));
        self.refault_us.push(us(refault));
        self.cycles += 1;
        self.op_seconds += (map + unmap).as_secs_f64();
    }
}

pub(super) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl CaseRun {
    /// The case's name in the report: the kind's, with `-unpinned` for the unpinned
    /// copies ([`UNPINNED_KINDS`]).
    fn name(&self) -> &'static str {
        match (self.unpinned, self.kind) {
            (true, CaseKind::FixedSandboxed) => "fixed-sandboxed-unpinned",
            (true, CaseKind::FixedSandboxedPipelined) => "fixed-sandboxed-pipelined-unpinned",
            (_, k) => k.name(),
        }
    }

    /// Case `kind` set up unpinned: the device process and its mapping service start from
    /// an unpinned driver thread (they inherit its CPUs) with `opts` as `--cpu-layout none`
    /// would have them.
    fn setup_unpinned(
        kind: CaseKind,
        opts: &BenchOptions,
        wl: &Workload,
    ) -> anyhow::Result<CaseRun> {
        let _unpinned = DriverUnpinned::new();
        let mut c = CaseRun::setup(kind, opts, wl)?;
        c.unpinned = true;
        Ok(c)
    }

    fn setup(kind: CaseKind, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<CaseRun> {
        let vm = Arc::new(Vm::open()?);
        let hostmem = Arc::new(Hostmem::new(
            opts.window,
            Some(vm.clone()),
            DEFAULT_WINDOW_GPA,
            kind.mode(),
            Limits::default(),
        )?);
        let ram = (opts.working_set + (4 << 20)) as usize;
        let probe = GuestProbe::new(vm, DEFAULT_WINDOW_GPA, opts.window, ram)?;
        let path = Route::new(kind, opts, &hostmem)?;
        let mut c = CaseRun {
            kind,
            hostmem,
            probe,
            path,
            bg_live: 0,
            bg_created: 0,
            cursor: 0,
            checks: Checks::default(),
            levels: vec![],
            remap: RemapReport::default(),
            failed: None,
            breakdown: None,
            pipeline: None,
            device_clock: None,
            guest_cpu: Duration::ZERO,
            unpinned: false,
        };
        c.device_clock = c.device_pid().map(DeviceClock::of);
        for b in wl.cycling.iter().chain(wl.spin.iter()) {
            c.path.create(b)?;
        }
        // Warm-up cycle (not timed): host and guest see every blob, then its absence.
        for b in &wl.cycling {
            c.path.map(&c.hostmem, b)?;
            c.host_check(b, true)?;
            c.guest_check_mapped(b)?;
            c.path.unmap(&c.hostmem, b)?;
            c.host_check(b, false)?;
            c.guest_check_unmapped(b)?;
        }
        c.probe.touch_ram(opts.working_set)?;
        Ok(c)
    }

    /// Fixed mode: the VMM's own window must show the blob, then zeros.
    fn host_check(&mut self, b: &BlobSpec, mapped: bool) -> anyhow::Result<()> {
        if self.kind.mode() != Mode::Fixed {
            return Ok(());
        }
        let mut q = [0u8; 8];
        self.hostmem.window().read(b.offset, &mut q)?;
        let want = if mapped { b.first_qword() } else { 0 };
        if u64::from_le_bytes(q) == want {
            self.checks.host_verified += 1;
        } else {
            self.checks.host_mismatches += 1;
            log::error!(
                "{}: host window at {:#x} does not show the {}",
                self.kind.name(),
                b.offset,
                if mapped { "blob" } else { "background" }
            );
        }
        Ok(())
    }

    fn guest_check_mapped(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
        match self.probe.read_u64(b.offset)? {
            ProbeRead::Value(v) if v == b.first_qword() => self.checks.guest_verified += 1,
            // Still the background (or still no memory): the map did not reach the guest.
            ProbeRead::Value(0) | ProbeRead::Hole { .. } => self.checks.stale_reads += 1,
            ProbeRead::Value(_) => self.checks.guest_mismatches += 1,
        }
        Ok(())
    }

    fn guest_check_unmapped(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
        match self.probe.read_u64(b.offset)? {
            ProbeRead::Value(0) => self.checks.guest_verified += 1,
            // Legacy mode: the blob's memslot is gone and nothing is there. Expected.
            ProbeRead::Hole { .. } if self.kind.mode() == Mode::PerBlobSlot => {
                self.checks.guest_verified += 1
            }
            ProbeRead::Hole { .. } => self.checks.guest_holes += 1,
            ProbeRead::Value(v) if v == b.first_qword() => self.checks.stale_reads += 1,
            ProbeRead::Value(_) => self.checks.guest_mismatches += 1,
        }
        Ok(())
    }

    fn set_background(&mut self, n: usize, wl: &Workload) -> anyhow::Result<()> {
        while self.bg_live < n {
            let b = wl.background[self.bg_live];
            if self.bg_created <= self.bg_live {
                self.path.create(&b)?;
                self.bg_created += 1;
            }
            self.path.map(&self.hostmem, &b)?;
            self.bg_live += 1;
        }
        while self.bg_live > n {
            let b = wl.background[self.bg_live - 1];
            self.path.unmap(&self.hostmem, &b)?;
            self.bg_live -= 1;
        }
        Ok(())
    }

    fn samples(&mut self) -> &mut Samples {
        if self.levels.last().map(|(l, _)| *l) != Some(self.bg_live) {
            self.levels.push((self.bg_live, Samples::default()));
        }
        &mut self.levels.last_mut().expect("just pushed").1
    }

    /// Runs a guest step (a check, the RAM re-read) and counts the driver thread's CPU time
    /// in it (`guest_cpu`).
    fn guest_step<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let t = cpu::this_thread();
        let r = f(self);
        self.guest_cpu += cpu::this_thread().saturating_sub(t);
        r
    }

    /// One batch of `opts.batch` cycles: a round of this case, with its CPU time (the
    /// batch, then the wait until the case is idle again: [`settle`]).
    fn batch(&mut self, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<()> {
        let slots0 = self.hostmem.memslot_changes();
        let tlb0 = procfs::tlb_shootdowns();
        let mark = self.samples().mark();
        self.guest_cpu = Duration::ZERO;
        let start = Reading::take(self.device_clock);
        if self.kind == CaseKind::FixedSandboxedPipelined {
            self.batch_pipelined(opts, wl)?;
        } else {
            for _ in 0..opts.batch {
                let b = wl.cycling[self.cursor % wl.cycling.len()];
                self.cursor += 1;
                let t = Instant::now();
                self.path.map(&self.hostmem, &b)?;
                let m = t.elapsed();
                self.guest_step(|c| c.guest_check_mapped(&b))?;
                let t = Instant::now();
                self.path.unmap(&self.hostmem, &b)?;
                let u = t.elapsed();
                self.guest_step(|c| c.guest_check_unmapped(&b))?;
                let r = self.guest_step(|c| Ok(c.probe.touch_ram(opts.working_set)?))?;
                self.samples().cycle(m, u, r);
            }
        }
        let end = Reading::take(self.device_clock);
        let d = self.hostmem.memslot_changes() - slots0;
        self.samples().memslot_changes += d;
        self.samples().add_tlb_since(tlb0);
        settle(opts);
        let idle = Reading::take(self.device_clock);
        let cost = batch_cost(start, end, idle, self.guest_cpu);
        self.samples().end_round(mark, cost);
        Ok(())
    }

    fn batch_pipelined(&mut self, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<()> {
        let q = opts.queue_depth.clamp(1, wl.cycling.len());
        let blobs = &wl.cycling[..q];
        for _ in 0..(opts.batch / q).max(1) {
            let Route::Sandboxed {
                driver: Some(d), ..
            } = &mut self.path
            else {
                bail!("pipelined case without a driver");
            };
            let mut map_lat = Vec::with_capacity(q);
            let t0 = Instant::now();
            let mut tags = Vec::with_capacity(q);
            for b in blobs {
                tags.push((d.submit_map(CTX, b.res, b.offset)?, Instant::now()));
            }
            for (tag, at) in tags.drain(..) {
                d.wait_map(tag)?;
                map_lat.push(us(at.elapsed()));
            }
            let map_wall = t0.elapsed();
            let mut unmap_lat = Vec::with_capacity(q);
            // The guest reads every blob while all of them are mapped.
            self.guest_step(|c| blobs.iter().try_for_each(|b| c.guest_check_mapped(b)))?;
            let Route::Sandboxed {
                driver: Some(d), ..
            } = &mut self.path
            else {
                bail!("pipelined case without a driver");
            };
            let t1 = Instant::now();
            for b in blobs {
                tags.push((d.submit_unmap(CTX, b.res)?, Instant::now()));
            }
            for (tag, at) in tags.drain(..) {
                d.wait_ok(tag)?;
                unmap_lat.push(us(at.elapsed()));
            }
            let unmap_wall = t1.elapsed();
            self.guest_step(|c| blobs.iter().try_for_each(|b| c.guest_check_unmapped(b)))?;
            let r = self.guest_step(|c| Ok(c.probe.touch_ram(opts.working_set)?))?;
            let s = self.samples();
            // Latency of a pair: a blob's map plus its unmap, each among q in flight.
            s.cycle_us
                .extend(map_lat.iter().zip(&unmap_lat).map(|(m, u)| m + u));
            s.map_us.extend(map_lat);
            s.unmap_us.extend(unmap_lat);
            s.refault_us.push(us(r));
            s.cycles += q as u64;
            s.op_seconds += (map_wall + unmap_wall).as_secs_f64();
        }
        Ok(())
    }

    /// The remap test (see the module docs).
    fn remap_test(&mut self, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<()> {
        let [a, b] = wl.spin;
        // Synchronous: after every acknowledged op the guest must see exactly the new state.
        for i in 0..opts.sync_remaps {
            let blob = if (i / 2).is_multiple_of(2) { a } else { b };
            let mapping = i % 2 == 0;
            if mapping {
                self.path.map(&self.hostmem, &blob)?;
            } else {
                self.path.unmap(&self.hostmem, &blob)?;
            }
            let seen = self.probe.read_u64(blob.offset)?;
            let c = &mut self.checks;
            match (mapping, seen) {
                (true, ProbeRead::Value(v)) if v == blob.first_qword() => c.guest_verified += 1,
                (false, ProbeRead::Value(0)) => c.guest_verified += 1,
                (_, ProbeRead::Hole { .. }) => {
                    c.guest_holes += 1;
                    if mapping {
                        c.stale_reads += 1;
                    }
                }
                (true, ProbeRead::Value(0)) => c.stale_reads += 1,
                (false, ProbeRead::Value(v)) if v == blob.first_qword() => c.stale_reads += 1,
                _ => c.guest_mismatches += 1,
            }
            self.remap.sync_remaps += 1;
        }
        if !opts.sync_remaps.is_multiple_of(2) {
            let last = if ((opts.sync_remaps - 1) / 2).is_multiple_of(2) {
                a
            } else {
                b
            };
            self.path.unmap(&self.hostmem, &last)?;
        }
        // Concurrent: a vCPU spins on the offset on another thread while the host remaps.
        let stop = AtomicBool::new(false);
        let CaseRun {
            probe,
            path,
            hostmem,
            remap,
            ..
        } = self;
        let (spin, host): (anyhow::Result<RemapReport>, anyhow::Result<u64>) =
            std::thread::scope(|s| {
                let spinner = s.spawn(|| -> anyhow::Result<RemapReport> {
                    // A vCPU of its own: off the driver's CPU (`--cpu-layout split`).
                    if let Some(all) = ALL_CPUS.get() {
                        let _ = crate::affinity::pin(0, all, "remap vCPU");
                    }
                    let mut r = RemapReport::default();
                    // At least one chunk, however fast the host is.
                    loop {
                        let st = probe.spin_read(a.offset, SPIN_CHUNK)?;
                        r.spin_reads += st.reads;
                        r.spin_changes += st.changes;
                        r.spin_zero_reads += st.zero_reads;
                        r.spin_holes += st.holes;
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                    }
                    Ok(r)
                });
                let host = (|| -> anyhow::Result<u64> {
                    let mut n = 0u64;
                    // Ends with blob `a` mapped.
                    let rounds = opts.remaps.div_ceil(4).max(1);
                    for _ in 0..rounds {
                        for blob in [b, a] {
                            path.map(hostmem, &blob)?;
                            path.unmap(hostmem, &blob)?;
                            n += 2;
                        }
                    }
                    path.map(hostmem, &a)?;
                    Ok(n + 1)
                })();
                stop.store(true, Ordering::Release);
                let spin = spinner
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("spinner panicked")));
                (spin, host)
            });
        let host_ops = host?;
        let sp = spin?;
        remap.remaps = host_ops;
        remap.spin_reads = sp.spin_reads;
        remap.spin_changes = sp.spin_changes;
        remap.spin_zero_reads = sp.spin_zero_reads;
        remap.spin_holes = sp.spin_holes;
        self.checks.guest_holes += sp.spin_holes;
        // Quiescent: every read must now be blob `a`, nothing older.
        let st = self.probe.spin_read(a.offset, SPIN_CHUNK)?;
        if st.holes > 0 || st.zero_reads > 0 || st.last != a.first_qword() || st.changes != 1 {
            self.checks.stale_reads += 1;
            log::error!(
                "{}: after the last remap the guest still saw older content: {st:?}",
                self.kind.name()
            );
        } else {
            self.checks.guest_verified += 1;
        }
        self.path.unmap(&self.hostmem, &a)?;
        Ok(())
    }

    /// Without the cargo feature `trace` the device cannot be asked to trace: no per-hop
    /// breakdown and no pipelined trace (the report has neither; this says why).
    #[cfg(not(feature = "trace"))]
    fn trace(&mut self, opts: &BenchOptions, _wl: &Workload) -> anyhow::Result<()> {
        if self.kind == CaseKind::FixedSandboxed && opts.breakdown > 0 {
            log::warn!(
                "no per-hop breakdown: this build has no tracing (cargo feature `trace`: \
                 cargo run --release -p hostmem-vmm --features trace -- bench)"
            );
        }
        Ok(())
    }

    /// The per-hop breakdown (fixed-sandboxed) and the pipelined batching (a traced
    /// pipelined batch: events per tube message). Cargo feature `trace`.
    #[cfg(feature = "trace")]
    fn trace(&mut self, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<()> {
        let CaseRun {
            kind,
            probe,
            path,
            breakdown,
            pipeline,
            ..
        } = self;
        let Route::Sandboxed {
            driver: Some(d), ..
        } = path
        else {
            return Ok(());
        };
        match kind {
            CaseKind::FixedSandboxed if opts.breakdown > 0 => {
                // The timed cycle's own steps between commands, so the hops explain its
                // latency.
                let ws = opts.working_set;
                let mut between = |b: &BlobSpec, mapped: bool| -> anyhow::Result<()> {
                    probe.read_u64(b.offset)?;
                    if !mapped {
                        probe.touch_ram(ws)?;
                    }
                    Ok(())
                };
                *breakdown = Some(super::breakdown::run(
                    d,
                    &wl.cycling,
                    opts.breakdown,
                    &mut between,
                )?);
            }
            CaseKind::FixedSandboxedPipelined => {
                // As a timed pipelined batch: all maps, the guest reads every blob, all
                // unmaps.
                let q = opts.queue_depth.clamp(1, wl.cycling.len());
                d.set_trace(true)?;
                for round in 0..2 {
                    let mut tags = Vec::with_capacity(q);
                    for b in &wl.cycling[..q] {
                        tags.push(if round == 0 {
                            d.submit_map(CTX, b.res, b.offset)?
                        } else {
                            d.submit_unmap(CTX, b.res)?
                        });
                    }
                    for t in tags {
                        d.wait_ok_or_map(t)?;
                    }
                    if round == 0 {
                        for b in &wl.cycling[..q] {
                            probe.read_u64(b.offset)?;
                        }
                    }
                }
                let recs = d.take_trace()?;
                d.set_trace(false)?;
                *pipeline = super::breakdown::PipelineTrace::of(&recs);
            }
            _ => {}
        }
        Ok(())
    }

    fn peak_live(&self) -> usize {
        match &self.path {
            Route::Floor { peak, .. } => *peak,
            _ => self.hostmem.max_live_seen(),
        }
    }

    fn device_pid(&self) -> Option<i32> {
        match &self.path {
            Route::Sandboxed {
                device: Some(d), ..
            } => Some(d.pid()),
            _ => None,
        }
    }

    fn teardown(&mut self) {
        if let Route::Sandboxed { driver, device } = &mut self.path {
            drop(driver.take());
            if let Some(d) = device.take() {
                d.finish_with("bench done", log::Level::Debug);
            }
        }
    }
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    Machine {
        // The CPUs the bench started with (the driver may be pinned to one by now).
        cores: ALL_CPUS
            .get()
            .map(Vec::len)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu,
        kvm_max_memslots: Vm::open().map(|v| v.max_memslots()).unwrap_or(0),
        max_map_count: procfs::max_map_count().unwrap_or(0),
    }
}

/// Lets the previous batch's processes go idle before the next batch starts: the device and
/// the mapping service poll for a while after their last work (the device's idle poll,
/// `opts.device.idle_poll_max` at most, and [`hostmem_ipc::REPLY_SPIN`]), and on two cores
/// a case whose batch starts while another case's pollers still spin measures them.
pub(super) fn settle(opts: &BenchOptions) {
    let device = opts
        .device
        .idle_poll_max
        .unwrap_or(hostmem_device::process::IDLE_POLL_MAX);
    let spin = device.max(hostmem_ipc::REPLY_SPIN);
    std::thread::sleep(2 * spin + Duration::from_millis(1));
}

/// The layout `opts` asks for, applied: the devices' and mapping services' CPUs set in the
/// returned options and the calling thread (the driver) pinned until the guard drops.
/// `split` gives each process a CPU: the VMM's threads on the first, the devices on the
/// last. A MAP_FIXED flushes the TLB of every other CPU where its address space is live;
/// here neither process's is live on the other's CPU, so no placement sends an IPI.
/// Returns the description the report prints.
fn apply_layout(opts: &BenchOptions) -> anyhow::Result<(BenchOptions, LayoutGuard, String)> {
    let mut o = opts.clone();
    let all = crate::affinity::allowed()?;
    let _ = ALL_CPUS.set(all.clone());
    let guard = LayoutGuard { all: all.clone() };
    if opts.cpu_layout == CpuLayout::None || all.len() < 2 {
        return Ok((o, guard, "none (nothing pinned)".into()));
    }
    let (first, last) = (all[0], all[all.len() - 1]);
    o.device.device_cpus = vec![last];
    o.device.service_cpus = vec![first];
    // A device with a CPU of its own may poll longer before it sleeps: a pause between
    // bursts (the guest reading what it mapped) then costs no wake-up from sleep.
    o.device.idle_poll_max = Some(DEDICATED_IDLE_POLL_MAX);
    // The driver is the guest's vCPU, a thread of the VMM's process: with the mapping
    // services, so each process's address space is live on one CPU only.
    crate::affinity::pin(0, &[first], "bench driver")?;

    Ok((
        o,
        guard,
        format!(
            "split (the VMM's driver and mapping services on CPU {first}, devices on CPU {last}, \
             polling up to {} µs when idle)",
            DEDICATED_IDLE_POLL_MAX.as_micros()
        ),
    ))
}

/// The kinds [`BenchOptions::also_unpinned`] runs a second time, unpinned.
pub const UNPINNED_KINDS: [CaseKind; 2] =
    [CaseKind::FixedSandboxed, CaseKind::FixedSandboxedPipelined];

/// True when [`apply_layout`] did split (it does not with one CPU).
fn laid_split(description: &str) -> bool {
    description.starts_with("split")
}

/// The driver thread on every CPU the bench started with until it drops, then back on
/// the split layout's driver CPU (the first): an unpinned case's batches, and its setup
/// (the device and the mapping service it starts inherit the thread's CPUs).
struct DriverUnpinned;

impl DriverUnpinned {
    fn new() -> Self {
        if let Some(all) = ALL_CPUS.get() {
            if let Err(e) = crate::affinity::pin(0, all, "bench driver (unpinned case)") {
                log::warn!("{e:#}");
            }
        }
        DriverUnpinned
    }
}

impl Drop for DriverUnpinned {
    fn drop(&mut self) {
        if let Some(first) = ALL_CPUS.get().and_then(|a| a.first()) {
            if let Err(e) = crate::affinity::pin(0, &[*first], "bench driver") {
                log::warn!("{e:#}");
            }
        }
    }
}

/// How long a device on a CPU of its own (`--cpu-layout split`) polls at most when idle.
pub const DEDICATED_IDLE_POLL_MAX: Duration = Duration::from_millis(1);

/// Every CPU the bench started with (before the driver was pinned).
static ALL_CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

/// Gives the calling thread every CPU back.
struct LayoutGuard {
    all: Vec<usize>,
}

impl Drop for LayoutGuard {
    fn drop(&mut self) {
        if let Err(e) = crate::affinity::pin(0, &self.all, "bench driver") {
            log::warn!("{e:#}");
        }
    }
}

fn progress(show: bool, done: usize, total: usize, what: &str) {
    if show {
        let w = 30 * done / total.max(1);
        eprint!(
            "\r[{}{}] {done}/{total} {what:<24}",
            "#".repeat(w),
            " ".repeat(30 - w)
        );
    }
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    let t0 = Instant::now();
    Vm::available().map_err(|why| anyhow!("/dev/kvm unusable: {why}"))?;
    let original = opts;
    let (laid, _unpin, layout) = apply_layout(opts)?;
    let opts = &laid;
    let wl = Workload::new(opts)?;
    let show = opts.show_progress && std::io::stderr().is_terminal();
    let mut errors = Vec::new();
    let mut cases: Vec<CaseRun> = Vec::new();
    for k in &opts.cases {
        progress(show, 0, 1, &format!("setup {}", k.name()));
        cases.push(
            CaseRun::setup(*k, opts, &wl).with_context(|| format!("setting up {}", k.name()))?,
        );
    }
    // The unpinned copies, as `--cpu-layout none` runs them (the options as given).
    if opts.also_unpinned && opts.cpu_layout == CpuLayout::Split && laid_split(&layout) {
        let mut unpinned = original.clone();
        unpinned.cpu_layout = CpuLayout::None;
        for k in opts.cases.iter().filter(|k| UNPINNED_KINDS.contains(k)) {
            progress(show, 0, 1, &format!("setup {} unpinned", k.name()));
            cases.push(
                CaseRun::setup_unpinned(*k, &unpinned, &wl)
                    .with_context(|| format!("setting up {} unpinned", k.name()))?,
            );
        }
    }
    let mut vhost_user = match VhostUserCase::wanted(opts) {
        true => VhostUserCase::setup(opts, &wl)
            .map_err(|e| errors.push(format!("{}: setup: {e:#}", vhost_user::NAME)))
            .ok(),
        false => None,
    };
    let cold_hm = Arc::new(Hostmem::new(
        8 << 20,
        None,
        DEFAULT_WINDOW_GPA,
        Mode::Fixed,
        Limits::default(),
    )?);
    let (mut cold_ms, mut idle_rss) = (Vec::new(), Vec::new());
    let timed_start = |cold_ms: &mut Vec<f64>,
                       idle_rss: &mut Vec<f64>,
                       errors: &mut Vec<String>| {
        match cold_start(&opts.device, &cold_hm) {
            Ok((ms, rss)) => {
                cold_ms.push(ms);
                idle_rss.push(rss as f64);
            }
            Err(e) => errors.push(format!("cold start: {e:#}")),
        }
    };
    let total = opts.levels.len() * opts.rounds;
    let mut done = 0;
    for &level in &opts.levels {
        for c in cases.iter_mut().filter(|c| c.failed.is_none()) {
            if let Err(e) = c.set_background(level, &wl) {
                c.failed = Some(format!("background {level}: {e:#}"));
            }
        }
        if let Some(v) = vhost_user.as_mut() {
            v.set_background(level, &wl);
        }
        for r in 0..opts.rounds {
            let n = cases.len();
            for j in 0..n {
                let c = &mut cases[(r + j) % n];
                if c.failed.is_some() {
                    continue;
                }
                settle(opts);
                let unpinned = c.unpinned.then(DriverUnpinned::new);
                if let Err(e) = c.batch(opts, &wl) {
                    log::error!("{}: {e:#}", c.name());
                    c.failed = Some(format!("{e:#}"));
                }
                drop(unpinned);
            }
            if let Some(v) = vhost_user.as_mut() {
                settle(opts);
                v.batch(opts, &wl);
            }
            done += 1;
            progress(show, done, total, &format!("{} live", level));
        }
    }
    // The remap test and the traces are the split layout's (the unpinned copies are timed
    // batches only).
    for c in cases
        .iter_mut()
        .filter(|c| c.failed.is_none() && !c.unpinned)
    {
        progress(show, done, total, &format!("remaps {}", c.kind.name()));
        let res = c
            .set_background(0, &wl)
            .and_then(|()| c.remap_test(opts, &wl));
        if let Err(e) = res {
            c.failed = Some(format!("remap test: {e:#}"));
        } else if let Err(e) = c.trace(opts, &wl) {
            errors.push(format!("{}: trace: {e:#}", c.kind.name()));
        }
    }
    // Cold starts last, `COLD_START_GAP` apart, so teardown misses the batches (decision 046).
    while cold_ms.len() < opts.cold_starts && errors.len() < opts.cold_starts {
        std::thread::sleep(COLD_START_GAP);
        timed_start(&mut cold_ms, &mut idle_rss, &mut errors);
    }
    let breakdown = cases.iter_mut().find_map(|c| c.breakdown.take());
    let pipelined_trace = cases.iter().find_map(|c| c.pipeline);
    if show {
        eprintln!();
    }
    let after_run_rss_kib = cases
        .iter()
        .find(|c| c.kind == CaseKind::FixedSandboxed)
        .and_then(|c| c.device_pid())
        .and_then(|pid| procfs::status_of(&pid.to_string()).ok())
        .map(|s| s.vm_rss_kib);
    let cases_unpinned: Vec<String> = cases
        .iter()
        .filter(|c| c.unpinned)
        .map(|c| c.name().to_string())
        .collect();
    let mut reports = Vec::new();
    let mut cycle_samples = Vec::new();
    for c in cases.iter_mut() {
        c.teardown();
        if let Some(f) = &c.failed {
            errors.push(format!("{}: {f}", c.name()));
        }
        let first_cycles = c.levels.first().map(|(_, s)| s.cycle_us.clone());
        cycle_samples.push((c.name().to_string(), first_cycles.unwrap_or_default()));
        reports.push(CaseReport {
            memslot_changes: c.hostmem.memslot_changes(),
            peak_live: c.peak_live(),
            remap: c.remap,
            failed: c.failed.clone(),
            ..case_report(c.name(), c.kind.mode(), &c.levels, c.checks, c.device_clock)
        });
    }
    drop(cases);
    if let Some(v) = vhost_user.take() {
        let r = v.report();
        if let Some(f) = &r.failed {
            errors.push(format!("{}: {f}", r.name));
        }
        reports.push(r);
    }
    let limits = if opts.limits {
        progress(show, 0, 1, "limits");
        let r = run_limits(opts);
        if show {
            eprintln!();
        }
        r
    } else {
        vec![]
    };
    let growth = if opts.growth {
        progress(show, 0, 1, "growth");
        match super::growth::run(opts) {
            Ok(g) => g,
            Err(e) => {
                errors.push(format!("growth: {e:#}"));
                vec![]
            }
        }
    } else {
        vec![]
    };
    let cold = lat(&cold_ms);
    set_cpu_ratios(&mut reports);
    let ratios = ratios(&reports);
    let round_ratios = round_ratios(&reports);
    let targets = targets(&reports, &ratios, &round_ratios, &cold_ms);
    Ok(BenchReport {
        machine: machine(),
        options: OptionsReport {
            window: opts.window,
            seed: opts.seed,
            blob_sizes: wl.cycling.iter().map(|b| b.size).collect(),
            levels: opts.levels.clone(),
            rounds: opts.rounds,
            batch: opts.batch,
            queue_depth: opts.queue_depth,
            working_set: opts.working_set,
            jailed: opts.device.jailed,
            unpinned_cases: cases_unpinned,
            cpu_layout: layout,
        },
        guest_refault: reports
            .iter()
            .map(|c| (c.name.to_string(), c.guest_refault_us))
            .collect(),
        guest_holes: reports
            .iter()
            .map(|c| (c.name.to_string(), c.guest_holes))
            .collect(),
        stale_reads: reports
            .iter()
            .map(|c| (c.name.to_string(), c.stale_reads))
            .collect(),
        cases: reports,
        cold_start_ms: cold,
        cold_starts: cold_ms.len(),
        device_memory: DeviceMemory {
            idle_rss_kib: lat(&idle_rss).p50 as u64,
            after_run_rss_kib,
        },
        ratios,
        round_ratios,
        breakdown,
        pipelined_events_per_message: pipelined_trace.map(|t| t.events_per_message),
        pipelined_trace,
        growth,
        targets,
        limits,
        errors,
        seconds: t0.elapsed().as_secs_f64(),
        cycle_samples,
    })
}

/// The pause before each timed cold start: longer than an RCU grace period and than the
/// previous device's teardown, so no start rides on kernel state another one left warm.
const COLD_START_GAP: Duration = Duration::from_millis(100);

/// Starts a device, times spawn → Ready, reads its resident memory, stops it.
fn cold_start(cfg: &DeviceConfig, hm: &Arc<Hostmem>) -> anyhow::Result<(f64, u64)> {
    let d = Device::start(cfg, hm.clone())?;
    let ms = d.facts().start_ms;
    let rss = procfs::status_of(&d.pid().to_string())?.vm_rss_kib;
    d.finish_with("bench cold start", log::Level::Debug);
    Ok((ms, rss))
}
