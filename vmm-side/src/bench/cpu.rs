//! CPU time of the bench's processes, for the CPU cost per map+unmap pair (decision 037).
//!
//! * The VMM: `getrusage(RUSAGE_SELF)`, user + system of every thread of the process (the
//!   driver, i.e. the guest's vCPU, the mapping services, the vhost-user channel thread), in
//!   µs.
//! * A device: its process CPU clock (`clock_getcpuclockid` + `clock_gettime`: the kernel's
//!   `sum_exec_runtime` of all its threads, in ns; any process may read another's, as it may
//!   read its `/proc/<pid>/stat`). Where that clock cannot be read, `/proc/<pid>/stat`
//!   fields 14 and 15 (utime, stime) in clock ticks (`sysconf(_SC_CLK_TCK)`, 10 ms here):
//!   too coarse for a batch of a few ms, so the report says which one it used.
//! * The driver thread alone (`CLOCK_THREAD_CPUTIME_ID`): the part of the VMM's time spent
//!   running the guest's own reads and RAM re-read, the same work in every case.

use std::time::Duration;

use nix::sys::resource::{getrusage, UsageWho};
use nix::time::{clock_getcpuclockid, clock_gettime, ClockId};
use nix::unistd::Pid;

/// The VMM's CPU time so far (user + system, all threads).
pub(super) fn vmm() -> Duration {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => timeval(u.user_time()) + timeval(u.system_time()),
        // getrusage(RUSAGE_SELF) fails only on a bad pointer or `who`.
        Err(_) => Duration::ZERO,
    }
}

fn timeval(t: nix::sys::time::TimeVal) -> Duration {
    Duration::from_secs(t.tv_sec().max(0) as u64) + Duration::from_micros(t.tv_usec().max(0) as u64)
}

/// The calling thread's CPU time so far.
pub(super) fn this_thread() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or(Duration::ZERO)
}

/// How a device's CPU time is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeviceClock {
    /// Its process CPU clock (ns).
    Clock { pid: i32, clock: ClockId },
    /// `/proc/<pid>/stat` utime + stime (clock ticks).
    ProcStat { pid: i32 },
}

impl DeviceClock {
    /// The clock of process `pid`: its CPU clock if the kernel gives one, else its
    /// `/proc/<pid>/stat`.
    pub(super) fn of(pid: i32) -> DeviceClock {
        let clock = clock_getcpuclockid(Pid::from_raw(pid))
            .ok()
            .filter(|c| clock_gettime(*c).is_ok());
        match clock {
            Some(clock) => DeviceClock::Clock { pid, clock },
            None => DeviceClock::ProcStat { pid },
        }
    }

    /// The report's name of the source.
    pub(super) fn source(self) -> &'static str {
        match self {
            DeviceClock::Clock { .. } => "process cpu clock",
            DeviceClock::ProcStat { .. } => "/proc/<pid>/stat ticks",
        }
    }

    /// The device's CPU time so far (`None`: it is gone or its stat unreadable).
    pub(super) fn read(self) -> Option<Duration> {
        match self {
            DeviceClock::Clock { clock, .. } => clock_gettime(clock).ok().map(Duration::from),
            DeviceClock::ProcStat { pid } => stat_cpu(pid),
        }
    }
}

/// User + system time of process `pid` from `/proc/<pid>/stat`.
pub(super) fn stat_cpu(pid: i32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (user, system) = parse_stat_ticks(&text)?;
    Some(ticks(user + system))
}

/// Clock ticks as time (`sysconf(_SC_CLK_TCK)`, 100 where it says nothing).
fn ticks(n: u64) -> Duration {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|hz| *hz > 0)
        .unwrap_or(100) as u64;
    Duration::from_nanos(n.saturating_mul(1_000_000_000) / hz)
}

/// Fields 14 and 15 (utime, stime, in clock ticks) of a `/proc/<pid>/stat` line. Field 2
/// is the command in parentheses and may hold spaces and parentheses itself, so the
/// fields are counted from the last `)`: field 3 (the state) is the first after it.
pub(super) fn parse_stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace().skip(14 - 3);
    let user = f.next()?.parse().ok()?;
    let system = f.next()?.parse().ok()?;
    Some((user, system))
}

/// CPU time (ns) over timed batches, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct CpuSums {
    /// The VMM's.
    pub(super) vmm_ns: u64,
    /// The device's (`None`: no device process, or it could not be read).
    pub(super) device_ns: Option<u64>,
    /// The part of `vmm_ns` the driver thread spent running the guest's checks and RAM
    /// re-read.
    pub(super) guest_ns: u64,
    /// The VMM's and the device's after the batch ended, until the case was idle again
    /// (the device's idle poll, the mapping service's reply spin): not in `vmm_ns` or
    /// `device_ns`.
    pub(super) after_ns: u64,
    /// Batches summed.
    pub(super) batches: u32,
}

impl CpuSums {
    /// Adds another batch's (or sum's). The device's time is known only if it is known
    /// for every batch.
    pub(super) fn add(&mut self, o: &CpuSums) {
        self.device_ns = match (self.device_ns, o.device_ns) {
            _ if self.batches == 0 => o.device_ns,
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.vmm_ns += o.vmm_ns;
        self.guest_ns += o.guest_ns;
        self.after_ns += o.after_ns;
        self.batches += o.batches;
    }
}

/// A reading of the VMM's and a device's CPU time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reading {
    vmm: Duration,
    device: Option<Duration>,
}

impl Reading {
    /// Now, for the VMM and `device` (if the case has one).
    pub(super) fn take(device: Option<DeviceClock>) -> Reading {
        Reading {
            vmm: vmm(),
            device: device.and_then(DeviceClock::read),
        }
    }
}

/// What one batch cost: `start` before its first command, `end` after its last, `idle`
/// once the case has gone idle again; `guest` the driver thread's time in guest steps.
pub(super) fn batch_cost(start: Reading, end: Reading, idle: Reading, guest: Duration) -> CpuSums {
    let ns = |a: Duration, b: Duration| b.saturating_sub(a).as_nanos() as u64;
    let device = |a: &Reading, b: &Reading| match (a.device, b.device) {
        (Some(x), Some(y)) => Some(ns(x, y)),
        _ => None,
    };
    CpuSums {
        vmm_ns: ns(start.vmm, end.vmm),
        device_ns: device(&start, &end),
        guest_ns: guest.as_nanos() as u64,
        after_ns: ns(end.vmm, idle.vmm) + device(&end, &idle).unwrap_or(0),
        batches: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line (`cat /proc/self/stat`) with utime 25 and stime 7.
    const CAT: &str = "11894 (cat) R 11891 11891 839 0 -1 4194304 99 0 0 0 25 7 0 0 20 0 1 0 \
                       81280 3133440 394 18446744073709551615 94288836440064 94288836459945 \
                       140722345648800 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";

    #[test]
    fn stat_fields_14_and_15() {
        assert_eq!(parse_stat_ticks(CAT), Some((25, 7)));
    }

    #[test]
    fn stat_command_with_spaces_and_parentheses() {
        // A command may be anything up to 15 bytes, ") 1 2 3" included.
        let odd = CAT.replace("(cat)", "(a) 9 9 (b c)");
        assert_eq!(parse_stat_ticks(&odd), Some((25, 7)));
    }

    #[test]
    fn stat_malformed() {
        assert_eq!(parse_stat_ticks(""), None);
        assert_eq!(parse_stat_ticks("1 (x) R 1 2 3"), None, "too few fields");
        assert_eq!(parse_stat_ticks(&CAT.replace(" 25 7 ", " 25 x ")), None);
        assert_eq!(parse_stat_ticks(&CAT.replace(')', " ")), None, "no command");
    }

    fn burn(d: Duration) {
        let t = std::time::Instant::now();
        let mut x = 1u64;
        while t.elapsed() < d {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }

    /// The three sources agree on this process after a burst of work: the parser reads the
    /// kernel's own stat, the clock of a pid is the process's.
    #[test]
    fn sources_agree_on_this_process() {
        let pid = std::process::id() as i32;
        let clock = DeviceClock::of(pid);
        assert!(matches!(clock, DeviceClock::Clock { .. }), "{clock:?}");
        let (v0, c0, t0) = (vmm(), clock.read().unwrap(), this_thread());
        burn(Duration::from_millis(300));
        let (v1, c1, t1) = (vmm(), clock.read().unwrap(), this_thread());
        let stat = stat_cpu(pid).unwrap();
        let clock_ms = (c1 - c0).as_secs_f64() * 1e3;
        let vmm_ms = (v1 - v0).as_secs_f64() * 1e3;
        let thread_ms = (t1 - t0).as_secs_f64() * 1e3;
        // Other test threads may run meanwhile (process clocks only grow by more).
        assert!(thread_ms > 100.0, "thread {thread_ms} ms");
        assert!(
            clock_ms >= thread_ms - 1.0,
            "clock {clock_ms} thread {thread_ms}"
        );
        assert!(
            vmm_ms >= thread_ms - 1.0,
            "rusage {vmm_ms} thread {thread_ms}"
        );
        // /proc/<pid>/stat, read between two clock readings: utime and stime are each cut
        // to a tick (10 ms), so it is at most two ticks below the earlier reading and never
        // above the later one.
        let c2 = clock.read().unwrap();
        assert!(
            stat + Duration::from_millis(25) >= c1 && stat <= c2,
            "stat {stat:?}, clock {c1:?} then {c2:?}"
        );
        let procstat = DeviceClock::ProcStat { pid };
        assert!(procstat.read().unwrap() >= stat);
        assert_eq!(procstat.source(), "/proc/<pid>/stat ticks");
    }

    #[test]
    fn a_gone_process_reads_nothing() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert_eq!(stat_cpu(pid), None);
        assert_eq!(DeviceClock::ProcStat { pid }.read(), None);
    }

    #[test]
    fn batch_cost_splits_the_phases() {
        let r = |vmm_ms: u64, dev_ms: Option<u64>| Reading {
            vmm: Duration::from_millis(vmm_ms),
            device: dev_ms.map(Duration::from_millis),
        };
        let c = batch_cost(
            r(10, Some(100)),
            r(13, Some(105)),
            r(14, Some(107)),
            Duration::from_millis(1),
        );
        assert_eq!(c.vmm_ns, 3_000_000);
        assert_eq!(c.device_ns, Some(5_000_000));
        assert_eq!(c.guest_ns, 1_000_000);
        assert_eq!(c.after_ns, 3_000_000);
        // No device: the VMM only; a device that went away mid-batch: no device figure.
        let c = batch_cost(r(10, None), r(12, None), r(12, None), Duration::ZERO);
        assert_eq!((c.vmm_ns, c.device_ns, c.after_ns), (2_000_000, None, 0));
        let c = batch_cost(r(10, Some(1)), r(12, None), r(12, None), Duration::ZERO);
        assert_eq!(c.device_ns, None);
        let mut sum = CpuSums::default();
        sum.add(&batch_cost(
            r(0, Some(0)),
            r(1, Some(2)),
            r(1, Some(2)),
            Duration::ZERO,
        ));
        sum.add(&batch_cost(
            r(5, Some(5)),
            r(7, Some(8)),
            r(7, Some(8)),
            Duration::ZERO,
        ));
        assert_eq!((sum.vmm_ns, sum.device_ns), (3_000_000, Some(5_000_000)));
        assert_eq!(sum.batches, 2);
        // A batch without a device figure makes the sum's unknown.
        sum.add(&batch_cost(
            r(0, None),
            r(1, None),
            r(1, None),
            Duration::ZERO,
        ));
        assert_eq!(sum.device_ns, None);
    }
}
