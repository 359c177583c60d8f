//! Every wait on the backend's main socket ends by a deadline.
//!
//! The `vhost` crate's frontend sends a request and reads its reply (or `REPLY_ACK` ack)
//! in one blocking call, and its receive loop retries on `EAGAIN`: a socket timeout
//! (`SO_RCVTIMEO`) only makes it wake up and wait again, so a backend that never answers
//! would keep the caller (the vCPU thread, in a guest's MMIO exit) forever. The socket is
//! private to the crate, so nothing can be polled between its send and its receive.
//!
//! [`Watchdog`] bounds the call from outside: before each request the caller arms a
//! deadline; a thread of the watchdog, holding a clone of the socket, `shutdown(2)`s it
//! when the deadline passes before the call returned. The blocked `recvmsg` then returns 0
//! (end of file) and the crate answers `Disconnected` or `PartialMessage`; a blocked send
//! fails with `EPIPE`. The socket stays shut down: a backend that missed a deadline is lost
//! (its supervisor kills it and restores the window), as a native device that misses its
//! transport tube's reply timeout is.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    /// The deadline of the call in progress.
    armed: Option<Instant>,
    /// The watchdog shut the socket down (a call missed its deadline).
    fired: bool,
    quit: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Shuts the backend's main socket down when a call on it misses its deadline (see the
/// module doc).
#[derive(Debug)]
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// A watchdog over `socket` (a clone of the frontend's stream: `shutdown(2)` acts on the
    /// socket, whichever fd names it).
    pub(crate) fn new(socket: UnixStream, name: String) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut st = s.lock();
            loop {
                if st.quit {
                    return;
                }
                match st.armed {
                    None => st = s.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                    Some(at) => {
                        let now = Instant::now();
                        if now >= at {
                            st.armed = None;
                            st.fired = true;
                            if let Err(e) = socket.shutdown(std::net::Shutdown::Both) {
                                log::warn!("vhost-user frontend: shutting the socket down: {e}");
                            }
                        } else {
                            st =
                                s.cv.wait_timeout(st, at - now)
                                    .map(|(g, _)| g)
                                    .unwrap_or_else(|p| p.into_inner().0);
                        }
                    }
                }
            }
        })?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `f` (one request on the socket) with the socket shut down at `timeout` from now
    /// if it has not returned by then. Returns `f`'s result and whether the deadline (this
    /// call's or an earlier one's) was missed: then the socket is shut down and the result
    /// is no answer of the backend's. (A timeout so long that the deadline is past the
    /// clock's range means no deadline; the transport's is seconds.)
    pub(crate) fn bounded<T>(&self, timeout: Duration, f: impl FnOnce() -> T) -> (T, bool) {
        {
            let mut st = self.shared.lock();
            st.armed = Instant::now().checked_add(timeout);
            self.shared.cv.notify_all();
        }
        let out = f();
        let mut st = self.shared.lock();
        st.armed = None;
        (out, st.fired)
    }

    /// Whether a call missed its deadline (the socket is shut down).
    #[cfg(test)]
    pub(crate) fn fired(&self) -> bool {
        self.shared.lock().fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vhost-user frontend: the watchdog thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_blocked_read_ends_at_the_deadline_and_the_socket_stays_shut() {
        let (mut ours, _theirs) = UnixStream::pair().unwrap();
        // As the frontend's socket has it: a read timeout that a retry loop ignores.
        ours.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let wd = Watchdog::new(ours.try_clone().unwrap(), "wd-test".into()).unwrap();
        let t0 = Instant::now();
        let (n, fired) = wd.bounded(Duration::from_millis(300), || {
            let mut b = [0u8; 1];
            loop {
                match ours.read(&mut b) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    other => return other.unwrap(),
                }
            }
        });
        assert_eq!(n, 0, "end of file after the shutdown");
        assert!(fired);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert!(wd.fired());
        let (_, fired) = wd.bounded(Duration::from_secs(1), || ());
        assert!(fired, "a lost socket stays lost");
    }

    #[test]
    fn a_call_that_returns_in_time_is_not_touched() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let wd = Watchdog::new(ours.try_clone().unwrap(), "wd-test".into()).unwrap();
        for _ in 0..100 {
            let ((), fired) = wd.bounded(Duration::from_millis(200), || ());
            assert!(!fired);
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(!wd.fired());
        std::io::Write::write_all(&mut &ours, b"x").unwrap();
        let mut b = [0u8; 1];
        theirs.read_exact(&mut b).unwrap();
        drop(wd);
    }
}
