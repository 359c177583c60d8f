//! The bench report: what is measured per case ([`CaseReport`]), the ratios and targets
//! derived from it, the terminal table ([`render`]) and the files ([`write_out`]).

use super::cpu::{CpuSums, DeviceClock};
use super::runner::{Round, Samples};
use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::breakdown::Breakdown;
use super::growth::GrowthPoint;
use super::plot::plot;
use crate::hostmem::Mode;
use crate::latency::{Latency, Spread};

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

/// One round of a case at the first level: its batch alone. Round `r` of every case ran in
/// the same interleaved round, so each round's ratio compares batches that met the same
/// machine noise.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// Map+unmap latency p50 (µs) of the batch.
    pub cycle_p50_us: f64,
    /// Map+unmap pairs per second of the batch.
    pub cycles_per_s: f64,
    /// Guest re-read p50 (µs) of the batch.
    pub guest_refault_p50_us: f64,
    /// Pairs timed.
    pub cycles: u64,
    /// CPU time (µs, the VMM's and the device's) per pair (`None`: the device's could not
    /// be read).
    pub cpu_us_per_pair: Option<f64>,
    /// The same without the driver thread's time in the guest's steps.
    pub cpu_excl_guest_us_per_pair: Option<f64>,
}

/// CPU cost per map+unmap pair at the first level: user + system time over the timed
/// batches (from the batch's first command to its last completion) divided by the pairs
/// timed (decision 037).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuReport {
    /// Pairs timed.
    pub pairs: u64,
    /// The VMM process, every thread (µs per pair; `getrusage(RUSAGE_SELF)`). Includes
    /// `guest_us`.
    pub vmm_us: f64,
    /// The device process (µs per pair; `None`: the case has no device process, or its time
    /// could not be read).
    pub device_us: Option<f64>,
    /// `vmm_us` + `device_us` (`None` when the device's is unknown).
    pub total_us: Option<f64>,
    /// `total_us` over the floor's (in the same run).
    pub ratio_to_floor: Option<f64>,
    /// The part of `vmm_us` the driver thread spent running the guest's reads and RAM
    /// re-read (`CLOCK_THREAD_CPUTIME_ID`): the same work in every fixed-mode case (in
    /// slot mode it holds the refaults after each memslot change).
    pub guest_us: f64,
    /// `total_us` - `guest_us`: the pair's own cost, the placement path in both processes.
    pub excl_guest_us: Option<f64>,
    /// `excl_guest_us` over the floor's.
    pub excl_guest_ratio_to_floor: Option<f64>,
    /// After each batch, until the case was idle again (the device's idle poll, the mapping
    /// service's reply spin; the VMM's and the device's, µs per pair): not in `total_us`.
    pub after_us: f64,
    /// Where the device's time came from (`process cpu clock` or `/proc/<pid>/stat
    /// ticks`); `None` without a device.
    pub device_clock: Option<&'static str>,
}

/// A ratio per round at the first level and its spread (see [`round_ratios`]).
#[derive(Debug, Clone, Serialize)]
pub struct RoundRatios {
    /// The ratio of each round, in round order.
    pub rounds: Vec<f64>,
    /// Median and interquartile range of `rounds`.
    #[serde(flatten)]
    pub spread: Spread,
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
    /// Each round at the first level.
    pub rounds: Vec<RoundReport>,
    /// CPU cost per map+unmap pair at the first level.
    pub cpu: CpuReport,
}

/// A target with its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured.
    pub name: String,
    /// The goal.
    pub goal: String,
    /// Measured value (`None`: a case it needs did not run): for a ratio, the median of its
    /// per-round values; for the cold start, the median start.
    pub value: Option<f64>,
    /// Verdict, on `value`.
    pub pass: Option<bool>,
    /// The ratio judged (a key of `ratios` and `round_ratios`).
    pub ratio: Option<String>,
    /// Median and interquartile range of what `value` is the median of.
    pub spread: Option<Spread>,
    /// What `spread` is over: `rounds` or `cold starts`.
    pub spread_of: Option<&'static str>,
    /// For a ratio, the ratio of the whole first level's figures (`ratios`), as judged
    /// before per-round medians.
    pub pooled: Option<f64>,
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
    /// The cases run unpinned beside the split ones (`--layouts split,none`): nothing
    /// pinned, the devices' default idle poll, the driver polling for its replies.
    pub unpinned_cases: Vec<String>,
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
    /// The same ratios per round, with their spread (see [`round_ratios`]).
    pub round_ratios: BTreeMap<String, RoundRatios>,
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

/// What a ratio compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    /// Map+unmap latency p50.
    Latency,
    /// Map+unmap pairs per second.
    Throughput,
    /// The guest's re-read p50.
    Refault,
    /// CPU time (VMM + device) per pair.
    Cpu,
    /// The same without the guest's steps.
    CpuExclGuest,
}

/// Every ratio: its key, numerator case, denominator case and metric.
fn ratio_defs() -> Vec<(String, &'static str, &'static str, Metric)> {
    use Metric::*;
    let vu = super::vhost_user::NAME;
    let mut v = vec![
        (
            "slot_vs_fixed_sandboxed_cycle".into(),
            "slot-sandboxed",
            "fixed-sandboxed",
            Latency,
        ),
        (
            "slot_vs_fixed_sandboxed_refault".into(),
            "slot-sandboxed",
            "fixed-sandboxed",
            Refault,
        ),
        (
            "slot_vs_fixed_inproc_cycle".into(),
            "slot-inproc",
            "fixed-inproc",
            Latency,
        ),
        (
            "slot_vs_fixed_inproc_refault".into(),
            "slot-inproc",
            "fixed-inproc",
            Refault,
        ),
        ("vhost_user_vs_floor".into(), vu, "floor", Latency),
        (
            "vhost_user_vs_fixed_sandboxed".into(),
            vu,
            "fixed-sandboxed",
            Latency,
        ),
    ];
    for (case, key) in [
        ("fixed-sandboxed", "fixed_sandboxed"),
        ("fixed-sandboxed-pipelined", "pipelined"),
        ("fixed-inproc", "fixed_inproc"),
        ("fixed-sandboxed-unpinned", "fixed_sandboxed_unpinned"),
        ("fixed-sandboxed-pipelined-unpinned", "pipelined_unpinned"),
    ] {
        v.push((format!("latency_{key}_vs_floor"), case, "floor", Latency));
        v.push((
            format!("throughput_{key}_vs_floor"),
            case,
            "floor",
            Throughput,
        ));
    }
    for (case, key) in [
        ("fixed-inproc", "fixed_inproc"),
        ("slot-inproc", "slot_inproc"),
        ("fixed-sandboxed", "fixed_sandboxed"),
        ("slot-sandboxed", "slot_sandboxed"),
        ("fixed-sandboxed-pipelined", "pipelined"),
        (vu, "vhost_user"),
        ("fixed-sandboxed-unpinned", "fixed_sandboxed_unpinned"),
        ("fixed-sandboxed-pipelined-unpinned", "pipelined_unpinned"),
    ] {
        v.push((format!("cpu_{key}_vs_floor"), case, "floor", Cpu));
        v.push((
            format!("cpu_excl_guest_{key}_vs_floor"),
            case,
            "floor",
            CpuExclGuest,
        ));
    }
    v
}

fn ratio_of(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 && n.is_finite() && d.is_finite() => Some(n / d),
        _ => None,
    }
}

/// Ratios from the case numbers at the first level (`None` entries are left out). Latency
/// is the map+unmap p50 (`cycle_us`), throughput is pairs per second (`cycles_per_s`), CPU
/// is `cpu.total_us`; each is compared with the floor's same figure:
/// * `latency_fixed_sandboxed_vs_floor`, `latency_pipelined_vs_floor`,
///   `latency_fixed_inproc_vs_floor`: latency over the floor's (lower is better);
/// * `throughput_pipelined_vs_floor`, `throughput_fixed_sandboxed_vs_floor`,
///   `throughput_fixed_inproc_vs_floor`: throughput as a share of the floor's (higher is
///   better);
/// * `slot_vs_fixed_sandboxed_cycle`: slot-sandboxed / fixed-sandboxed latency;
/// * `slot_vs_fixed_sandboxed_refault`: the same for the guest re-read;
/// * `slot_vs_fixed_inproc_cycle`, `slot_vs_fixed_inproc_refault`: the in-process pair;
/// * `vhost_user_vs_floor`, `vhost_user_vs_fixed_sandboxed`: vhost-user-sandboxed's latency
///   over theirs;
/// * `cpu_<case>_vs_floor`: CPU time per pair over the floor's, for every other case.
pub fn ratios(cases: &[CaseReport]) -> BTreeMap<String, f64> {
    let get = |n: &str| cases.iter().find(|c| c.name == n && c.cycles > 0);
    let figure = |n: &str, m: Metric| {
        get(n).and_then(|c| match m {
            Metric::Latency => Some(c.cycle_us.p50),
            Metric::Throughput => Some(c.cycles_per_s),
            Metric::Refault => Some(c.guest_refault_us.p50),
            Metric::Cpu => c.cpu.total_us,
            Metric::CpuExclGuest => c.cpu.excl_guest_us,
        })
    };
    ratio_defs()
        .into_iter()
        .filter_map(|(k, num, den, m)| ratio_of(figure(num, m), figure(den, m)).map(|r| (k, r)))
        .collect()
}

/// The ratios of [`ratios`] per round: round `r` of the numerator case over round `r` of
/// the denominator (the same interleaved round), with their median and interquartile
/// range. Rounds one of the two lacks (a case that failed) are left out.
pub fn round_ratios(cases: &[CaseReport]) -> BTreeMap<String, RoundRatios> {
    let get = |n: &str| cases.iter().find(|c| c.name == n && !c.rounds.is_empty());
    let figure = |r: &RoundReport, m: Metric| match m {
        Metric::Latency => Some(r.cycle_p50_us),
        Metric::Throughput => Some(r.cycles_per_s),
        Metric::Refault => Some(r.guest_refault_p50_us),
        Metric::Cpu => r.cpu_us_per_pair,
        Metric::CpuExclGuest => r.cpu_excl_guest_us_per_pair,
    };
    let mut out = BTreeMap::new();
    for (k, num, den, m) in ratio_defs() {
        let (Some(n), Some(d)) = (get(num), get(den)) else {
            continue;
        };
        let rounds: Vec<f64> = n
            .rounds
            .iter()
            .zip(&d.rounds)
            .filter_map(|(a, b)| ratio_of(figure(a, m), figure(b, m)))
            .collect();
        if let Some(spread) = Spread::of(&rounds) {
            out.insert(k, RoundRatios { rounds, spread });
        }
    }
    out
}

/// Fills in every case's `cpu.ratio_to_floor` and `cpu.excl_guest_ratio_to_floor`.
pub fn set_cpu_ratios(cases: &mut [CaseReport]) {
    let floor = cases
        .iter()
        .find(|c| c.name == "floor")
        .map(|c| (c.cpu.total_us, c.cpu.excl_guest_us));
    let (total, excl) = floor.unwrap_or((None, None));
    for c in cases {
        c.cpu.ratio_to_floor = ratio_of(c.cpu.total_us, total);
        c.cpu.excl_guest_ratio_to_floor = ratio_of(c.cpu.excl_guest_us, excl);
    }
}

/// The targets and verdicts. A ratio's verdict is on the median of its per-round values
/// (`round_ratios`), the cold start's on the median start.
pub fn targets(
    cases: &[CaseReport],
    ratios: &BTreeMap<String, f64>,
    round_ratios: &BTreeMap<String, RoundRatios>,
    cold_start_ms: &[f64],
) -> Vec<Target> {
    let plain = |name: &str, goal: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool| Target {
        name: name.into(),
        goal: goal.into(),
        value,
        pass: value.map(ok),
        ratio: None,
        spread: None,
        spread_of: None,
        pooled: None,
    };
    let ratio = |name: &str, goal: &str, key: &str, ok: &dyn Fn(f64) -> bool| {
        let spread = round_ratios.get(key).map(|r| r.spread);
        Target {
            ratio: Some(key.into()),
            spread,
            spread_of: Some("rounds"),
            pooled: ratios.get(key).copied(),
            ..plain(name, goal, spread.map(|s| s.p50), ok)
        }
    };
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
    let cold = Spread::of(cold_start_ms);
    let mut out = vec![
        ratio(
            "pipelined throughput (pairs/s) as a share of the floor's",
            ">= 0.5",
            "throughput_pipelined_vs_floor",
            &|v| v >= 0.5,
        ),
        ratio(
            "fixed-sandboxed map+unmap latency p50 over the floor's",
            "<= 4x",
            "latency_fixed_sandboxed_vs_floor",
            &|v| v <= 4.0,
        ),
        ratio(
            "fixed-sandboxed map+unmap p50 faster than slot-sandboxed",
            ">= 2x",
            "slot_vs_fixed_sandboxed_cycle",
            &|v| v >= 2.0,
        ),
        plain("holes + stale reads in fixed mode", "0", bad, &|v| v == 0.0),
        ratio(
            "guest re-read after a cycle cheaper (fixed vs slot, sandboxed)",
            ">= 5x",
            "slot_vs_fixed_sandboxed_refault",
            &|v| v >= 5.0,
        ),
        Target {
            spread: cold,
            spread_of: Some("cold starts"),
            ..plain(
                "device cold start p50 (ms)",
                "< 50",
                cold.map(|s| s.p50),
                &|v| v < 50.0,
            )
        },
    ];
    // The unpinned layout's, when it ran (`--layouts split,none`; issue 25 item 4).
    if cases.iter().any(|c| c.name == "fixed-sandboxed-unpinned") {
        out.push(ratio(
            "unpinned fixed-sandboxed map+unmap latency p50 over the floor's",
            "<= 4x",
            "latency_fixed_sandboxed_unpinned_vs_floor",
            &|v| v <= 4.0,
        ));
    }
    if cases
        .iter()
        .any(|c| c.name == "fixed-sandboxed-pipelined-unpinned")
    {
        out.push(ratio(
            "unpinned pipelined throughput (pairs/s) as a share of the floor's",
            ">= 0.5",
            "throughput_pipelined_unpinned_vs_floor",
            &|v| v >= 0.5,
        ));
    }
    out
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
    if !r.options.unpinned_cases.is_empty() {
        let _ = writeln!(
            s,
            "also unpinned, in the same rounds (nothing pinned, the devices' default poll): {}",
            r.options.unpinned_cases.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "\nlatency: per command, kick to used ring (pipelined: {} in flight); throughput: map+unmap pairs per second",
        r.options.queue_depth
    );
    let _ = writeln!(
        s,
        "\n{:<34} {:>17} {:>17} {:>17} {:>9} {:>9} {:>8} {:>5} {:>17} {:>6} {:>6}",
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
            "{:<34} {:>17} {:>17} {:>17} {:>9.0} {:>9} {:>8.1} {:>5} {:>17} {:>6} {:>6}{}",
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
            "\nmap+unmap latency p50 µs / pairs per second by live placements:\n{:<34}",
            "case"
        );
        for p in &first.sweep {
            let _ = write!(s, " {:>17}", p.live);
        }
        let _ = writeln!(s);
        for c in &r.cases {
            let _ = write!(s, "{:<34}", c.name);
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
    render_cpu(&mut s, &r.cases);
    let _ = writeln!(s, "\nremap test (two blobs alternating at one offset):");
    for c in &r.cases {
        let x = &c.remap;
        let _ = writeln!(
            s,
            "  {:<34} {} sync + {} concurrent remaps, spinning vCPU: {} reads, {} changes seen, {} background zeros, {} holes",
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
    let _ = writeln!(
        s,
        "\nratios (of the first level's figures; then of each round's batches: median, IQR):"
    );
    for (k, v) in &r.ratios {
        let spread = r.round_ratios.get(k).map_or(String::new(), |x| {
            format!("  {}", spread_text(&x.spread, "rounds", ""))
        });
        let _ = writeln!(s, "  {k:<42} {v:8.2}{spread}");
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
        let unit = match (t.ratio.is_some(), t.spread_of) {
            (true, _) => "×",
            (false, Some("cold starts")) => " ms",
            _ => "",
        };
        let value = match (t.value, t.spread) {
            (Some(_), Some(sp)) => spread_text(&sp, t.spread_of.unwrap_or(""), unit),
            (Some(v), None) => format!("{v:.2}{unit}"),
            (None, _) => "-".into(),
        };
        let _ = writeln!(s, "  {verdict}  {:<62} {value}  (goal {})", t.name, t.goal);
    }
    for e in &r.errors {
        let _ = writeln!(s, "error: {e}");
    }
    let _ = writeln!(s, "{:.1} s", r.seconds);
    s
}

/// `p50 2.90× (IQR 2.70–3.10, 12 rounds)`.
fn spread_text(sp: &Spread, of: &str, unit: &str) -> String {
    format!(
        "p50 {:.2}{unit} (IQR {:.2}–{:.2}, {} {of})",
        sp.p50, sp.p25, sp.p75, sp.n
    )
}

/// The CPU table: per case, µs per map+unmap pair.
fn render_cpu(s: &mut String, cases: &[CaseReport]) {
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "\nCPU per map+unmap pair (µs of user + system over the timed batches, first level; guest: \
         the guest's reads and RAM re-read, part of vmm; w/o guest: total - guest; after: polling \
         once a batch ended, in no other column):"
    );
    let _ = writeln!(
        s,
        "{:<34} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7} {:>9}  device time from",
        "case", "vmm", "device", "total", "×floor", "guest", "w/o guest", "×floor", "after"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for c in cases {
        let p = &c.cpu;
        let _ = writeln!(
            s,
            "{:<34} {:>9.1} {:>9} {:>9} {:>7} {:>9.1} {:>9} {:>7} {:>9.1}  {}",
            c.name,
            p.vmm_us,
            opt(p.device_us, 1),
            opt(p.total_us, 1),
            opt(p.ratio_to_floor, 2),
            p.guest_us,
            opt(p.excl_guest_us, 1),
            opt(p.excl_guest_ratio_to_floor, 2),
            p.after_us,
            p.device_clock.unwrap_or("(no device process)")
        );
    }
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

/// µs per pair of `ns` over `pairs`.
fn per_pair(ns: u64, pairs: u64) -> f64 {
    if pairs == 0 {
        0.0
    } else {
        ns as f64 / 1e3 / pairs as f64
    }
}

/// The VMM's plus the device's time per pair (the VMM's alone without a device; `None` if
/// the case has a device whose time is unknown).
fn total_per_pair(cpu: &CpuSums, pairs: u64, device: bool) -> Option<f64> {
    match (device, cpu.device_ns) {
        (false, _) => Some(per_pair(cpu.vmm_ns, pairs)),
        (true, Some(d)) => Some(per_pair(cpu.vmm_ns + d, pairs)),
        (true, None) => None,
    }
}

/// [`total_per_pair`] without the guest's steps.
fn excl_guest(cpu: &CpuSums, pairs: u64, device: bool) -> Option<f64> {
    total_per_pair(cpu, pairs, device).map(|t| (t - per_pair(cpu.guest_ns, pairs)).max(0.0))
}

fn round_report(r: &Round, device: bool) -> RoundReport {
    RoundReport {
        cycle_p50_us: r.cycle_p50_us,
        cycles_per_s: if r.op_seconds > 0.0 {
            r.pairs as f64 / r.op_seconds
        } else {
            0.0
        },
        guest_refault_p50_us: r.refault_p50_us,
        cycles: r.pairs,
        cpu_us_per_pair: total_per_pair(&r.cpu, r.pairs, device),
        cpu_excl_guest_us_per_pair: excl_guest(&r.cpu, r.pairs, device),
    }
}

/// The CPU report of a level (`ratio_to_floor` is filled in by [`set_cpu_ratios`]).
pub(super) fn cpu_report(s: &Samples, device: Option<DeviceClock>) -> CpuReport {
    let pairs: u64 = s.rounds.iter().map(|r| r.pairs).sum();
    let c = &s.cpu;
    let has_device = device.is_some();
    CpuReport {
        pairs,
        vmm_us: per_pair(c.vmm_ns, pairs),
        device_us: c
            .device_ns
            .filter(|_| has_device)
            .map(|d| per_pair(d, pairs)),
        total_us: total_per_pair(c, pairs, has_device),
        ratio_to_floor: None,
        excl_guest_us: excl_guest(c, pairs, has_device),
        excl_guest_ratio_to_floor: None,
        guest_us: per_pair(c.guest_ns, pairs),
        after_us: per_pair(c.after_ns, pairs),
        device_clock: device.map(DeviceClock::source),
    }
}

/// A case's report from its levels (the first is the headline), checks and device clock
/// (`None`: no device process). What only the case knows — memslot changes over the whole
/// run, peak live, the remap test, a failure — is left empty for the caller to fill in.
pub(super) fn case_report(
    name: &'static str,
    mode: Mode,
    levels: &[(usize, Samples)],
    checks: Checks,
    device: Option<DeviceClock>,
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
        rounds: first
            .rounds
            .iter()
            .map(|r| round_report(r, device.is_some()))
            .collect(),
        cpu: cpu_report(&first, device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rr(rounds: &[f64]) -> RoundRatios {
        RoundRatios {
            rounds: rounds.to_vec(),
            spread: Spread::of(rounds).unwrap(),
        }
    }

    fn target<'a>(ts: &'a [Target], key: &str) -> &'a Target {
        ts.iter()
            .find(|t| t.ratio.as_deref() == Some(key))
            .unwrap_or_else(|| panic!("no target on {key}"))
    }

    /// The verdict follows the median of the rounds, not the pooled ratio, in both
    /// directions.
    #[test]
    fn targets_are_judged_on_the_medians() {
        let ratios: BTreeMap<String, f64> = [
            ("throughput_pipelined_vs_floor", 0.55),
            ("latency_fixed_sandboxed_vs_floor", 4.5),
            ("slot_vs_fixed_sandboxed_cycle", 1.5),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let rounds: BTreeMap<String, RoundRatios> = [
            // Median 0.48 < 0.5: FAIL though the pooled 0.55 would pass.
            (
                "throughput_pipelined_vs_floor",
                rr(&[0.4, 0.45, 0.6, 0.48, 0.7]),
            ),
            // Median 3.15 <= 4: PASS though the pooled 4.5 would fail.
            (
                "latency_fixed_sandboxed_vs_floor",
                rr(&[3.0, 3.2, 5.0, 3.1]),
            ),
            // An even count: the median is the mean of the middle two, 2.0, on the goal.
            ("slot_vs_fixed_sandboxed_cycle", rr(&[1.9, 2.1])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let ts = targets(&[], &ratios, &rounds, &[10.0, 60.0, 70.0]);
        let thr = target(&ts, "throughput_pipelined_vs_floor");
        assert_eq!(thr.value, Some(0.48));
        assert_eq!(thr.pass, Some(false));
        assert_eq!(thr.pooled, Some(0.55));
        assert_eq!(thr.spread.unwrap().n, 5);
        assert_eq!(
            (thr.spread.unwrap().p25, thr.spread.unwrap().p75),
            (0.45, 0.6)
        );
        let lat = target(&ts, "latency_fixed_sandboxed_vs_floor");
        assert!((lat.value.unwrap() - 3.15).abs() < 1e-12, "{lat:?}");
        assert_eq!(lat.pass, Some(true));
        let slot = target(&ts, "slot_vs_fixed_sandboxed_cycle");
        assert!((slot.value.unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(slot.pass, Some(true));
        // No rounds of a ratio: no value, no verdict, even with a pooled ratio.
        let rf = target(&ts, "slot_vs_fixed_sandboxed_refault");
        assert_eq!((rf.value, rf.pass, rf.spread), (None, None, None));
        // The cold start: the median start (60 ms) fails < 50.
        let cold = ts.iter().find(|t| t.name.contains("cold start")).unwrap();
        assert_eq!((cold.value, cold.pass), (Some(60.0), Some(false)));
        assert_eq!(cold.spread_of, Some("cold starts"));
        assert_eq!(cold.spread.unwrap().n, 3);
        // No fixed-mode case ran: the holes target has nothing to judge.
        let holes = ts.iter().find(|t| t.name.contains("holes")).unwrap();
        assert_eq!(holes.pass, None);
        // The text prints the median with its spread beside the verdict.
        let line = |t: &Target| {
            let sp = t.spread.unwrap();
            spread_text(&sp, "rounds", "×")
        };
        assert_eq!(line(lat), "p50 3.15× (IQR 3.08–3.65, 4 rounds)");
    }

    /// A case whose first level has these rounds of 10 pairs each: latency p50 (µs), pairs
    /// per second, the VMM's (half of it the guest's) and the device's CPU time (ns).
    fn case(
        name: &'static str,
        rounds: &[(f64, f64, u64, Option<u64>)],
        device: bool,
    ) -> CaseReport {
        let mut s = Samples::default();
        for &(lat, per_s, vmm_ns, dev_ns) in rounds {
            let pairs = 10;
            // Half of the VMM's time in the guest's steps.
            let cpu = CpuSums {
                vmm_ns,
                device_ns: dev_ns,
                guest_ns: vmm_ns / 2,
                after_ns: 0,
                batches: 1,
            };
            s.rounds.push(Round {
                cycle_p50_us: lat,
                refault_p50_us: 2.0 * lat,
                pairs,
                op_seconds: pairs as f64 / per_s,
                cpu,
            });
            s.cpu.add(&cpu);
            s.cycles += pairs;
            s.op_seconds += pairs as f64 / per_s;
            s.cycle_us.push(lat);
            s.refault_us.push(2.0 * lat);
        }
        let clock = device.then_some(DeviceClock::ProcStat { pid: 1 });
        case_report(name, Mode::Fixed, &[(0, s)], Checks::default(), clock)
    }

    #[test]
    fn unpinned_cases_have_their_ratios_and_targets() {
        let floor = case(
            "floor",
            &[(10.0, 1000.0, 100_000, None), (20.0, 500.0, 200_000, None)],
            false,
        );
        let split = case(
            "fixed-sandboxed",
            &[
                (30.0, 250.0, 100_000, Some(1)),
                (40.0, 250.0, 100_000, Some(1)),
            ],
            true,
        );
        let unpinned = case(
            "fixed-sandboxed-unpinned",
            &[
                (35.0, 250.0, 100_000, Some(1)),
                (90.0, 250.0, 100_000, Some(1)),
            ],
            true,
        );
        let piped = case(
            "fixed-sandboxed-pipelined-unpinned",
            &[
                (50.0, 600.0, 100_000, Some(1)),
                (60.0, 400.0, 100_000, Some(1)),
            ],
            true,
        );
        let mut cases = vec![floor, split];
        let rr = round_ratios(&cases);
        let ts = targets(&cases, &ratios(&cases), &rr, &[]);
        assert_eq!(ts.len(), 6, "no unpinned target without the unpinned cases");
        cases.extend([unpinned, piped]);
        let rr = round_ratios(&cases);
        let ts = targets(&cases, &ratios(&cases), &rr, &[]);
        assert_eq!(ts.len(), 8);
        // Round by round against the same floor: 3.5 and 4.5, median 4.0.
        let lat = &rr["latency_fixed_sandboxed_unpinned_vs_floor"];
        assert_eq!(lat.rounds, vec![3.5, 4.5]);
        assert_eq!(
            ts[6].ratio.as_deref(),
            Some("latency_fixed_sandboxed_unpinned_vs_floor")
        );
        assert_eq!((ts[6].value, ts[6].pass), (Some(4.0), Some(true)));
        assert_eq!(
            rr["throughput_pipelined_unpinned_vs_floor"].rounds,
            vec![0.6, 0.8]
        );
        assert_eq!(
            ts[7].ratio.as_deref(),
            Some("throughput_pipelined_unpinned_vs_floor")
        );
        assert_eq!(ts[7].pass, Some(true));
        // The split case's ratio is still its own.
        assert_eq!(
            rr["latency_fixed_sandboxed_vs_floor"].rounds,
            vec![3.0, 2.0]
        );
    }

    #[test]
    fn round_ratios_pair_the_same_rounds() {
        let floor = case(
            "floor",
            &[
                (10.0, 1000.0, 100_000, None),
                (20.0, 500.0, 200_000, None),
                (40.0, 250.0, 100_000, None),
            ],
            false,
        );
        // One round more than the floor (the floor failed after three): left out.
        let sandboxed = case(
            "fixed-sandboxed",
            &[
                (30.0, 250.0, 100_000, Some(200_000)),
                (50.0, 250.0, 100_000, Some(300_000)),
                (100.0, 125.0, 100_000, Some(100_000)),
                (7.0, 1.0, 1, Some(1)),
            ],
            true,
        );
        // A device whose time could not be read in one round: no CPU figure that round.
        let pipelined = case(
            "fixed-sandboxed-pipelined",
            &[
                (50.0, 800.0, 100_000, Some(100_000)),
                (60.0, 400.0, 100_000, None),
                (80.0, 100.0, 100_000, Some(300_000)),
            ],
            true,
        );
        let mut cases = vec![floor, sandboxed, pipelined];
        set_cpu_ratios(&mut cases);
        let rr = round_ratios(&cases);
        let lat = &rr["latency_fixed_sandboxed_vs_floor"];
        assert_eq!(lat.rounds, vec![3.0, 2.5, 2.5]);
        assert_eq!((lat.spread.n, lat.spread.p50), (3, 2.5));
        let thr = &rr["throughput_pipelined_vs_floor"];
        assert_eq!(thr.rounds, vec![0.8, 0.8, 0.4]);
        // CPU per pair: floor 10, 20, 10 µs; sandboxed (VMM + device) 30, 40, 20 µs.
        assert_eq!(
            rr["cpu_fixed_sandboxed_vs_floor"].rounds,
            vec![3.0, 2.0, 2.0]
        );
        assert_eq!(rr["cpu_pipelined_vs_floor"].rounds, vec![2.0, 4.0]);
        assert!(
            !rr.contains_key("slot_vs_fixed_sandboxed_cycle"),
            "no slot case ran"
        );
        // The whole level: CPU per pair and its ratio to the floor's.
        let cpu = |n: &str| cases.iter().find(|c| c.name == n).unwrap().cpu.clone();
        let f = cpu("floor");
        assert_eq!(
            (f.pairs, f.vmm_us, f.device_us, f.total_us),
            (30, 400.0 / 30.0, None, Some(400.0 / 30.0))
        );
        assert_eq!(f.ratio_to_floor, Some(1.0));
        assert_eq!(f.device_clock, None);
        let sb = cpu("fixed-sandboxed");
        assert_eq!(sb.pairs, 40);
        assert_eq!(sb.device_us, Some(600_001.0 / 1e3 / 40.0));
        let total = sb.total_us.unwrap();
        assert!((total - (900_002.0 / 1e3 / 40.0)).abs() < 1e-9, "{total}");
        assert!((sb.ratio_to_floor.unwrap() - total / (400.0 / 30.0)).abs() < 1e-9);
        assert_eq!(sb.device_clock, Some("/proc/<pid>/stat ticks"));
        // Without the guest's half of the VMM's time: floor 5, 10, 5 µs per pair, sandboxed
        // 25, 35, 15.
        assert_eq!(sb.guest_us, 150_000.0 / 1e3 / 40.0);
        let excl = sb.excl_guest_us.unwrap();
        assert!((excl - (total - sb.guest_us)).abs() < 1e-9, "{sb:?}");
        assert_eq!(f.excl_guest_us, Some(200.0 / 30.0));
        assert!((sb.excl_guest_ratio_to_floor.unwrap() - excl / (200.0 / 30.0)).abs() < 1e-9);
        assert_eq!(
            rr["cpu_excl_guest_fixed_sandboxed_vs_floor"].rounds,
            vec![5.0, 3.5, 3.0]
        );
        // One round without the device's time: no total for the level.
        let p = cpu("fixed-sandboxed-pipelined");
        assert_eq!(
            (p.device_us, p.total_us, p.ratio_to_floor),
            (None, None, None)
        );
        let pooled = ratios(&cases);
        assert!(!pooled.contains_key("cpu_pipelined_vs_floor"));
        assert!(
            (pooled["cpu_fixed_sandboxed_vs_floor"] - sb.ratio_to_floor.unwrap()).abs() < 1e-12
        );
    }
}
