//! Log mode's listener thread: takes the seccomp listener out of the program and records each
//! notified call before answering `CONTINUE`.

use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostmem_base::seccomp::{ListenerEvent, NotifyListener, SeccompError};
use nix::errno::Errno;

use crate::error::Error;

use super::{
    errno_of, report::report_name, step_err, SyscallReport, LISTENER_WAIT, MAX_NOTIFIED,
    RET_USER_NOTIF,
};

/// The log-mode listener thread of one program (see the module doc).
#[derive(Debug)]
pub(super) struct Notifier {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<SyscallReport>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notifier {
    /// Serves `pid`'s listener: `listener` if the launcher already holds it (a filter
    /// installed before the exec), else the one the program installs, taken from it.
    pub(super) fn start(pid: i32, listener: Option<NotifyListener>) -> Result<Notifier, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::Builder::new()
            .name(format!("seccomp-log-{pid}"))
            .spawn(move || serve_notifications(pid, listener, &s, &v))
            .map_err(|e| step_err("log-mode listener thread", errno_of(&e)))?;
        Ok(Notifier {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    pub(super) fn reports(&self) -> Vec<SyscallReport> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the thread once the program is gone (no more notifications can come).
    pub(super) fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The fd number of the seccomp listener in `pid`'s fd table, if it has one.
fn find_listener_fd(pid: i32) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.as_os_str().as_bytes() == b"anon_inode:seccomp notify")
        })
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

fn serve_notifications(
    pid: i32,
    given: Option<NotifyListener>,
    stop: &AtomicBool,
    seen: &Mutex<Vec<SyscallReport>>,
) {
    let t0 = Instant::now();
    let listener = if let Some(l) = given {
        l
    } else {
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if let Some(fd) = find_listener_fd(pid) {
                match NotifyListener::take_from(pid, fd) {
                    Ok(l) => break l,
                    Err(e) => {
                        log::error!("seccomp log mode: pid {pid}: {e}; its calls outside the policy will wait until it is killed");
                        return;
                    }
                }
            }
            if t0.elapsed() > LISTENER_WAIT {
                log::warn!("seccomp log mode: pid {pid} installed no listener within {LISTENER_WAIT:?}; nothing to report");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    log::debug!("seccomp log mode: serving pid {pid}'s listener");
    let mut dropped = 0u64;
    loop {
        match listener.wait(100) {
            Ok(ListenerEvent::Ready) => {}
            Ok(ListenerEvent::Timeout) => {
                // The program may be stopped for good while still holding the filter
                // (a zombie never hangs up); the owner tells us.
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Ok(ListenerEvent::Hangup) => break,
            Err(e) => {
                log::error!("seccomp log mode: pid {pid}: {e}");
                break;
            }
        }
        let n = match listener.recv() {
            Ok(n) => n,
            // The caller was interrupted or died between the poll and the receive.
            Err(SeccompError::Notify {
                errno: Errno::ENOENT,
                ..
            }) => continue,
            Err(e) => {
                log::error!("seccomp log mode: pid {pid}: {e}");
                break;
            }
        };
        let report = SyscallReport {
            nr: n.nr as u32,
            name: report_name(n.nr, n.arch),
            args: Some(n.args),
            code: RET_USER_NOTIF,
            arch: Some(n.arch),
            ip: None,
        };
        {
            let mut v = seen.lock().unwrap_or_else(|e| e.into_inner());
            if !v.contains(&report) {
                if v.len() < MAX_NOTIFIED {
                    if !v.iter().any(|r| r.nr == report.nr) {
                        log::warn!("seccomp log mode: pid {pid} (thread {}) called {report}: not allowed by the policy, let through", n.pid);
                    }
                    v.push(report);
                } else {
                    dropped += 1;
                }
            }
        }
        if let Err(e) = listener.continue_call(n.id) {
            log::error!("seccomp log mode: pid {pid}: answering call {}: {e}", n.id);
            break;
        }
    }
    if dropped > 0 {
        log::warn!("seccomp log mode: pid {pid}: {dropped} more distinct calls not recorded (limit {MAX_NOTIFIED})");
    }
}
