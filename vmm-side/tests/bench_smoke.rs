//! The benchmark's correctness on a tiny size: every case really mapped and unmapped what
//! it claims (host and guest checks), memslot counts match each mode, ratios and targets
//! come from the measured numbers, the outputs are written. No timing assertions: the speed
//! targets live in `hostmem bench`, not here.

use std::os::fd::AsFd;

use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;
use hostmem_device::backend::shm::{pattern_bytes, pattern_qword};
use hostmem_vmm::bench::{self, BenchOptions, CaseKind, Workload};

mod common;
use common::{device_config, kvm};

/// What the floor case does, checked from the host: the window shows the blob's pattern
/// after the MAP_FIXED place and zeros after the restore.
#[test]
fn floor_places_and_restores() {
    let w = Window::new(8 << 20).unwrap();
    let size = 16 << 10;
    let shm = SharedMemory::new("blob", size).unwrap();
    let pattern = pattern_bytes(7, 0, size as usize);
    MemoryMapping::from_fd(shm.as_fd(), 0, size as usize, Prot::READ_WRITE)
        .unwrap()
        .write_slice(0, &pattern)
        .unwrap();
    w.place(1 << 20, size, shm.as_fd(), 0, Prot::READ_WRITE)
        .unwrap();
    let mut got = vec![0u8; size as usize];
    w.read(1 << 20, &mut got).unwrap();
    assert_eq!(got, pattern, "window must show the blob after place");
    w.restore(1 << 20, size).unwrap();
    w.read(1 << 20, &mut got).unwrap();
    assert!(
        got.iter().all(|b| *b == 0),
        "window must read zeros after restore"
    );
    assert_eq!(w.live(), 0);
}

#[test]
fn workload_is_deterministic_and_disjoint() {
    let o = BenchOptions::tiny(device_config());
    let a = Workload::new(&o).unwrap();
    let b = Workload::new(&o).unwrap();
    assert_eq!(a.cycling, b.cycling);
    assert_eq!(a.background, b.background);
    let mut all: Vec<_> = a.cycling.iter().chain(a.background.iter()).collect();
    all.push(&a.spin[0]);
    all.sort_by_key(|s| s.offset);
    for pair in all.windows(2) {
        assert!(
            pair[0].offset + pair[0].size <= pair[1].offset,
            "{pair:?} overlap"
        );
    }
    assert_eq!(a.spin[0].offset, a.spin[1].offset);
    assert_ne!(a.spin[0].first_qword(), a.spin[1].first_qword());
    assert_eq!(
        a.cycling[0].first_qword(),
        pattern_qword(a.cycling[0].seed, 0)
    );
    assert!(a
        .cycling
        .iter()
        .all(|c| c.size % 4096 == 0 && c.offset % 4096 == 0));
}

#[test]
fn tiny_bench_every_case_maps_what_it_claims() {
    if !kvm() {
        return;
    }
    let mut o = BenchOptions::tiny(device_config());
    o.limits = true;
    let r = bench::run(&o).expect("bench");
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(r.cases.len(), CaseKind::ALL.len());
    let per_level = (o.rounds * o.batch) as u64;
    for c in &r.cases {
        let ch = &c.checks;
        assert!(c.failed.is_none(), "{}: {:?}", c.name, c.failed);
        assert_eq!(ch.guest_mismatches, 0, "{}: {ch:?}", c.name);
        assert_eq!(ch.stale_reads, 0, "{}: {ch:?}", c.name);
        assert_eq!(ch.host_mismatches, 0, "{}: {ch:?}", c.name);
        // Warm-up (2 reads per blob), 2 reads per timed cycle at every level, the sync
        // remaps (in slot mode the reads after an unmap are holes) and the quiescent check.
        let cycles: u64 = c.sweep.iter().map(|p| p.cycles).sum();
        assert_eq!(cycles, per_level * o.levels.len() as u64, "{}", c.name);
        let sync_verified = if c.mode == "fixed" {
            o.sync_remaps
        } else {
            o.sync_remaps / 2
        };
        assert_eq!(
            ch.guest_verified,
            2 * o.blobs as u64 + 2 * cycles + sync_verified + 1,
            "{}: {ch:?}",
            c.name
        );
        assert_eq!(c.sweep.len(), o.levels.len(), "{}", c.name);
        assert_eq!(c.cycles, per_level, "{}", c.name);
        assert!(c.map_us.p50 > 0.0 && c.unmap_us.p50 > 0.0 && c.cycles_per_s > 0.0);
        assert!(c.guest_refault_us.p50 > 0.0, "{}", c.name);
        assert!(
            c.remap.remaps >= o.remaps && c.remap.spin_reads > 0,
            "{}",
            c.name
        );
        let max_bg = *o.levels.iter().max().unwrap();
        if c.name == "fixed-sandboxed-pipelined" {
            assert!(c.peak_live >= max_bg + o.queue_depth, "{}", c.name);
        } else {
            assert!(c.peak_live > max_bg, "{}: peak {}", c.name, c.peak_live);
        }
        if c.mode == "fixed" {
            assert_eq!(ch.host_verified, 2 * o.blobs as u64, "{}", c.name);
            assert_eq!(
                c.memslot_changes, 1,
                "{}: fixed mode has one memslot",
                c.name
            );
            assert_eq!(c.guest_holes, 0, "{}", c.name);
        } else {
            // Two per timed cycle, and more for warm-up, background and remaps.
            assert!(c.memslot_changes > 2 * cycles, "{}", c.name);
            assert_eq!(c.memslot_changes_per_cycle, 2.0, "{}", c.name);
            assert!(c.guest_holes > 0, "{}: unmapped slots are holes", c.name);
        }
    }
    // Ratios are the case numbers divided.
    let cyc = |n: &str| r.case(n).unwrap().cycle_us.p50;
    let rf = |n: &str| r.case(n).unwrap().guest_refault_us.p50;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
    assert!(close(
        r.ratios["slot_vs_fixed_sandboxed_cycle"],
        cyc("slot-sandboxed") / cyc("fixed-sandboxed")
    ));
    assert!(close(
        r.ratios["slot_vs_fixed_sandboxed_refault"],
        rf("slot-sandboxed") / rf("fixed-sandboxed")
    ));
    let thr = |n: &str| r.case(n).unwrap().cycles_per_s;
    assert!(close(
        r.ratios["latency_pipelined_vs_floor"],
        cyc("fixed-sandboxed-pipelined") / cyc("floor")
    ));
    assert!(close(
        r.ratios["latency_fixed_sandboxed_vs_floor"],
        cyc("fixed-sandboxed") / cyc("floor")
    ));
    assert!(close(
        r.ratios["throughput_pipelined_vs_floor"],
        thr("fixed-sandboxed-pipelined") / thr("floor")
    ));
    // Throughput and latency are separate: placements are two per pair, and a pipelined
    // pair's latency is its map's plus its unmap's, each among queue_depth in flight.
    for c in &r.cases {
        assert!(
            close(c.placements_per_s, 2.0 * c.cycles_per_s),
            "{}",
            c.name
        );
        assert!(c.sweep.iter().all(|p| p.cycles_per_s > 0.0), "{}", c.name);
    }
    let p = r.case("fixed-sandboxed-pipelined").unwrap();
    assert!(p.cycle_us.p50 >= p.map_us.p50, "{p:?}");
    // The per-hop breakdown: every hop measured for each traced command, the parts add up
    // to about the total (p50s of parts need not sum exactly).
    let b = r.breakdown.as_ref().expect("breakdown");
    assert_eq!(b.samples, o.breakdown);
    assert_eq!(b.hops.len(), 10);
    let total = b.total.as_ref().unwrap();
    assert!(total.map_us.p50 > 0.0 && total.unmap_us.p50 > 0.0);
    let vmm_place = b.hops.iter().find(|h| h.name == "VMM placement").unwrap();
    assert!(vmm_place.map_us.p50 > 0.0, "{vmm_place:?}");
    assert!(r.pipelined_events_per_message.unwrap() >= 1.0);
    // The traced pipelined batch: every map and unmap of the queue traced, busy shares of
    // a positive wall time.
    let t = r.pipelined_trace.expect("pipelined trace");
    assert_eq!(t.events, 2 * o.queue_depth, "{t:?}");
    assert!(t.wall_us > 0.0, "{t:?}");
    for share in [t.vmm_busy, t.device_busy] {
        assert!(share > 0.0 && share <= 1.0, "{t:?}");
    }
    assert_eq!(
        t.events_per_message,
        r.pipelined_events_per_message.unwrap()
    );
    // TLB shootdowns are counted where the kernel counts them (machine-wide, so other tests
    // running meanwhile show up too: only that the column is filled is checked).
    if hostmem_base::procfs::tlb_shootdowns().is_some() {
        for c in &r.cases {
            assert!(c.tlb_shootdowns_per_cycle.is_finite(), "{}", c.name);
        }
    }
    assert!(text_has_layout(&bench::render(&r)));
    // The four targets of issue 15 first, each with a verdict.
    assert_eq!(r.targets.len(), 6);
    assert!(r.targets[0].name.contains("pipelined throughput"));
    assert!(r.targets[1].name.contains("latency"));
    let text = bench::render(&r);
    assert!(
        text.contains("per-hop breakdown") && text.contains("PASS"),
        "{text}"
    );
    for t in &r.targets {
        assert!(t.value.is_some() && t.pass.is_some(), "{t:?}");
    }
    rounds_spreads_and_cpu(&r, &o);
    assert_eq!(r.cold_starts, o.cold_starts);
    assert!(r.cold_start_ms.p50 > 0.0 && r.device_memory.idle_rss_kib > 0);
    // Limits: the cap (64) is reached in every mode at this size.
    assert_eq!(r.limits.len(), 6);
    for l in &r.limits {
        assert_eq!(l.mapped, o.limit_cap, "{l:?}");
    }
    // Outputs.
    let dir = std::env::temp_dir().join(format!("hostmem-bench-smoke-{}", std::process::id()));
    bench::write_out(&r, &dir).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap();
    assert_eq!(json["cases"].as_array().unwrap().len(), 6);
    assert!(json["cases"][0]["map_us"]["p50"].as_f64().unwrap() > 0.0);
    assert!(json["cases"][0]["placements_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["ratios"]["throughput_pipelined_vs_floor"]
        .as_f64()
        .is_some());
    assert_eq!(json["targets"].as_array().unwrap().len(), 6);
    assert!(json["targets"][0]["pass"].is_boolean());
    assert!(json["breakdown"]["hops"].as_array().unwrap().len() == 10);
    // The per-round ratios, their spreads and the CPU per pair, in the JSON too.
    let lat = &json["round_ratios"]["latency_fixed_sandboxed_vs_floor"];
    assert_eq!(lat["rounds"].as_array().unwrap().len(), o.rounds);
    assert_eq!(lat["n"].as_u64(), Some(o.rounds as u64));
    let q = |k: &str| lat[k].as_f64().unwrap();
    assert!(
        q("p25") > 0.0 && q("p25") <= q("p50") && q("p50") <= q("p75"),
        "{lat}"
    );
    assert_eq!(json["targets"][1]["value"].as_f64(), Some(q("p50")));
    assert_eq!(json["targets"][1]["spread"]["p50"].as_f64(), Some(q("p50")));
    assert_eq!(json["targets"][1]["spread_of"], "rounds");
    assert!(json["targets"][1]["pooled"].as_f64().unwrap() > 0.0);
    for c in json["cases"].as_array().unwrap() {
        let cpu = &c["cpu"];
        assert!(cpu["vmm_us"].as_f64().unwrap() > 0.0, "{cpu}");
        assert!(cpu["total_us"].as_f64().unwrap() > 0.0, "{cpu}");
        assert!(cpu["ratio_to_floor"].as_f64().unwrap() > 0.0, "{cpu}");
        assert!(cpu["excl_guest_us"].as_f64().unwrap() > 0.0, "{cpu}");
        assert!(
            cpu["excl_guest_ratio_to_floor"].as_f64().unwrap() > 0.0,
            "{cpu}"
        );
        assert!(cpu["guest_us"].as_f64().is_some() && cpu["after_us"].as_f64().is_some());
        let sandboxed = c["name"].as_str().unwrap().contains("sandboxed");
        assert_eq!(cpu["device_us"].as_f64().is_some(), sandboxed, "{cpu}");
        assert_eq!(c["rounds"].as_array().unwrap().len(), o.rounds);
        assert!(c["rounds"][0]["cpu_us_per_pair"].as_f64().unwrap() > 0.0);
    }
    let svg = std::fs::read_to_string(dir.join("bench.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("fixed-sandboxed"));
    assert!(bench::render(&r).contains("slot-sandboxed"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Every case has one round per round of the first level; every ratio has its per-round
/// values (each the two cases' same round divided) and a sane spread; the targets are the
/// medians; every case has a CPU cost per pair, with the device's for the sandboxed cases.
fn rounds_spreads_and_cpu(r: &bench::BenchReport, o: &BenchOptions) {
    // A batch per round (the pipelined one too: batch / queue_depth bursts of queue_depth).
    let per_round = o.batch as u64;
    for c in &r.cases {
        assert_eq!(c.rounds.len(), o.rounds, "{}", c.name);
        for x in &c.rounds {
            assert_eq!(x.cycles, per_round, "{}: {x:?}", c.name);
            assert!(
                x.cycle_p50_us > 0.0 && x.cycles_per_s > 0.0,
                "{}: {x:?}",
                c.name
            );
            assert!(x.guest_refault_p50_us > 0.0, "{}: {x:?}", c.name);
            assert!(x.cpu_us_per_pair.unwrap() > 0.0, "{}: {x:?}", c.name);
        }
        let cpu = &c.cpu;
        assert_eq!(cpu.pairs, c.cycles, "{}", c.name);
        assert!(cpu.vmm_us > 0.0, "{}: {cpu:?}", c.name);
        // The guest's steps run on the driver thread, a part of the VMM's time.
        assert!(
            cpu.guest_us > 0.0 && cpu.guest_us <= cpu.vmm_us,
            "{}: {cpu:?}",
            c.name
        );
        let total = cpu.total_us.unwrap();
        if c.name.contains("sandboxed") {
            let dev = cpu
                .device_us
                .unwrap_or_else(|| panic!("{}: {cpu:?}", c.name));
            assert!(dev > 0.0, "{}: {cpu:?}", c.name);
            assert!(
                (total - (cpu.vmm_us + dev)).abs() < 1e-9,
                "{}: {cpu:?}",
                c.name
            );
            // The device polls for at least 100 µs after its last command: the pause after
            // each batch sees it.
            assert!(cpu.after_us > 0.0, "{}: {cpu:?}", c.name);
            // The device's own CPU clock, not the 10 ms ticks of /proc/<pid>/stat.
            assert_eq!(cpu.device_clock, Some("process cpu clock"), "{}", c.name);
        } else {
            assert_eq!(cpu.device_us, None, "{}: no device process", c.name);
            assert_eq!(total, cpu.vmm_us, "{}", c.name);
        }
        let floor = r.case("floor").unwrap().cpu.total_us.unwrap();
        assert_eq!(cpu.ratio_to_floor, Some(total / floor), "{}", c.name);
        // Without the guest's steps: the placement path's own cost, still positive.
        let excl = cpu.excl_guest_us.unwrap();
        assert!(excl > 0.0, "{}: {cpu:?}", c.name);
        assert!((excl - (total - cpu.guest_us)).abs() < 1e-9, "{}", c.name);
        let floor_excl = r.case("floor").unwrap().cpu.excl_guest_us.unwrap();
        assert_eq!(cpu.excl_guest_ratio_to_floor, Some(excl / floor_excl));
    }
    assert_eq!(r.case("floor").unwrap().cpu.ratio_to_floor, Some(1.0));
    // Every pooled ratio has its rounds (no vhost-user case in the tiny run).
    for (k, pooled) in &r.ratios {
        let rr = r
            .round_ratios
            .get(k)
            .unwrap_or_else(|| panic!("{k}: no rounds"));
        assert_eq!(rr.rounds.len(), o.rounds, "{k}");
        assert!(rr.rounds.iter().all(|v| *v > 0.0), "{k}: {rr:?}");
        let sp = rr.spread;
        assert_eq!(sp.n, o.rounds, "{k}");
        assert!(sp.p25 <= sp.p50 && sp.p50 <= sp.p75, "{k}: {sp:?}");
        let (lo, hi) = rr
            .rounds
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), v| (a.min(*v), b.max(*v)));
        assert!(lo <= sp.p25 && sp.p75 <= hi, "{k}: {rr:?}");
        assert!(*pooled > 0.0, "{k}");
    }
    for k in [
        "cpu_fixed_sandboxed_vs_floor",
        "cpu_pipelined_vs_floor",
        "cpu_slot_inproc_vs_floor",
        "cpu_excl_guest_fixed_sandboxed_vs_floor",
    ] {
        assert!(r.round_ratios.contains_key(k), "{k}");
    }
    // A round's ratio is the two cases' batches of that round divided.
    let (sb, fl) = (r.case("fixed-sandboxed").unwrap(), r.case("floor").unwrap());
    for (i, v) in r.round_ratios["latency_fixed_sandboxed_vs_floor"]
        .rounds
        .iter()
        .enumerate()
    {
        assert_eq!(*v, sb.rounds[i].cycle_p50_us / fl.rounds[i].cycle_p50_us);
    }
    let p = r.case("fixed-sandboxed-pipelined").unwrap();
    for (i, v) in r.round_ratios["throughput_pipelined_vs_floor"]
        .rounds
        .iter()
        .enumerate()
    {
        assert_eq!(*v, p.rounds[i].cycles_per_s / fl.rounds[i].cycles_per_s);
    }
    // Ratio targets are judged on the median of their rounds, the cold start on the median
    // start.
    for t in &r.targets {
        match (&t.ratio, t.spread) {
            (Some(k), Some(sp)) => {
                assert_eq!(t.value, Some(sp.p50), "{t:?}");
                assert_eq!(sp, r.round_ratios[k].spread, "{t:?}");
                assert_eq!(t.pooled, Some(r.ratios[k]), "{t:?}");
            }
            (None, Some(sp)) => {
                assert_eq!(t.spread_of, Some("cold starts"));
                assert_eq!(sp.n, o.cold_starts);
                assert_eq!(t.value, Some(sp.p50));
            }
            (None, None) => assert!(t.name.contains("holes"), "{t:?}"),
            (Some(_), None) => panic!("a ratio target without rounds: {t:?}"),
        }
    }
    let text = bench::render(r);
    assert!(text.contains("CPU per map+unmap pair"), "{text}");
    assert!(
        text.contains("IQR") && text.contains(&format!("{} rounds)", o.rounds)),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} cold starts)", o.cold_starts)),
        "{text}"
    );
}

fn text_has_layout(text: &str) -> bool {
    text.contains("cpu layout: none") && text.contains("TLB/pair")
}
