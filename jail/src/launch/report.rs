//! What seccomp stopped or logged, and from whom: SIGSYS records (the program's claim), the
//! kernel's audit records in `/dev/kmsg` (the fact), and [`SigsysFinding`] that keeps them apart.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hostmem_base::sandbox::{self, SigsysRecord};
use serde::Serialize;

use super::{JailedChild, RET_KILL_PROCESS, RET_KILL_THREAD, RET_TRAP};

/// A syscall seccomp stopped or logged, as one source tells it: the kernel (its audit
/// record, its seccomp notification) or the program itself (its SIGSYS handler's record,
/// which is only a claim: see [`SigsysFinding`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyscallReport {
    /// Syscall number.
    pub nr: u32,
    /// Its name.
    pub name: String,
    /// The six arguments, when the SIGSYS handler or the log-mode listener reported the
    /// call (the audit record has none).
    pub args: Option<[u64; 6]>,
    /// The seccomp action: 0x00030000 trap (handler record), 0x7fc00000 user notification
    /// (log-mode listener), 0x80000000 kill or 0x7ffc0000 log (audit records).
    pub code: u32,
    /// The audit arch (0xc000003e: x86-64), when the source names it.
    pub arch: Option<u32>,
    /// The address after the syscall instruction (the audit record's `ip=`, the handler's
    /// `si_call_addr`), when the source names it.
    pub ip: Option<u64>,
}

impl std::fmt::Display for SyscallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (nr {})", self.name, self.nr)?;
        if let Some(a) = &self.args {
            write!(
                f,
                " args {:#x}, {:#x}, {:#x}, {:#x}, {:#x}, {:#x}",
                a[0], a[1], a[2], a[3], a[4], a[5]
            )?;
        }
        Ok(())
    }
}

/// The name of syscall `nr` as a SIGSYS record or a seccomp notification reports it: by
/// name for x86-64 (`AUDIT_ARCH_X86_64`), else the number and the arch.
pub(super) fn report_name(nr: i32, arch: u32) -> String {
    if arch == 0xc000_003e {
        syscall_name(nr as u32)
    } else {
        format!("syscall_{nr} (arch {arch:#x})")
    }
}

/// The name of x86-64 syscall `nr`.
pub fn syscall_name(nr: u32) -> String {
    syscalls::Sysno::new(nr as usize)
        .map_or_else(|| format!("syscall_{nr}"), |s| s.name().to_string())
}

/// Turns SIGSYS handler records (raw bytes from the report pipe) into reports, in order.
pub fn sigsys_reports_from_bytes(bytes: &[u8]) -> Vec<SyscallReport> {
    bytes
        .chunks_exact(sandbox::SIGSYS_RECORD_LEN)
        .filter_map(SigsysRecord::parse)
        .map(|r| SyscallReport {
            nr: r.nr as u32,
            name: report_name(r.nr, r.arch),
            args: Some(r.args),
            code: RET_TRAP,
            arch: Some(r.arch),
            ip: Some(r.ip),
        })
        .collect()
}

/// What is known of the call seccomp stopped a program for (it died by SIGSYS): the
/// kernel's audit record is the fact; the record the program wrote to its SIGSYS report
/// pipe is only its claim. A hostile program writes what it likes to that pipe (a forged
/// `ptrace` while the real call was `fcntl`), or nothing; the kernel's record of the trap
/// or kill it cannot touch. Where the kernel's record cannot be read the call is unknown,
/// and the claim stays a claim (see `docs/decisions/036-kernel-record-over-device-claim.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SigsysFinding {
    /// The kernel's audit record (`type=1326` in `/dev/kmsg`) of the last call seccomp
    /// trapped or killed for this program: number, arch, ip and action, no arguments.
    pub kernel_record: Option<SyscallReport>,
    /// Why there is no kernel record, when there is none.
    pub kernel_record_unavailable: Option<String>,
    /// The last record the program wrote to its SIGSYS report pipe: number, arguments and
    /// ip as the program tells them. Never the fact.
    pub device_claim: Option<SyscallReport>,
}

impl SigsysFinding {
    /// The call seccomp stopped the program for, by the kernel's word (`None`: unknown).
    pub fn syscall(&self) -> Option<&SyscallReport> {
        self.kernel_record.as_ref()
    }

    /// Whether the program's claim names the kernel's call (number, and arch and ip where
    /// both name them); `None` unless both exist.
    pub fn claim_agrees(&self) -> Option<bool> {
        let (k, c) = (self.kernel_record.as_ref()?, self.device_claim.as_ref()?);
        let same = |a: Option<u64>, b: Option<u64>| a.zip(b).is_none_or(|(a, b)| a == b);
        Some(k.nr == c.nr && same(k.arch.map(u64::from), c.arch.map(u64::from)) && same(k.ip, c.ip))
    }
}

impl std::fmt::Display for SigsysFinding {
    /// The kernel's call as the fact, the program's record only as its claim, e.g.
    /// `fcntl (nr 72) at ip 0x7f…, per the kernel's audit record; its own claim disagrees:
    /// ptrace (nr 101) args …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kernel_record {
            Some(k) => {
                write!(f, "{k}")?;
                if let Some(ip) = k.ip {
                    write!(f, " at ip {ip:#x}")?;
                }
                write!(f, ", per the kernel's audit record")?;
                match (&self.device_claim, self.claim_agrees()) {
                    (Some(c), Some(true)) => write!(f, "; its own claim agrees: {c}"),
                    (Some(c), _) => write!(f, "; its own claim disagrees: {c}"),
                    (None, _) => Ok(()),
                }
            }
            None => {
                write!(f, "syscall unknown: no kernel record (")?;
                write!(
                    f,
                    "{}",
                    self.kernel_record_unavailable
                        .as_deref()
                        .unwrap_or("not read")
                )?;
                write!(f, ")")?;
                match &self.device_claim {
                    Some(c) => write!(f, "; its own claim, unverified: {c}"),
                    None => write!(f, "; and no claim of its own"),
                }
            }
        }
    }
}

impl JailedChild {
    fn drain_reports(&self) -> Vec<SyscallReport> {
        let mut rec = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = &self.report {
            let mut buf = [0u8; 4096];
            while let Ok(n) = nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                if n == 0 {
                    break;
                }
                rec.extend_from_slice(&buf[..n]);
            }
        }
        sigsys_reports_from_bytes(&rec)
    }

    /// What is known of the call seccomp stopped the program for (call it once the program
    /// died by SIGSYS): the kernel's audit record of its last trapped or killed call (in
    /// `/dev/kmsg`; a trap is logged because the filter is installed with
    /// `SECCOMP_FILTER_FLAG_LOG`) as the fact, and the last record the program wrote to its
    /// SIGSYS report pipe as its claim only. Logs a warning when the two disagree. Made
    /// once for a reaped program (later calls return the same finding).
    pub fn sigsys_finding(&self) -> SigsysFinding {
        let mut cached = self.finding.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cached.as_ref() {
            return f.clone();
        }
        let claim = self.drain_reports().pop();
        // The kernel's last trap or kill (not an errno answer: filtered out when read).
        let last = |v: Vec<SyscallReport>| {
            v.into_iter().rev().find(|r| {
                matches!(
                    r.code & 0xffff_0000,
                    RET_TRAP | RET_KILL_PROCESS | RET_KILL_THREAD
                )
            })
        };
        // The audit line may lag the exit a little (the kernel's audit thread prints it;
        // more on a loaded machine). A record that contradicts the claim may yet be
        // followed by the fatal call's: wait the whole time for those.
        let mut kernel = None;
        let t0 = Instant::now();
        loop {
            kernel = last(self.kernel_reports()).or(kernel);
            let settled = match (&kernel, &claim) {
                (Some(k), Some(c)) => k.nr == c.nr,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if settled || t0.elapsed() >= KERNEL_RECORD_WAIT {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let unavailable = kernel.is_none().then(|| self.why_no_kernel_record());
        let finding = SigsysFinding {
            kernel_record: kernel,
            kernel_record_unavailable: unavailable,
            device_claim: claim,
        };
        if finding.claim_agrees() == Some(false) {
            if let (Some(k), Some(c)) = (&finding.kernel_record, &finding.device_claim) {
                log::warn!(
                    "jailed pid {}: the device's claim (its SIGSYS record: {c}) disagrees with \
                     the kernel's audit record ({k}): the kernel's is reported, the claim is \
                     not believed",
                    self.pid
                );
            }
        }
        if self.status.is_some() {
            *cached = Some(finding.clone());
        }
        finding
    }

    /// Why the kernel's record of the program's seccomp stop is not there.
    fn why_no_kernel_record(&self) -> String {
        let k = self.kmsg.lock().unwrap_or_else(|p| p.into_inner());
        let state = match k.as_ref() {
            Err(why) => return format!("/dev/kmsg could not be read: {why}"),
            Ok(s) => s,
        };
        // Traps when the launcher set up the SIGSYS reporter, else kills.
        let action = if self.report.is_some() {
            "trap"
        } else {
            "kill_process"
        };
        let logged = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_logged");
        if let Ok(l) = &logged {
            if !l.split_whitespace().any(|a| a == action) {
                return format!(
                    "the kernel does not log seccomp's {action} action here \
                     (/proc/sys/kernel/seccomp/actions_logged: {})",
                    l.trim()
                );
            }
        }
        let mut why = format!(
            "no seccomp audit record (type=1326) of pid {} in /dev/kmsg within {} ms",
            self.pid,
            KERNEL_RECORD_WAIT.as_millis()
        );
        if state.suppressed {
            why.push_str(
                ": the kernel suppressed audit records meanwhile (its printk rate limit), \
                 this one may be among them",
            );
        } else {
            why.push_str(
                " (an audit daemon, if one runs, takes the records instead; or the SIGSYS \
                 did not come from seccomp)",
            );
        }
        why
    }

    /// Every violation the kernel reported for the program: the log-mode listener's records
    /// (each distinct call with its arguments), then the kernel's seccomp audit records (a
    /// trap, a kill, `SECCOMP_RET_LOG` of programs without the listener, as far as the
    /// kernel's rate limit and audit backlog let them through). Not the program's own
    /// SIGSYS records: those are claims ([`JailedChild::sigsys_finding`]).
    pub fn seccomp_log(&self) -> Vec<SyscallReport> {
        let mut v = Vec::new();
        if let Some(n) = &self.notifier {
            v.extend(n.reports());
        }
        v.extend(self.kernel_reports());
        v
    }

    /// The kernel's seccomp audit records of this program so far (since the spawn).
    fn kernel_reports(&self) -> Vec<SyscallReport> {
        let mut k = self.kmsg.lock().unwrap_or_else(|p| p.into_inner());
        match k.as_mut() {
            Ok(s) => {
                let (new, suppressed) =
                    seccomp_reports_from(&mut s.file, self.pid, self.exe_needle.as_deref());
                s.seen.extend(new);
                s.suppressed |= suppressed;
                s.seen.clone()
            }
            Err(_) => vec![],
        }
    }
}

/// How long [`JailedChild::sigsys_finding`] waits for the kernel's audit record.
const KERNEL_RECORD_WAIT: Duration = Duration::from_millis(500);

/// `/dev/kmsg` read from the spawn on, and what it said so far about one program.
#[derive(Debug)]
pub(super) struct KmsgState {
    file: std::fs::File,
    /// The program's seccomp audit records read so far.
    seen: Vec<SyscallReport>,
    /// The kernel said it suppressed (rate limit) or lost audit records meanwhile.
    suppressed: bool,
}

/// `/dev/kmsg` positioned at the end of the log (`Err`: why it cannot be read).
pub(super) fn kmsg_at_end() -> Result<KmsgState, String> {
    use std::io::Seek;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("opening it: {e}"))?;
    f.seek(std::io::SeekFrom::End(0))
        .map_err(|e| format!("seeking to its end: {e}"))?;
    Ok(KmsgState {
        file: f,
        seen: vec![],
        suppressed: false,
    })
}

/// The kernel's seccomp audit record (`type=1326`) in one `/dev/kmsg` record, if it is one
/// of `pid` (or, with `exe`, of any process whose record names that executable). Only
/// records the kernel wrote count: a record written to `/dev/kmsg` from user space carries
/// a user facility (the kernel forces `LOG_USER` on those), the kernel's own facility 0.
fn seccomp_record(line: &str, pid: i32, exe: Option<&str>) -> Option<SyscallReport> {
    let (prefix, text) = line.split_once(';')?;
    let prio: u32 = prefix.split(',').next()?.parse().ok()?;
    if prio >> 3 != 0 || !text.starts_with("audit: type=1326 ") {
        return None;
    }
    let field = |k: &str| text.split_whitespace().find_map(|w| w.strip_prefix(k));
    let ours =
        field("pid=") == Some(pid.to_string().as_str()) || exe.is_some_and(|e| text.contains(e));
    if !ours {
        return None;
    }
    let hex = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok();
    let nr: u32 = field("syscall=")?.parse().ok()?;
    let code = u32::try_from(hex(field("code=")?)?).ok()?;
    let arch = field("arch=")
        .and_then(hex)
        .and_then(|a| u32::try_from(a).ok());
    Some(SyscallReport {
        nr,
        name: match arch {
            Some(a) => report_name(nr as i32, a),
            None => syscall_name(nr),
        },
        args: None,
        code,
        arch,
        ip: field("ip=").and_then(hex),
    })
}

/// Seccomp audit records of `pid` (see [`seccomp_record`]) in the kernel log, from `f`'s
/// position on (reading consumes them), and whether the kernel said meanwhile that it
/// suppressed or lost audit records.
fn seccomp_reports_from(
    f: &mut std::fs::File,
    pid: i32,
    exe: Option<&str>,
) -> (Vec<SyscallReport>, bool) {
    let mut out = Vec::new();
    let mut suppressed = false;
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let line = String::from_utf8_lossy(&buf[..n]);
                suppressed |= line.contains("kauditd_printk_skb") && line.contains("suppressed")
                    || line.contains("audit: audit_lost=");
                let Some(r) = seccomp_record(&line, pid, exe) else {
                    continue;
                };
                // An errno answer is the policy's decision, not a violation; the kernel
                // audits those too for a filter installed with SECCOMP_FILTER_FLAG_LOG.
                if r.code & 0xffff_0000 == 0x0005_0000 {
                    continue;
                }
                out.push(r);
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue, // overwritten records
            Err(_) => break,                                             // EAGAIN: end
        }
    }
    (out, suppressed)
}

#[cfg(test)]
mod tests {
    use super::RET_TRAP;
    use super::*;

    const TRAP: &str = "5,339,154644855,-;audit: type=1326 audit(1796685535.009:1): \
        auid=4294967295 uid=0 gid=0 ses=4294967295 pid=4254 comm=\"p\" exe=\"/tmp/p\" sig=0 \
        arch=c000003e syscall=72 compat=0 ip=0x7f7a8e313829 code=0x30000";

    #[test]
    fn the_kernels_seccomp_record_is_read_with_its_arch_and_ip() {
        let r = seccomp_record(TRAP, 4254, None).expect("a record of pid 4254");
        assert_eq!(r.name, "fcntl");
        assert_eq!((r.nr, r.code), (72, RET_TRAP));
        assert_eq!(r.arch, Some(0xc000_003e));
        assert_eq!(r.ip, Some(0x7f7a_8e31_3829));
        assert_eq!(r.args, None, "the audit record has no arguments");
        assert_eq!(seccomp_record(TRAP, 425, None), None, "another pid");
        assert_eq!(seccomp_record(TRAP, 42545, None), None, "another pid");
    }

    #[test]
    fn a_record_written_to_kmsg_from_user_space_is_not_the_kernels() {
        // /dev/kmsg gives whatever user space writes the LOG_USER facility (prefix >= 8).
        let forged = TRAP.replacen("5,", "13,", 1);
        assert_eq!(seccomp_record(&forged, 4254, None), None);
        let other = TRAP.replace("type=1326", "type=1300");
        assert_eq!(
            seccomp_record(&other, 4254, None),
            None,
            "not a seccomp record"
        );
    }

    fn report(nr: u32, ip: u64, args: Option<[u64; 6]>) -> SyscallReport {
        SyscallReport {
            nr,
            name: syscall_name(nr),
            args,
            code: RET_TRAP,
            arch: Some(0xc000_003e),
            ip: Some(ip),
        }
    }

    #[test]
    fn the_finding_names_the_kernels_call_and_the_device_record_only_as_a_claim() {
        let kernel = report(72, 0x1000, None);
        let forged = report(101, 0x2000, Some([1, 2, 3, 4, 5, 6]));
        let f = SigsysFinding {
            kernel_record: Some(kernel.clone()),
            kernel_record_unavailable: None,
            device_claim: Some(forged.clone()),
        };
        assert_eq!(f.claim_agrees(), Some(false));
        assert_eq!(f.syscall().map(|r| r.name.as_str()), Some("fcntl"));
        let s = f.to_string();
        assert!(
            s.starts_with("fcntl (nr 72) at ip 0x1000, per the kernel"),
            "{s}"
        );
        assert!(
            s.contains("its own claim disagrees: ptrace (nr 101)"),
            "{s}"
        );

        let honest = SigsysFinding {
            device_claim: Some(report(72, 0x1000, Some([3, 1033, 8, 0, 0, 0]))),
            ..f.clone()
        };
        assert_eq!(honest.claim_agrees(), Some(true));
        assert!(honest
            .to_string()
            .contains("its own claim agrees: fcntl (nr 72) args 0x3"));
        // The same number from another call site is not the same call.
        let elsewhere = SigsysFinding {
            device_claim: Some(report(72, 0x3000, None)),
            ..f.clone()
        };
        assert_eq!(elsewhere.claim_agrees(), Some(false));

        let unknown = SigsysFinding {
            kernel_record: None,
            kernel_record_unavailable: Some("/dev/kmsg could not be read".into()),
            device_claim: Some(forged),
        };
        assert_eq!(
            unknown.syscall(),
            None,
            "a claim is never promoted to the fact"
        );
        assert_eq!(unknown.claim_agrees(), None);
        let s = unknown.to_string();
        assert!(
            s.starts_with("syscall unknown: no kernel record (/dev/kmsg"),
            "{s}"
        );
        assert!(
            s.contains("its own claim, unverified: ptrace (nr 101)"),
            "{s}"
        );
        let json = serde_json::to_value(&unknown).unwrap();
        assert_eq!(json["kernel_record"], serde_json::Value::Null);
        assert_eq!(json["device_claim"]["name"], "ptrace");
    }
}
