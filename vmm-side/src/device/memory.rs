//! The device's memory bound (see the parent module's doc): a cgroup v1 `memory` group per
//! device, or rlimits where no such group can be made, and how a device's end stands against
//! it (an OOM kill, the peak). Shared by the native and the vhost-user launch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hostmem_jail::launch::{self, ExitInfo};
use serde::Serialize;

use super::DeviceExit;

/// Where cgroup v1's `memory` controller is mounted on these hosts.
const MEMORY_CGROUP_ROOT: &str = "/sys/fs/cgroup/memory";

/// How the device's memory is bounded (reported by `hostmem run`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MemoryLimitFacts {
    /// The limit in bytes (0: none).
    pub bytes: u64,
    /// `cgroup-v1` (the `memory` controller: the kernel OOM-kills the device at the limit),
    /// `rlimit` (RLIMIT_DATA + RLIMIT_FSIZE, when no memory cgroup could be made) or `none`.
    pub how: String,
    /// The device's cgroup, with `cgroup-v1`.
    pub cgroup: Option<PathBuf>,
    /// Why the cgroup could not be used, with `rlimit`.
    pub fallback_reason: Option<String>,
}

/// The per-device memory cgroup (v1), removed when dropped. Shared with the vhost-user
/// launch (`crate::vhost_user::start_backend`).
#[derive(Debug)]
pub(crate) struct DeviceCgroup {
    dir: PathBuf,
}

impl DeviceCgroup {
    /// Makes `<our memory cgroup>/hostmem-device-<our pid>-<n>` with `limit` bytes.
    fn create(limit: u64) -> Result<DeviceCgroup, String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let ours = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                ctrl.split(',')
                    .any(|c| c == "memory")
                    .then(|| path.to_string())
            })
            .ok_or("no cgroup v1 memory controller in /proc/self/cgroup")?;
        let parent = Path::new(MEMORY_CGROUP_ROOT).join(ours.trim_start_matches('/'));
        if !parent.join("memory.limit_in_bytes").exists() {
            return Err(format!("{} has no memory.limit_in_bytes", parent.display()));
        }
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| remove_stale(&parent));
        let dir = parent.join(format!(
            "hostmem-device-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cg = DeviceCgroup { dir };
        cg.write("memory.limit_in_bytes", limit)?;
        // With swap accounting, swap counts too (else the device would swap instead of
        // being stopped). Absent without swap accounting: fine.
        if cg.dir.join("memory.memsw.limit_in_bytes").exists() {
            cg.write("memory.memsw.limit_in_bytes", limit)?;
        }
        Ok(cg)
    }

    /// The group's directory (what the launcher's child joins).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&self, file: &str, v: u64) -> Result<(), String> {
        std::fs::write(self.dir.join(file), v.to_string())
            .map_err(|e| format!("{}/{file} = {v}: {e}", self.dir.display()))
    }

    /// Times the kernel's OOM killer killed a task of this group (`memory.oom_control`).
    fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.oom_control"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Most memory the group ever held.
    fn max_usage(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.max_usage_in_bytes"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Removes the device cgroups (`hostmem-device-<pid>-<n>`) of supervisors that are gone: a
/// supervisor killed outright cannot remove its own. A device still in one (from a build
/// whose devices outlived their supervisor) is killed first.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("hostmem-device-"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, n)| n.parse::<u64>().ok().and(pid.parse::<i32>().ok()))
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            log::warn!(
                "stale device cgroup {}: killing its process {p} (its supervisor {pid} is gone)",
                dir.display()
            );
            hostmem_base::sandbox::kill(p, libc::SIGKILL);
        }
        let t0 = std::time::Instant::now();
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {
                    log::info!(
                        "removed the stale device cgroup {} (its supervisor {pid} is gone)",
                        dir.display()
                    );
                    break;
                }
                Err(err) if t0.elapsed() > Duration::from_secs(3) => {
                    log::warn!("stale device cgroup {} not removed: {err}", dir.display());
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for DeviceCgroup {
    fn drop(&mut self) {
        // The device has been reaped; the kernel may still be tearing it down for a moment.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        log::warn!("device cgroup {} not removed", self.dir.display());
    }
}

/// Bounds the memory of the device about to start: its cgroup, or the rlimits to set.
pub(crate) fn memory_limit(
    limit: Option<u64>,
    rlimits: &mut launch::Rlimits,
) -> (MemoryLimitFacts, Option<DeviceCgroup>) {
    let Some(bytes) = limit.filter(|b| *b > 0) else {
        return (
            MemoryLimitFacts {
                how: "none".into(),
                ..MemoryLimitFacts::default()
            },
            None,
        );
    };
    match DeviceCgroup::create(bytes) {
        Ok(cg) => (
            MemoryLimitFacts {
                bytes,
                how: "cgroup-v1".into(),
                cgroup: Some(cg.dir.clone()),
                fallback_reason: None,
            },
            Some(cg),
        ),
        Err(why) => {
            log::warn!(
                "device memory limit: no memory cgroup ({why}); using RLIMIT_DATA and RLIMIT_FSIZE"
            );
            rlimits.data = Some(bytes);
            rlimits.fsize = bytes;
            (
                MemoryLimitFacts {
                    bytes,
                    how: "rlimit".into(),
                    cgroup: None,
                    fallback_reason: Some(why),
                },
                None,
            )
        }
    }
}

/// How a device that ended stands with respect to its memory limit: whether the kernel's
/// OOM killer killed it (a SIGKILL its cgroup counted as an OOM kill: the group holds the
/// device alone) and the most memory the group ever held (0 without a cgroup). For both the
/// native and the vhost-user device.
pub(crate) fn memory_end(info: Option<&ExitInfo>, cgroup: Option<&DeviceCgroup>) -> (bool, u64) {
    let killed = matches!(
        info,
        Some(ExitInfo::Signaled {
            signal: libc::SIGKILL,
            ..
        })
    );
    (
        killed && cgroup.is_some_and(|c| c.oom_kills() > 0),
        cgroup.map_or(0, DeviceCgroup::max_usage),
    )
}

/// For an OOM-killed device ([`DeviceExit::oom_killed`]): says so in the cause and logs it
/// at error, by name, with the limit.
pub(crate) fn note_oom(exit: &mut DeviceExit, limit: &MemoryLimitFacts) {
    if !exit.oom_killed {
        return;
    }
    exit.cause = format!(
        "{}; out of memory: the kernel's OOM killer killed it at its memory limit ({} MiB, cgroup {})",
        exit.cause,
        limit.bytes >> 20,
        limit
            .cgroup
            .as_ref()
            .map(|c| c.display().to_string())
            .unwrap_or_default()
    );
    log::error!(
        "device pid {}: out of memory: killed by the kernel's OOM killer at its memory limit of {} MiB",
        exit.pid,
        limit.bytes >> 20
    );
}
