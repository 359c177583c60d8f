//! [`spawn`]: opening the program and bind sources, planning the jail's root, and the one
//! `clone` through `hostmem_base::sandbox::spawn_jailed`.

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use hostmem_base::sandbox::{self, JailPlan, RootOp, SpawnError, Step};
use hostmem_base::seccomp::NotifyListener;
use hostmem_base::shm::SharedMemory;
use nix::errno::Errno;
use nix::fcntl::OFlag;

use crate::error::Error;

use super::{
    errno_of, kills_to_traps, logs_to_notifications, notify::Notifier, report::kmsg_at_end,
    step_err, JailConfig, JailedChild, SECCOMP_NOTIFY_ENV, SIGSYS_FD_ENV,
};

fn cstring(b: &[u8], what: &str) -> Result<CString, Error> {
    CString::new(b).map_err(|_| step_err(format!("{what}: NUL byte"), Errno::EINVAL))
}

fn cpath(p: &Path) -> Result<CString, Error> {
    cstring(p.as_os_str().as_bytes(), &p.display().to_string())
}

/// Host directories the new root's tmpfs may be mounted over (in the child's private mount
/// namespace only): the first that exists, is not a symlink and holds no bind source.
const ROOT_CANDIDATES: [&str; 8] = [
    "/tmp", "/mnt", "/media", "/srv", "/opt", "/var/tmp", "/run", "/home",
];

fn pick_new_root(sources: &[PathBuf]) -> Result<PathBuf, Error> {
    ROOT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|c| {
            std::fs::symlink_metadata(c).is_ok_and(|m| m.is_dir())
                && !sources.iter().any(|s| s.starts_with(c))
        })
        .ok_or_else(|| step_err("no directory to mount the new root on", Errno::ENOENT))
}

/// Plans the root: ops that recreate bind paths (read-only) inside `root`, with the
/// symlinks on their way.
struct RootPlan {
    ops: Vec<RootOp>,
    /// What each op concerns (the path inside the jail), for error messages.
    names: Vec<String>,
    /// The host paths bound (symlinks resolved).
    sources: Vec<PathBuf>,
    made: std::collections::HashSet<PathBuf>,
}

impl RootPlan {
    fn push(&mut self, op: RootOp, name: &Path) {
        self.ops.push(op);
        self.names.push(name.display().to_string());
    }

    fn mkdirs(&mut self, root: &Path, inside: &Path) -> Result<(), Error> {
        let mut prefix = PathBuf::from("/");
        for c in inside.components().skip(1) {
            prefix.push(c);
            if self.made.insert(prefix.clone()) {
                let host = root.join(prefix.strip_prefix("/").unwrap_or(&prefix));
                self.push(RootOp::Mkdir(cpath(&host)?), &prefix);
            }
        }
        Ok(())
    }

    fn bind_ro(&mut self, root: &Path, p: &Path, depth: usize) -> Result<(), Error> {
        if !p.is_absolute() || depth > 16 {
            return Err(step_err(
                format!("bind path {}", p.display()),
                Errno::EINVAL,
            ));
        }
        let mut prefix = PathBuf::from("/");
        let comps: Vec<_> = p.components().skip(1).collect();
        for (i, comp) in comps.iter().enumerate() {
            prefix.push(comp);
            let meta = std::fs::symlink_metadata(&prefix).map_err(|e| {
                step_err(
                    format!("lstat bind path {}", prefix.display()),
                    errno_of(&e),
                )
            })?;
            if !meta.file_type().is_symlink() {
                continue;
            }
            let target = std::fs::read_link(&prefix)
                .map_err(|e| step_err(format!("readlink {}", prefix.display()), errno_of(&e)))?;
            if let Some(parent) = prefix.parent() {
                self.mkdirs(root, parent)?;
            }
            if self.made.insert(prefix.clone()) {
                let host = root.join(prefix.strip_prefix("/").unwrap_or(&prefix));
                self.push(
                    RootOp::Symlink {
                        target: cpath(&target)?,
                        path: cpath(&host)?,
                    },
                    &prefix,
                );
            }
            let resolved = if target.is_absolute() {
                target
            } else {
                prefix.parent().unwrap_or(Path::new("/")).join(target)
            };
            let rest: PathBuf = comps[i + 1..].iter().collect();
            let next = normalize(&resolved.join(rest));
            return self.bind_ro(root, &next, depth + 1);
        }
        let is_dir = std::fs::metadata(p)
            .map_err(|e| step_err(format!("stat bind source {}", p.display()), errno_of(&e)))?
            .is_dir();
        let host = root.join(p.strip_prefix("/").unwrap_or(p));
        if is_dir {
            self.mkdirs(root, p)?;
        } else {
            if let Some(parent) = p.parent() {
                self.mkdirs(root, parent)?;
            }
            self.push(RootOp::Touch(cpath(&host)?), p);
        }
        self.push(
            RootOp::BindRo {
                src: cpath(p)?,
                dst: cpath(&host)?,
            },
            p,
        );
        self.sources.push(p.to_path_buf());
        Ok(())
    }
}

/// Removes `.` and resolves `..` lexically (symlink targets like `../usr/lib`).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn describe_step(e: &SpawnError, names: &[String], rlimit_names: &[&str]) -> String {
    let base = e.step.name();
    match (e.step, e.index) {
        (
            Step::Mkdir
            | Step::Symlink
            | Step::Touch
            | Step::Bind
            | Step::RemountBindRo
            | Step::MountProc,
            Some(i),
        ) => format!("{base} {}", names.get(i).map(String::as_str).unwrap_or("?")),
        (Step::Rlimit, Some(i)) => {
            format!("{base} {}", rlimit_names.get(i).copied().unwrap_or("?"))
        }
        (Step::CapBoundingDrop, Some(i)) => format!("{base} cap {i}"),
        _ => base.to_string(),
    }
}

/// Starts `cfg.program` jailed. Returns once the program has been exec'd, or with
/// [`Error::LaunchStep`] naming the step that failed.
pub fn spawn(cfg: JailConfig) -> Result<JailedChild, Error> {
    let program = std::fs::File::open(&cfg.program).map_err(|e| {
        step_err(
            format!("open program {}", cfg.program.display()),
            errno_of(&e),
        )
    })?;
    let mut keep = cfg.keep_fds;
    // Standard fds: a program's runtime (Rust's, glibc's) expects 0-2 open and would try to
    // open /dev/null itself, which the empty root does not have (and a pid-namespace init
    // ignores the resulting SIGABRT). 0 and 1 are /dev/null, 2 the given stderr or ours.
    let mut stderr = cfg.stderr;
    for target in 0..3 {
        if keep.iter().any(|(_, t)| *t == target) {
            continue;
        }
        let fd: OwnedFd = match (target, stderr.take()) {
            (2, Some(fd)) => fd,
            (2, None) => std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| step_err("dup stderr", errno_of(&e)))?,
            _ => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| step_err("open /dev/null", errno_of(&e)))?
                .into(),
        };
        keep.push((fd, target));
    }
    let mut args = cfg.args;
    let mut env = cfg.env;
    let mut report = None;
    let mut exec_filter = None;
    let mut exec_filter_flags = 0u32;
    let mut listener_socket = None;
    let mut listener_ours = None;
    let report_pipe = |keep: &mut Vec<(OwnedFd, RawFd)>,
                       env: &mut Vec<(OsString, OsString)>|
     -> Result<OwnedFd, Error> {
        let n = keep.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| step_err("report pipe", e))?;
        keep.push((w, n));
        env.push((SIGSYS_FD_ENV.into(), n.to_string().into()));
        Ok(r)
    };
    if let (Some(prog), true) = (&cfg.seccomp, cfg.seccomp_at_exec) {
        let mut filter = hostmem_base::seccomp::program_from_bytes(prog)
            .map_err(|e| step_err(format!("seccomp program: {e}"), Errno::EINVAL))?;
        if cfg.seccomp_log {
            // Log mode: the child installs the filter with a listener and sends it to us
            // before the exec; our thread serves it from the program's first call on.
            logs_to_notifications(&mut filter);
            exec_filter_flags |= libc::SECCOMP_FILTER_FLAG_NEW_LISTENER as u32;
            let (ours, theirs) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::SeqPacket,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| step_err("listener socketpair", e))?;
            listener_socket = Some(theirs);
            listener_ours = Some(ours);
        } else if cfg.sigsys_reporter {
            kills_to_traps(&mut filter);
            exec_filter_flags |= libc::SECCOMP_FILTER_FLAG_LOG as u32;
            report = Some(report_pipe(&mut keep, &mut env)?);
        }
        exec_filter = Some(filter);
    } else if let Some(prog) = &cfg.seccomp {
        let shm = SharedMemory::new("hostmem-seccomp", prog.len() as u64)
            .map_err(|e| step_err(format!("seccomp memfd: {e}"), Errno::EIO))?;
        let mut f = std::fs::File::from(shm.into_fd());
        f.write_all(prog)
            .and_then(|_| std::io::Seek::rewind(&mut f))
            .map_err(|e| step_err("write seccomp memfd", errno_of(&e)))?;
        let n = keep.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
        args.push("--seccomp-fd".into());
        args.push(n.to_string().into());
        keep.push((f.into(), n));
        report = Some(report_pipe(&mut keep, &mut env)?);
        if cfg.seccomp_log {
            env.push((SECCOMP_NOTIFY_ENV.into(), "1".into()));
        }
    }
    let cgroup_procs = match &cfg.cgroup {
        Some(dir) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map_err(|e| {
                    step_err(format!("open {}/cgroup.procs", dir.display()), errno_of(&e))
                })?,
        ),
        None => None,
    };
    let mut argv = vec![cpath(&cfg.program)?];
    for a in &args {
        argv.push(cstring(a.as_bytes(), "argument")?);
    }
    let envp = env
        .iter()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat(), "environment"))
        .collect::<Result<Vec<_>, _>>()?;
    let plan_root = |root: &Path| -> Result<RootPlan, Error> {
        let mut rp = RootPlan {
            ops: vec![],
            names: vec![],
            sources: vec![],
            made: Default::default(),
        };
        if cfg.namespaces {
            for p in &cfg.ro_binds {
                rp.bind_ro(root, p, 0)?;
            }
            if cfg.mount_proc {
                rp.mkdirs(root, Path::new("/proc"))?;
                rp.push(RootOp::Proc(cpath(&root.join("proc"))?), Path::new("/proc"));
            }
        }
        Ok(rp)
    };
    // Plan once to learn the bind sources, then again under a root that hides none.
    let root = pick_new_root(&plan_root(Path::new("/"))?.sources)?;
    let rp = plan_root(&root)?;
    let r = cfg.rlimits;
    let mut rlimits = vec![
        (libc::RLIMIT_NOFILE, r.nofile),
        (libc::RLIMIT_CORE, r.core),
        (libc::RLIMIT_FSIZE, r.fsize),
    ];
    let mut rlimit_names = vec!["RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_FSIZE"];
    if let Some(a) = r.address_space {
        rlimits.push((libc::RLIMIT_AS, a));
        rlimit_names.push("RLIMIT_AS");
    }
    if let Some(d) = r.data {
        rlimits.push((libc::RLIMIT_DATA, d));
        rlimit_names.push("RLIMIT_DATA");
    }
    let euid = nix::unistd::geteuid().as_raw();
    let outside_ids = cfg.outside_ids.unwrap_or(if euid == 0 {
        (65534, 65534)
    } else {
        (euid, nix::unistd::getegid().as_raw())
    });
    let cap_last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    let plan = JailPlan {
        namespaces: cfg.namespaces,
        outside_ids,
        new_root: cpath(&root)?,
        root_options: c"size=1m,mode=0755,nr_inodes=4096".to_owned(),
        root_ops: rp.ops,
        hostname: c"hostmem-jail".to_owned(),
        rlimits,
        cap_last_cap,
        program: program.into(),
        argv,
        envp,
        keep,
        exec_filter,
        exec_filter_flags,
        listener_socket,
        cgroup_procs,
    };
    let kmsg = kmsg_at_end();
    let exe_needle = cfg.audit_descendants.then(|| {
        let exe = std::fs::canonicalize(&cfg.program).unwrap_or_else(|_| cfg.program.clone());
        format!(" exe=\"{}\" ", exe.display())
    });
    let t0 = Instant::now();
    let pid = sandbox::spawn_jailed(&plan).map_err(|e| Error::LaunchStep {
        step: describe_step(&e, &rp.names, &rlimit_names),
        errno: e.errno,
    })?;
    log::debug!(
        "jailed {} as pid {pid} in {:?}",
        cfg.program.display(),
        t0.elapsed()
    );
    drop(plan); // our copies of the kept fds and the program
    let mut child = JailedChild {
        pid,
        status: None,
        report,
        records: Mutex::new(vec![]),
        notifier: None,
        kmsg: Mutex::new(kmsg),
        finding: Mutex::new(None),
        exe_needle,
    };
    if cfg.seccomp_log && cfg.seccomp.is_some() {
        // On failure `child` is dropped: killed and reaped.
        let listener = match listener_ours {
            Some(sock) => {
                // Sent before the exec, which spawn_jailed has seen happen: it is queued.
                let got = hostmem_base::fd::try_recv_with_fds(sock.as_fd(), &mut [0u8; 1])
                    .map_err(|e| step_err("receiving the seccomp listener", e))?;
                let fd = got.fds.into_iter().next().ok_or_else(|| {
                    step_err("receiving the seccomp listener: no fd", Errno::EBADMSG)
                })?;
                Some(NotifyListener::new(fd))
            }
            None => None,
        };
        child.notifier = Some(Notifier::start(pid, listener)?);
    }
    Ok(child)
}
