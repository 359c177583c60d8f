//! SIGINT and SIGTERM as a request to stop: both supervisors (`hostmem run`, `hostmem
//! vhost-user`) end their device, remove its socket and cgroup and print a summary instead of
//! dying with the device still running.
//!
//! The signals are blocked and read from a `signalfd` (no handler, no `unsafe`), so they
//! must be blocked before any other thread exists: [`StopSignals::install`] is the first
//! thing `main` does. The jailed child does not inherit the mask (the launcher clears it
//! before the exec), nor do `std::process::Command` children (std clears it too).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The stop signals, readable without blocking.
#[derive(Debug)]
pub struct StopSignals {
    fd: SignalFd,
}

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread (and every thread it starts after)
    /// and opens a signalfd for them.
    pub fn install() -> nix::Result<StopSignals> {
        let set = Self::set();
        set.thread_block()?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(StopSignals { fd })
    }

    fn set() -> SigSet {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set
    }

    /// A stop signal that has arrived (taken), if any.
    pub fn received(&self) -> Option<Signal> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
            _ => None,
        }
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
