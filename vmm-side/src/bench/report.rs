//! The bench report: what is measured per case ([`CaseReport`]), the ratios and targets
//! derived from it, the terminal table ([`render`]) and the files ([`write_out`]).

use super::runner::Samples;
use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::breakdown::Breakdown;
use super::growth::GrowthPoint;
use super::plot::plot;
use crate::hostmem::Mode;
use crate::latency::Latency;

/// Guest and host checks of one case.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Checks {
    /// Guest reads that saw what they must (the blob after a map, no blob after an unmap).
    pub guest_verified: u64,
    /// Guest reads that saw something else (neither the blob nor the previous content).
    pub guest_mismatches: u64,
    /// Guest reads after an acknowledged map/unmap that saw the previous content.
    pub stale_reads: u64,
    /// Guest accesses to the window with no memory behind them (per-cycle reads in fixed
    /// mode, and every hole of the remap test).
    pub guest_holes: u64,
    /// Host-side reads of the VMM window (fixed-mode cases, warm-up cycle) that matched.
    pub host_verified: u64,
    /// Host-side reads that did not.
    pub host_mismatches: u64,
}

/// What the remap test saw.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RemapReport {
    /// Host remaps (maps + unmaps) done while the vCPU spun.
    pub remaps: u64,
    /// Reads the spinning vCPU did.
    pub spin_reads: u64,
    /// Times the spinning vCPU saw the value change (it really watched the remaps).
    pub spin_changes: u64,
    /// Zeros the spinning vCPU read (the background between an unmap and the next map).
    pub spin_zero_reads: u64,
    /// Spinning reads that hit no memory.
    pub spin_holes: u64,
    /// Synchronous remaps, each followed by a guest read.
    pub sync_remaps: u64,
}

/// One point of the sweep over live placements.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Background placements live during the cycles.
    pub live: usize,
    /// Map+unmap latency (µs).
    pub cycle_us: Latency,
    /// Map+unmap pairs per second.
    pub cycles_per_s: f64,
    /// MAP_BLOB latency.
    pub map_us: Latency,
    /// UNMAP_BLOB latency.
    pub unmap_us: Latency,
    /// Cycles measured.
    pub cycles: u64,
}

/// The numbers of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Case name.
    pub name: &'static str,
    /// `fixed` or `per-blob-slot`.
    pub mode: &'static str,
    /// MAP latency (µs) at the first level.
    pub map_us: Latency,
    /// UNMAP latency (µs) at the first level.
    pub unmap_us: Latency,
    /// Map+unmap **latency** (µs) at the first level: MAP_BLOB's plus UNMAP_BLOB's, each
    /// from the kick to the used-ring entry (pipelined: of commands among `queue_depth` in
    /// flight).
    pub cycle_us: Latency,
    /// **Throughput**: whole map+unmap pairs per second of host time at the first level
    /// (pipelined: of the batches' wall time, with `queue_depth` in flight).
    pub cycles_per_s: f64,
    /// Placements per second (a map and an unmap are each one): twice `cycles_per_s`.
    pub placements_per_s: f64,
    /// Cycles measured at the first level.
    pub cycles: u64,
    /// Memslot changes of the window over the whole run (setup, levels, remap test).
    pub memslot_changes: u64,
    /// Memslot changes per timed cycle.
    pub memslot_changes_per_cycle: f64,
    /// TLB-shootdown IPIs (the machine's, from `/proc/interrupts`) per timed cycle: a
    /// MAP_FIXED or memslot change in a process whose threads run on other CPUs costs
    /// one per other CPU ([`crate::affinity`]).
    pub tlb_shootdowns_per_cycle: f64,
    /// Most placements live at once.
    pub peak_live: usize,
    /// Time (µs) for the guest to re-read its RAM working set after a cycle, first level.
    pub guest_refault_us: Latency,
    /// Holes the guest hit (see [`Checks`]).
    pub guest_holes: u64,
    /// Stale reads (see [`Checks`]).
    pub stale_reads: u64,
    /// All checks.
    pub checks: Checks,
    /// The remap test.
    pub remap: RemapReport,
    /// Per level of live placements.
    pub sweep: Vec<SweepPoint>,
    /// The case failed here (its numbers are partial).
    pub failed: Option<String>,
}

/// A target with its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured.
    pub name: String,
    /// The goal.
    pub goal: String,
    /// Measured value (`None`: a case it needs did not run).
    pub value: Option<f64>,
    /// Verdict.
    pub pass: Option<bool>,
}

/// The largest number of simultaneously mapped blobs in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct LimitReport {
    /// `fixed` or `per-blob-slot`.
    pub mode: &'static str,
    /// `vmm` (the VMM's mapping service alone, fds from one memfd) or `sandboxed` (the
    /// jailed device creating a shm blob for each).
    pub path: &'static str,
    /// The VMM's live-placement limit in force.
    pub max_live_limit: Option<usize>,
    /// Blobs mapped at once when it stopped.
    pub mapped: usize,
    /// What stopped it.
    pub stopped_by: String,
    /// Seconds the search took (mapping only).
    pub seconds: f64,
}

/// Device facts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceMemory {
    /// Resident memory of a fresh device right after Ready (KiB, median).
    pub idle_rss_kib: u64,
    /// Resident memory of the fixed-sandboxed device after its run (KiB).
    pub after_run_rss_kib: Option<u64>,
}

/// The machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs available.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// `KVM_CAP_NR_MEMSLOTS`.
    pub kvm_max_memslots: usize,
    /// `vm.max_map_count`.
    pub max_map_count: usize,
}

/// Options as reported.
#[derive(Debug, Clone, Serialize)]
pub struct OptionsReport {
    /// Window bytes.
    pub window: u64,
    /// Seed.
    pub seed: u64,
    /// Cycled blobs and their sizes.
    pub blob_sizes: Vec<u64>,
    /// Levels of background placements.
    pub levels: Vec<usize>,
    /// Rounds per level.
    pub rounds: usize,
    /// Cycles per batch.
    pub batch: usize,
    /// Pipelined queue depth.
    pub queue_depth: usize,
    /// Guest working set re-read after every cycle.
    pub working_set: u64,
    /// Device jailed.
    pub jailed: bool,
    /// Where the driver, the devices and the mapping services ran (`--cpu-layout`).
    pub cpu_layout: String,
}

/// The bench report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Where it ran.
    pub machine: Machine,
    /// With what.
    pub options: OptionsReport,
    /// Per case.
    pub cases: Vec<CaseReport>,
    /// Guest refault (µs) per case.
    pub guest_refault: BTreeMap<String, Latency>,
    /// Holes per case.
    pub guest_holes: BTreeMap<String, u64>,
    /// Stale reads per case.
    pub stale_reads: BTreeMap<String, u64>,
    /// Device cold start, spawn to Ready (ms).
    pub cold_start_ms: Latency,
    /// Cold starts timed.
    pub cold_starts: usize,
    /// Device memory.
    pub device_memory: DeviceMemory,
    /// Ratios (see [`ratios`]).
    pub ratios: BTreeMap<String, f64>,
    /// Where one sandboxed map and unmap spend their time.
    pub breakdown: Option<Breakdown>,
    /// The pipelined case's batching: events per tube message (mean) in a traced batch.
    pub pipelined_events_per_message: Option<f64>,
    /// Who was busy in the traced pipelined batch.
    pub pipelined_trace: Option<super::breakdown::PipelineTrace>,
    /// The window's cost as it grows (`--growth`).
    pub growth: Vec<GrowthPoint>,
    /// Targets and verdicts.
    pub targets: Vec<Target>,
    /// The `--limits` search.
    pub limits: Vec<LimitReport>,
    /// Errors (failed cases, failed cold starts).
    pub errors: Vec<String>,
    /// Wall time.
    pub seconds: f64,
    /// Cycle samples per case at the first level (for the plot; not in JSON).
    #[serde(skip)]
    pub cycle_samples: Vec<(String, Vec<f64>)>,
}

pub(super) fn lat(v: &[f64]) -> Latency {
    let mut v = v.to_vec();
    Latency::of(&mut v)
}

impl BenchReport {
    /// The case called `name`.
    pub fn case(&self, name: &str) -> Option<&CaseReport> {
        self.cases.iter().find(|c| c.name == name)
    }
}

/// Ratios from the case numbers (`None` entries are left out). Latency is the map+unmap
/// p50 (`cycle_us`), throughput is pairs per second (`cycles_per_s`); each is compared with
/// the floor's same figure:
/// * `latency_fixed_sandboxed_vs_floor`, `latency_pipelined_vs_floor`,
///   `latency_fixed_inproc_vs_floor`: latency over the floor's (lower is better);
/// * `throughput_pipelined_vs_floor`, `throughput_fixed_sandboxed_vs_floor`,
///   `throughput_fixed_inproc_vs_floor`: throughput as a share of the floor's (higher is
///   better);
/// * `slot_vs_fixed_sandboxed_cycle`: slot-sandboxed / fixed-sandboxed latency;
/// * `slot_vs_fixed_sandboxed_refault`: the same for the guest re-read;
/// * `slot_vs_fixed_inproc_cycle`, `slot_vs_fixed_inproc_refault`: the in-process pair.
pub fn ratios(cases: &[CaseReport]) -> BTreeMap<String, f64> {
    let get = |n: &str| cases.iter().find(|c| c.name == n && c.cycles > 0);
    let mut out = BTreeMap::new();
    let mut put = |k: &str, num: Option<f64>, den: Option<f64>| {
        if let (Some(n), Some(d)) = (num, den) {
            if d > 0.0 {
                out.insert(k.to_string(), n / d);
            }
        }
    };
    let cyc = |n: &str| get(n).map(|c| c.cycle_us.p50);
    let thr = |n: &str| get(n).map(|c| c.cycles_per_s);
    let rf = |n: &str| get(n).map(|c| c.guest_refault_us.p50);
    put(
        "slot_vs_fixed_sandboxed_cycle",
        cyc("slot-sandboxed"),
        cyc("fixed-sandboxed"),
    );
    put(
        "slot_vs_fixed_sandboxed_refault",
        rf("slot-sandboxed"),
        rf("fixed-sandboxed"),
    );
    put(
        "slot_vs_fixed_inproc_cycle",
        cyc("slot-inproc"),
        cyc("fixed-inproc"),
    );
    put(
        "slot_vs_fixed_inproc_refault",
        rf("slot-inproc"),
        rf("fixed-inproc"),
    );
    for (case, key) in [
        ("fixed-sandboxed", "fixed_sandboxed"),
        ("fixed-sandboxed-pipelined", "pipelined"),
        ("fixed-inproc", "fixed_inproc"),
    ] {
        put(&format!("latency_{key}_vs_floor"), cyc(case), cyc("floor"));
        put(
            &format!("throughput_{key}_vs_floor"),
            thr(case),
            thr("floor"),
        );
    }
    out
}

/// The targets and verdicts.
pub fn targets(
    cases: &[CaseReport],
    ratios: &BTreeMap<String, f64>,
    cold_start_ms: Option<f64>,
) -> Vec<Target> {
    let t = |name: &str, goal: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool| Target {
        name: name.into(),
        goal: goal.into(),
        value,
        pass: value.map(ok),
    };
    let r = |k: &str| ratios.get(k).copied();
    let fixed: Vec<&CaseReport> = cases
        .iter()
        .filter(|c| c.mode == Mode::Fixed.name())
        .collect();
    let bad = (!fixed.is_empty()).then(|| {
        fixed
            .iter()
            .map(|c| c.guest_holes + c.stale_reads)
            .sum::<u64>() as f64
    });
    vec![
        t(
            "pipelined throughput (pairs/s) as a share of the floor's",
            ">= 0.5",
            r("throughput_pipelined_vs_floor"),
            &|v| v >= 0.5,
        ),
        t(
            "fixed-sandboxed map+unmap latency p50 over the floor's",
            "<= 4x",
            r("latency_fixed_sandboxed_vs_floor"),
            &|v| v <= 4.0,
        ),
        t(
            "fixed-sandboxed map+unmap p50 faster than slot-sandboxed",
            ">= 2x",
            r("slot_vs_fixed_sandboxed_cycle"),
            &|v| v >= 2.0,
        ),
        t("holes + stale reads in fixed mode", "0", bad, &|v| v == 0.0),
        t(
            "guest re-read after a cycle cheaper (fixed vs slot, sandboxed)",
            ">= 5x",
            r("slot_vs_fixed_sandboxed_refault"),
            &|v| v >= 5.0,
        ),
        t("device cold start p50 (ms)", "< 50", cold_start_ms, &|v| {
            v < 50.0
        }),
    ]
}

/// The report as a terminal table.
pub fn render(r: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "hostmem bench: {} cores ({}), kernel {}, KVM memslots {}, window {} MiB, seed {}, {} live at the headline level",
        m.cores,
        m.cpu,
        m.kernel,
        m.kvm_max_memslots,
        r.options.window >> 20,
        r.options.seed,
        r.options.levels.first().copied().unwrap_or(0)
    );
    let _ = writeln!(s, "cpu layout: {}", r.options.cpu_layout);
    let _ = writeln!(
        s,
        "\nlatency: per command, kick to used ring (pipelined: {} in flight); throughput: map+unmap pairs per second",
        r.options.queue_depth
    );
    let _ = writeln!(
        s,
        "\n{:<27} {:>17} {:>17} {:>17} {:>9} {:>9} {:>8} {:>5} {:>17} {:>6} {:>6}",
        "case",
        "map p50/p99 µs",
        "unmap p50/p99 µs",
        "m+u lat p50/p99",
        "pairs/s",
        "memslots",
        "TLB/pair",
        "peak",
        "refault p50/p99",
        "holes",
        "stale"
    );
    let pair = |l: &Latency| format!("{:.1} / {:.1}", l.p50, l.p99);
    for c in &r.cases {
        let _ = writeln!(
            s,
            "{:<27} {:>17} {:>17} {:>17} {:>9.0} {:>9} {:>8.1} {:>5} {:>17} {:>6} {:>6}{}",
            c.name,
            pair(&c.map_us),
            pair(&c.unmap_us),
            pair(&c.cycle_us),
            c.cycles_per_s,
            c.memslot_changes,
            c.tlb_shootdowns_per_cycle,
            c.peak_live,
            pair(&c.guest_refault_us),
            c.guest_holes,
            c.stale_reads,
            if c.failed.is_some() { "  FAILED" } else { "" }
        );
    }
    if let Some(first) = r.cases.first() {
        let _ = write!(
            s,
            "\nmap+unmap latency p50 µs / pairs per second by live placements:\n{:<27}",
            "case"
        );
        for p in &first.sweep {
            let _ = write!(s, " {:>17}", p.live);
        }
        let _ = writeln!(s);
        for c in &r.cases {
            let _ = write!(s, "{:<27}", c.name);
            for p in &c.sweep {
                let _ = write!(
                    s,
                    " {:>17}",
                    format!("{:.1} / {:.0}", p.cycle_us.p50, p.cycles_per_s)
                );
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(s, "\nremap test (two blobs alternating at one offset):");
    for c in &r.cases {
        let x = &c.remap;
        let _ = writeln!(
            s,
            "  {:<27} {} sync + {} concurrent remaps, spinning vCPU: {} reads, {} changes seen, {} background zeros, {} holes",
            c.name, x.sync_remaps, x.remaps, x.spin_reads, x.spin_changes, x.spin_zero_reads, x.spin_holes
        );
    }
    if let Some(b) = &r.breakdown {
        let _ = writeln!(
            s,
            "\nper-hop breakdown (fixed-sandboxed, {} synchronous MAP_BLOB + UNMAP_BLOB traced; µs p50 / p99):",
            b.samples
        );
        let _ = writeln!(s, "  {:<48} {:>17} {:>17}", "hop", "map", "unmap");
        for h in b.hops.iter().chain(&b.total).chain(&b.mirror) {
            let _ = writeln!(
                s,
                "  {:<48} {:>17} {:>17}",
                h.name,
                pair(&h.map_us),
                pair(&h.unmap_us)
            );
        }
    }
    if let Some(t) = r.pipelined_trace {
        let _ = writeln!(
            s,
            "pipelined (one traced batch, {} events in {:.0} µs): {:.1} events per tube message; VMM busy {:.0}%, device busy {:.0}% of the time",
            t.events,
            t.wall_us,
            t.events_per_message,
            t.vmm_busy * 100.0,
            t.device_busy * 100.0
        );
    }
    if !r.growth.is_empty() {
        let _ = write!(s, "\n{}", super::growth::render(&r.growth));
    }
    let _ = writeln!(s, "\nratios:");
    for (k, v) in &r.ratios {
        let _ = writeln!(s, "  {k:<34} {v:8.2}");
    }
    let _ = writeln!(
        s,
        "\ndevice cold start (spawn, jail, seccomp, handshake -> Ready): p50 {:.1} ms, p99 {:.1} ms ({} starts); RSS idle {} KiB, after the run {}",
        r.cold_start_ms.p50,
        r.cold_start_ms.p99,
        r.cold_starts,
        r.device_memory.idle_rss_kib,
        r.device_memory
            .after_run_rss_kib
            .map_or("-".to_string(), |k| format!("{k} KiB"))
    );
    if !r.limits.is_empty() {
        let _ = writeln!(s, "\nlimits (largest number of blobs mapped at once):");
        for l in &r.limits {
            let limit = l
                .max_live_limit
                .map_or("no live limit".to_string(), |m| format!("live limit {m}"));
            let _ = writeln!(
                s,
                "  {:<14} {:<10} {:<17} {:>6} mapped in {:5.1} s; stopped by: {}",
                l.mode, l.path, limit, l.mapped, l.seconds, l.stopped_by
            );
        }
    }
    let _ = writeln!(s, "\ntargets:");
    for t in &r.targets {
        let verdict = match t.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        let _ = writeln!(
            s,
            "  {verdict} {:<62} {:>9} (goal {})",
            t.name,
            t.value.map_or("-".into(), |v| format!("{v:.2}")),
            t.goal
        );
    }
    for e in &r.errors {
        let _ = writeln!(s, "error: {e}");
    }
    let _ = writeln!(s, "{:.1} s", r.seconds);
    s
}

/// Writes `bench.json`, `bench.txt` (the table) and `bench.svg` into `dir`, and
/// `growth.svg` when the report has the growth study.
pub fn write_out(r: &BenchReport, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("bench.txt"), render(r))?;
    if !r.growth.is_empty() {
        super::growth::plot(&r.growth, &dir.join("growth.svg"))?;
    }
    plot(r, &dir.join("bench.svg"))
}

/// Map+unmap pairs per second of timed wall time.
fn per_s(s: &Samples) -> f64 {
    if s.op_seconds > 0.0 {
        s.cycles as f64 / s.op_seconds
    } else {
        0.0
    }
}

/// A case's report from its levels (the first is the headline) and checks. What only the
/// case knows — memslot changes over the whole run, peak live, the remap test, a failure —
/// is left empty for the caller to fill in.
pub(super) fn case_report(
    name: &'static str,
    mode: Mode,
    levels: &[(usize, Samples)],
    checks: Checks,
) -> CaseReport {
    let first = levels.first().map(|(_, s)| s.clone()).unwrap_or_default();
    let timed: u64 = levels.iter().map(|(_, s)| s.cycles).sum();
    let slot_changes: u64 = levels.iter().map(|(_, s)| s.memslot_changes).sum();
    let tlb: u64 = levels.iter().map(|(_, s)| s.tlb_shootdowns).sum();
    CaseReport {
        name,
        mode: mode.name(),
        map_us: lat(&first.map_us),
        unmap_us: lat(&first.unmap_us),
        cycle_us: lat(&first.cycle_us),
        cycles_per_s: per_s(&first),
        placements_per_s: 2.0 * per_s(&first),
        cycles: first.cycles,
        memslot_changes: 0,
        memslot_changes_per_cycle: if timed > 0 {
            slot_changes as f64 / timed as f64
        } else {
            0.0
        },
        tlb_shootdowns_per_cycle: if timed > 0 {
            tlb as f64 / timed as f64
        } else {
            0.0
        },
        peak_live: 0,
        guest_refault_us: lat(&first.refault_us),
        guest_holes: checks.guest_holes,
        stale_reads: checks.stale_reads,
        checks,
        remap: RemapReport::default(),
        sweep: levels
            .iter()
            .map(|(live, s)| SweepPoint {
                live: *live,
                cycle_us: lat(&s.cycle_us),
                map_us: lat(&s.map_us),
                unmap_us: lat(&s.unmap_us),
                cycles_per_s: per_s(s),
                cycles: s.cycles,
            })
            .collect(),
        failed: None,
    }
}
