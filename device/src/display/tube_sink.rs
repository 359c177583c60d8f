//! [`TubeSink`]: the [`FrameSink`] that hands each flushed frame to the supervisor over a
//! tube the device already has (the native device's mapping tube, a duplicate of it; the
//! vhost-user device's control tube), as [`DeviceMsg::Frame`] with one fd:
//!
//! * a 2D resource: a fresh memfd holding the frame's `stride × height` bytes, sealed
//!   (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL`: the supervisor reads bytes
//!   nobody can change, [`SharedMemory::frozen_copy`]);
//! * a blob on a `SET_SCANOUT_BLOB`: a duplicate of the blob's export fd, `offset` being
//!   where the framebuffer starts in it.
//!
//! The device never blocks on it: every send is `MSG_DONTWAIT`. When the supervisor is slow
//! (the socket's buffer full) the frame waits, one per scanout: a newer frame of that
//! scanout replaces it (counted as coalesced), and the device loop sends what waits
//! ([`FrameSink::retry`]) until it went out, so the latest frame is never lost. Cursor
//! changes go the same way as [`DeviceMsg::Cursor`] (no fd; only the latest waits).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use hostmem_base::shm::SharedMemory;
use hostmem_ipc::protocol::{CursorMsg, DeviceMsg, FrameMsg};
use hostmem_ipc::{Error as TubeError, Tube};

use super::{CursorInfo, FrameInfo, FramePixels, FrameSink};

/// Frames and cursor updates that could not be handed over: logged the 1st, 2nd, 4th, …
/// time of each kind.
pub static SINK_WARNINGS: hostmem_base::log_limit::LogLimiter =
    hostmem_base::log_limit::LogLimiter::new("hostmem_device::display::tube_sink");

/// What a [`TubeSink`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Frames sent.
    pub sent: u64,
    /// Frames replaced by a newer one of their scanout before they went out.
    pub coalesced: u64,
    /// Frames that could not be made (no memfd, no duplicate fd) or sent (a broken tube).
    pub failed: u64,
    /// Cursor updates sent.
    pub cursors: u64,
}

/// The frame sink over a tube to the supervisor.
#[derive(Debug)]
pub struct TubeSink {
    tube: Arc<Tube>,
    pending: BTreeMap<u32, (FrameMsg, OwnedFd)>,
    cursor: Option<CursorMsg>,
    broken: bool,
    stats: SinkStats,
}

impl TubeSink {
    /// A sink sending on `tube`.
    pub fn new(tube: Arc<Tube>) -> TubeSink {
        TubeSink {
            tube,
            pending: BTreeMap::new(),
            cursor: None,
            broken: false,
            stats: SinkStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> SinkStats {
        self.stats
    }

    /// Frames waiting to go out (at most one per scanout).
    pub fn pending_frames(&self) -> usize {
        self.pending.len()
    }

    fn fail(&mut self, what: &'static str, why: impl std::fmt::Display) {
        self.stats.failed += 1;
        SINK_WARNINGS.warn(what, format_args!("frame sink: {what}: {why}"));
    }

    /// Sends what waits, oldest scanout first; stops at a full buffer.
    fn send_pending(&mut self) {
        if self.broken {
            self.pending.clear();
            self.cursor = None;
            return;
        }
        while let Some((&id, _)) = self.pending.iter().next() {
            let Some((msg, fd)) = self.pending.remove(&id) else {
                break;
            };
            match self.tube.try_send(&DeviceMsg::Frame(msg), &[fd.as_fd()]) {
                Ok(true) => self.stats.sent += 1,
                Ok(false) => {
                    self.pending.insert(id, (msg, fd));
                    return;
                }
                Err(e) => {
                    self.broken = matches!(e, TubeError::Hangup);
                    self.fail("frame not sent", e);
                }
            }
        }
        if let Some(c) = self.cursor.take() {
            match self.tube.try_send(&DeviceMsg::Cursor(c), &[]) {
                Ok(true) => self.stats.cursors += 1,
                Ok(false) => self.cursor = Some(c),
                Err(e) => {
                    self.broken = matches!(e, TubeError::Hangup);
                    SINK_WARNINGS.warn(
                        "cursor not sent",
                        format_args!("frame sink: cursor not sent: {e}"),
                    );
                }
            }
        }
    }
}

impl FrameSink for TubeSink {
    fn frame(&mut self, frame: &FrameInfo, pixels: FramePixels<'_>) {
        if self.broken {
            return;
        }
        let blob = matches!(pixels, FramePixels::Blob { .. });
        let (fd, offset) = match pixels {
            FramePixels::Bytes(bytes) => match SharedMemory::frozen_copy("hostmem-frame", bytes) {
                Ok(shm) => (shm.into_fd(), frame.offset),
                Err(e) => return self.fail("frame memfd", e),
            },
            FramePixels::Blob { fd, fd_offset, .. } => match fd.try_clone_to_owned() {
                Ok(fd) => match fd_offset.checked_add(frame.offset) {
                    Some(o) => (fd, o),
                    None => return self.fail("frame offset", "fd offset + offset overflows"),
                },
                Err(e) => return self.fail("frame fd", e),
            },
        };
        let r = frame.rect;
        let msg = FrameMsg {
            scanout_id: frame.scanout_id,
            resource_id: frame.resource_id,
            width: frame.width,
            height: frame.height,
            stride: frame.stride,
            format: frame.format.to_u32(),
            offset,
            rect: [r.x, r.y, r.width, r.height],
            seq: frame.seq,
            blob,
        };
        if self.pending.insert(frame.scanout_id, (msg, fd)).is_some() {
            self.stats.coalesced += 1;
        }
        self.send_pending();
    }

    fn cursor(&mut self, cursor: &CursorInfo) {
        self.cursor = Some(CursorMsg {
            scanout_id: cursor.scanout_id,
            x: cursor.x,
            y: cursor.y,
            resource_id: cursor.resource_id,
            hot_x: cursor.hot_x,
            hot_y: cursor.hot_y,
            image_hash: if cursor.image.is_empty() {
                0
            } else {
                hostmem_ipc::protocol::image_hash(&cursor.image)
            },
        });
        self.send_pending();
    }

    fn retry(&mut self) {
        if self.pending() {
            self.send_pending();
        }
    }

    fn pending(&self) -> bool {
        !self.broken && (!self.pending.is_empty() || self.cursor.is_some())
    }

    fn counters(&self) -> Option<SinkStats> {
        Some(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::display::Format;
    use crate::wire::Rect;

    fn info(scanout_id: u32, seq: u64) -> FrameInfo {
        FrameInfo {
            scanout_id,
            resource_id: 7,
            rect: Rect::new(0, 0, 2, 2),
            scanout_rect: Rect::new(0, 0, 2, 2),
            format: Format::B8G8R8X8,
            width: 2,
            height: 2,
            stride: 8,
            offset: 0,
            seq,
        }
    }

    #[test]
    fn frames_go_out_sealed_and_a_full_tube_keeps_the_latest_per_scanout() {
        let (a, b) = Tube::pair().unwrap();
        let mut sink = TubeSink::new(Arc::new(a));
        let px: Vec<u8> = (0..16).collect();
        sink.frame(&info(0, 1), FramePixels::Bytes(&px));
        let (msg, fds) = b.recv::<DeviceMsg>().unwrap();
        let DeviceMsg::Frame(f) = msg else {
            panic!("{msg:?}")
        };
        assert_eq!((f.seq, f.stride, f.format), (1, 8, 2));
        let facts = hostmem_base::shm::file_facts(fds[0].as_fd()).unwrap();
        assert!(
            facts.sealed_for_sharing() && facts.write_sealed(),
            "{facts:?}"
        );
        assert_eq!(facts.size, 16);
        // Fill the socket until a send would block: frames then wait, one per scanout.
        let mut n = 2;
        while sink.pending_frames() == 0 {
            sink.frame(&info(0, n), FramePixels::Bytes(&px));
            n += 1;
            assert!(n < 100_000, "the socket never filled");
        }
        let before = sink.stats();
        sink.frame(&info(0, n), FramePixels::Bytes(&px));
        sink.frame(&info(1, 1), FramePixels::Bytes(&px));
        assert_eq!(sink.stats().coalesced, before.coalesced + 1);
        assert_eq!(sink.pending_frames(), 2);
        assert!(sink.pending());
        // Drain; the retry sends the latest of each scanout.
        let mut last = BTreeMap::new();
        loop {
            sink.retry();
            b.set_recv_timeout(Some(std::time::Duration::from_millis(100)))
                .unwrap();
            match b.recv::<DeviceMsg>() {
                Ok((DeviceMsg::Frame(f), _)) => {
                    last.insert(f.scanout_id, f.seq);
                }
                Ok((m, _)) => panic!("{m:?}"),
                Err(_) if !sink.pending() => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            last.get(&0),
            Some(&n),
            "the latest frame of scanout 0 went out"
        );
        assert_eq!(last.get(&1), Some(&1));
    }
}
