//! The per-hop breakdown of one sandboxed MAP_BLOB and UNMAP_BLOB: with tracing on
//! ([`QueueDriver::set_trace`]), the driver, the device and the VMM's mapping service stamp
//! each command with `CLOCK_MONOTONIC` (one clock for the three processes), and the hops
//! between the stamps say where the time goes. Tracing is a bench mode: a normal run takes
//! no stamps.

use serde::Serialize;

#[cfg(feature = "trace")]
use super::cases::{BlobSpec, CTX};
#[cfg(feature = "trace")]
use super::report::lat;
use crate::latency::Latency;
#[cfg(feature = "trace")]
use crate::queue_driver::QueueDriver;
use hostmem_ipc::protocol::TraceRecord;

/// One hop: its p50/p99 for maps and for unmaps (µs).
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    /// From which stamp to which.
    pub name: &'static str,
    /// MAP_BLOB.
    pub map_us: Latency,
    /// UNMAP_BLOB.
    pub unmap_us: Latency,
}

/// Where one synchronous command's time goes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Breakdown {
    /// Commands of each kind traced.
    pub samples: usize,
    /// The hops in order; their p50s add up to about the total's.
    pub hops: Vec<Hop>,
    /// Guest kick to the used-ring entry seen by the guest.
    pub total: Option<Hop>,
    /// The device's own mirror placement, from its event leaving (it overlaps the VMM's
    /// hops).
    pub mirror: Option<Hop>,
}

/// The hop names, in order, and how each is computed from a record and the driver's
/// (kick, seen) stamps.
#[cfg(feature = "trace")]
type HopFn = fn(&TraceRecord, (u64, u64)) -> (u64, u64);
#[cfg(feature = "trace")]
const HOPS: [(&str, HopFn); 10] = [
    ("guest kick -> device wakes", |r, d| (d.0, r.device.woke)),
    ("device wakes -> placer (chain, parse, export)", |r, _| {
        (r.device.woke, r.device.begin)
    }),
    ("placer -> event sent", |r, _| {
        (r.device.begin, r.device.sent)
    }),
    ("event sent -> VMM receives", |r, _| {
        (r.device.sent, r.vmm.received)
    }),
    ("VMM checks", |r, _| (r.vmm.received, r.vmm.checked)),
    ("VMM placement", |r, _| (r.vmm.checked, r.vmm.placed)),
    ("VMM reply sent", |r, _| (r.vmm.placed, r.vmm.replied)),
    ("reply -> device has the verdict", |r, _| {
        (r.vmm.replied, r.device.reply)
    }),
    ("verdict -> used ring written", |r, _| {
        (r.device.reply, r.device.used)
    }),
    ("used ring -> guest sees it", |r, d| (r.device.used, d.1)),
];

#[cfg(feature = "trace")]
fn us(from: u64, to: u64) -> f64 {
    // Stamps of one clock; a hop that the other side's parallel work made negative is 0.
    to.saturating_sub(from) as f64 / 1e3
}

/// Runs `n` synchronous map/unmap pairs over `blobs` (in turn) with tracing and returns
/// the breakdown (cargo feature `trace`). `between(blob, mapped)` runs after each command, untimed, as the timed
/// cycle's guest checks do, so the hops are those of the cycle the latency table measures
/// (idle gaps and all). Each command makes exactly one placement event, so the device's
/// records and the driver's tags pair up in order.
#[cfg(feature = "trace")]
pub fn run(
    d: &mut QueueDriver,
    blobs: &[BlobSpec],
    n: usize,
    between: &mut dyn FnMut(&BlobSpec, bool) -> anyhow::Result<()>,
) -> anyhow::Result<Breakdown> {
    anyhow::ensure!(!blobs.is_empty(), "no blobs to trace");
    d.set_trace(true)?;
    let mut tags = Vec::with_capacity(2 * n);
    for blob in blobs.iter().cycle().take(n) {
        let t = d.submit_map(CTX, blob.res, blob.offset)?;
        d.wait_map(t)?;
        tags.push((true, d.stamps(t)));
        between(blob, true)?;
        let t = d.submit_unmap(CTX, blob.res)?;
        d.wait_ok(t)?;
        tags.push((false, d.stamps(t)));
        between(blob, false)?;
    }
    let records = d.take_trace()?;
    d.set_trace(false)?;
    anyhow::ensure!(
        records.len() == tags.len(),
        "{} trace records for {} commands",
        records.len(),
        tags.len()
    );
    let mut per: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); HOPS.len() + 2];
    for (r, (map, st)) in records.iter().zip(&tags) {
        anyhow::ensure!(r.map == *map, "trace record {} is out of order", r.seq);
        let Some(st) = *st else { continue };
        let mut push = |i: usize, v: f64| {
            if let Some(p) = per.get_mut(i) {
                if *map {
                    p.0.push(v)
                } else {
                    p.1.push(v)
                }
            }
        };
        for (i, (_, f)) in HOPS.iter().enumerate() {
            let (a, b) = f(r, st);
            push(i, us(a, b));
        }
        push(HOPS.len(), us(st.0, st.1));
        push(HOPS.len() + 1, us(r.device.sent, r.device.mirror_done));
    }
    let hop = |name: &'static str, v: &(Vec<f64>, Vec<f64>)| Hop {
        name,
        map_us: lat(&v.0),
        unmap_us: lat(&v.1),
    };
    Ok(Breakdown {
        samples: n,
        hops: HOPS
            .iter()
            .zip(&per)
            .map(|((name, _), v)| hop(name, v))
            .collect(),
        total: per
            .get(HOPS.len())
            .map(|v| hop("guest kick -> guest sees it (total)", v)),
        mirror: per
            .get(HOPS.len() + 1)
            .map(|v| hop("device mirror placement (overlaps the VMM's)", v)),
    })
}

/// Who was busy in a traced pipelined batch (maps then unmaps of `queue_depth` blobs):
/// the share of the batch's wall time the VMM's mapping service spent between receiving a
/// message and replying to it, and the device between starting an event and finishing its
/// mirror placement. The busier one bounds the throughput.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PipelineTrace {
    /// Placement events traced.
    pub events: usize,
    /// Mean events per tube message.
    pub events_per_message: f64,
    /// From the first event's start to the last used-ring entry, maps and unmaps (two
    /// phases, the guest's reads between them not counted), µs.
    pub wall_us: f64,
    /// The VMM's busy share of `wall_us`.
    pub vmm_busy: f64,
    /// The device's busy share of `wall_us`.
    pub device_busy: f64,
}

/// Length of the union of `spans` (ns).
fn covered(mut spans: Vec<(u64, u64)>) -> u64 {
    spans.retain(|(a, b)| b > a);
    spans.sort_unstable();
    let (mut total, mut end) = (0u64, 0u64);
    for (a, b) in spans {
        let a = a.max(end);
        if b > a {
            total += b - a;
            end = b;
        }
    }
    total
}

impl PipelineTrace {
    /// The trace of `recs`; `None` when they hold no complete record.
    pub fn of(recs: &[TraceRecord]) -> Option<PipelineTrace> {
        let done: Vec<&TraceRecord> = recs
            .iter()
            .filter(|r| r.device.begin != 0 && r.device.used != 0 && r.vmm.received != 0)
            .collect();
        // The maps and the unmaps are two phases with the guest's reads between them:
        // each phase's wall from its first event's start to its last used-ring entry.
        let mut wall = 0u64;
        for map in [true, false] {
            let phase = done.iter().filter(|r| r.map == map);
            let start = phase.clone().map(|r| r.device.begin).min();
            let end = phase.map(|r| r.device.used).max();
            if let (Some(a), Some(b)) = (start, end) {
                wall += b.saturating_sub(a);
            }
        }
        if wall == 0 {
            return None;
        }
        let wall = wall as f64;
        // A message of k events holds k records of batch k: messages = Σ 1/k.
        let msgs: f64 = done.iter().map(|r| 1.0 / f64::from(r.batch.max(1))).sum();
        let vmm = covered(
            done.iter()
                .map(|r| (r.vmm.received, r.vmm.replied))
                .collect(),
        );
        let dev = covered(
            done.iter()
                .map(|r| (r.device.begin, r.device.mirror_done.max(r.device.sent)))
                .collect(),
        );
        Some(PipelineTrace {
            events: done.len(),
            events_per_message: done.len() as f64 / msgs,
            wall_us: wall / 1e3,
            vmm_busy: vmm as f64 / wall,
            device_busy: dev as f64 / wall,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_spans_are_counted_once() {
        assert_eq!(
            covered(vec![(0, 10), (5, 15), (20, 30), (25, 26), (7, 3)]),
            25
        );
        assert_eq!(covered(vec![]), 0);
    }
}
