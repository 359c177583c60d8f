//! SIGINT and SIGTERM as a request to stop: both supervisors (`hostmem run`, `hostmem
//! vhost-user`) end their device, remove its socket and cgroup and print a summary instead of
//! dying with the device still running. SIGUSR1 is read the same way, as a request for a
//! screenshot (`--screenshot`), not a stop.
//!
//! The signals are blocked and read from a `signalfd` (no handler, no `unsafe`), so they
//! must be blocked before any other thread exists: [`StopSignals::install`] is the first
//! thing `main` does. The jailed child does not inherit the mask (the launcher clears it
//! before the exec), nor do `std::process::Command` children (std clears it too).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The stop signals, readable without blocking; SIGUSR1 on the same signalfd is a
/// screenshot request, not a stop ([`StopSignals::take_screenshot_request`]).
#[derive(Debug)]
pub struct StopSignals {
    fd: SignalFd,
    screenshot: std::sync::atomic::AtomicBool,
}

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread (and every thread it starts after)
    /// and opens a signalfd for them.
    pub fn install() -> nix::Result<StopSignals> {
        let set = Self::set();
        set.thread_block()?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(StopSignals {
            fd,
            screenshot: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn set() -> SigSet {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGUSR1);
        set
    }

    /// A stop signal that has arrived (taken), if any. A SIGUSR1 read on the way is noted
    /// as a screenshot request.
    pub fn received(&self) -> Option<Signal> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGUSR1) => {
                        self.screenshot
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(sig) => return Some(sig),
                    Err(_) => return None,
                },
                _ => return None,
            }
        }
    }

    /// True (once) when a SIGUSR1 asked for a screenshot since the last call.
    pub fn take_screenshot_request(&self) -> bool {
        let _ = self.received_peek();
        self.screenshot
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads pending signals without losing a stop: a stop read here is kept for
    /// [`StopSignals::received`] by re-raising it into the (blocked) pending set.
    fn received_peek(&self) -> Option<Signal> {
        let sig = self.received()?;
        let _ = nix::sys::signal::raise(sig);
        Some(sig)
    }

    /// Waits up to `t` for a stop signal.
    pub fn wait(&self, t: Duration) -> Option<Signal> {
        let ms = u16::try_from(t.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(
            self.fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
        self.received()
    }

    /// The fd to poll with others (readable when a stop signal is pending).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
