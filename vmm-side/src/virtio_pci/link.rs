//! The link to the device process: attaching a (new) device, queue enables and resets sent
//! over the transport tube, each answered before the guest's access completes.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hostmem_base::kvm::eventfd_as_fd;
use hostmem_ipc::protocol::{GuestRegion, QueueSetup, QueueStats, TransportMsg, TransportReply};
use hostmem_ipc::Tube;

use super::{status, Error, VirtioPciGpu, VirtioState, NUM_QUEUES, VIRTIO_F_RING_EVENT_IDX};

/// The attached device.
#[derive(Debug)]
pub(super) struct Link {
    tube: Arc<Tube>,
    /// One request/reply exchange at a time (`stats` takes `&self`).
    exchange: Mutex<()>,
}

impl VirtioPciGpu {
    /// A (new) device: remember the transport tube and num_capsets, send GuestMemory and
    /// wait for Done. Queues the guest enabled while no device was attached are then sent
    /// (unless the status says DEVICE_NEEDS_RESET: the driver must reset first). On an
    /// error the device is not attached.
    pub fn attach(&mut self, transport: Arc<Tube>, num_capsets: u32) -> Result<(), Error> {
        if self.link.is_some() {
            log::warn!("virtio-pci: a device attaches while another is attached; replacing it");
            self.detach();
        }
        transport
            .set_recv_timeout(Some(self.reply_timeout))
            .map_err(Error::Timeouts)?;
        transport
            .set_send_timeout(Some(self.reply_timeout))
            .map_err(Error::Timeouts)?;
        let link = Link {
            tube: transport,
            exchange: Mutex::new(()),
        };
        let regions: Vec<GuestRegion> = self.guest_ram.iter().map(|(r, _)| *r).collect();
        let fds: Vec<BorrowedFd<'_>> = self.guest_ram.iter().map(|(_, fd)| fd.as_fd()).collect();
        let reply = request(
            &link,
            &self.seq,
            "GuestMemory",
            |seq| TransportMsg::GuestMemory { seq, regions },
            &fds,
        )?;
        done(reply, "GuestMemory")?;
        if num_capsets != self.num_capsets {
            self.num_capsets = num_capsets;
            self.config_changed();
        }
        self.link = Some(link);
        log::info!("virtio-pci: device attached ({num_capsets} capsets)");
        if !self.v.needs_reset {
            for index in 0..NUM_QUEUES {
                let pending = self.queue(index).is_some_and(|q| q.enabled && !q.live);
                if pending {
                    self.send_queue_enable(index);
                }
            }
        }
        if self.link.is_none() {
            return Err(Error::NotAttached);
        }
        Ok(())
    }

    /// The device died: forget it; set DEVICE_NEEDS_RESET in device_status and the ISR's
    /// config-change bit, bump config_generation; queues are no longer live.
    pub fn detach(&mut self) {
        if self.link.take().is_some() {
            log::info!("virtio-pci: device detached; the driver must reset");
        }
        self.v.needs_reset = true;
        for q in &mut self.v.queues {
            q.live = false;
        }
        self.config_changed();
    }

    /// Whether a device is attached.
    pub fn is_attached(&self) -> bool {
        self.link.is_some()
    }

    /// The device's QueueStats (TransportMsg::Stats), when attached.
    pub fn stats(&self) -> Result<QueueStats, Error> {
        let link = self.link.as_ref().ok_or(Error::NotAttached)?;
        match request(
            link,
            &self.seq,
            "Stats",
            |seq| TransportMsg::Stats { seq },
            &[],
        )? {
            TransportReply::Stats { stats, .. } => Ok(stats),
            TransportReply::Done {
                error: Some(reason),
                ..
            } => Err(Error::Refused {
                what: "Stats",
                reason,
            }),
            other => Err(Error::UnexpectedReply {
                what: "Stats",
                seq: reply_seq(&other),
                got: format!("{other:?}"),
            }),
        }
    }

    /// Whether `gpa..gpa + len` lies inside one guest RAM region.
    fn in_guest_ram(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.guest_ram.iter().any(|(r, _)| {
            r.gpa
                .checked_add(r.size)
                .is_some_and(|r_end| r.gpa <= gpa && end <= r_end)
        })
    }

    pub(super) fn enable_queue(&mut self, index: u16) {
        let Some(q) = self.queue(index).copied() else {
            log::warn!("virtio-pci: enabling missing queue {index} refused");
            return;
        };
        let st = self.device_status();
        let why = if q.enabled {
            Some("already enabled".to_string())
        } else if st & status::FEATURES_OK == 0 {
            Some("before FEATURES_OK".into())
        } else if st & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            Some(format!(
                "in status {st:#x} (queues are set up before DRIVER_OK)"
            ))
        } else {
            let n = u64::from(q.size);
            let event = u64::from(self.v.driver_features & VIRTIO_F_RING_EVENT_IDX != 0) * 2;
            // virtio 1.2 §2.7: descriptor table 16 n, available ring 6 + 2 n (+ used_event),
            // used ring 6 + 8 n (+ avail_event).
            let rings = [
                ("descriptor table", q.desc, 16, 16 * n),
                ("available ring", q.driver, 2, 6 + 2 * n + event),
                ("used ring", q.device, 4, 6 + 8 * n + event),
            ];
            rings.iter().find_map(|(what, gpa, align, len)| {
                if !gpa.is_multiple_of(*align) {
                    Some(format!("{what} at {gpa:#x} not {align}-byte aligned"))
                } else if !self.in_guest_ram(*gpa, *len) {
                    Some(format!("{what} at {gpa:#x}+{len:#x} outside guest RAM"))
                } else {
                    None
                }
            })
        };
        if let Some(why) = why {
            log::warn!("virtio-pci: enabling queue {index} refused: {why}");
            return;
        }
        if let Some(q) = self.v.queues.get_mut(usize::from(index)) {
            q.enabled = true;
        }
        if self.link.is_some() {
            self.send_queue_enable(index);
        } else {
            log::debug!(
                "virtio-pci: queue {index} enabled with no device attached; sent on attach"
            );
        }
    }

    /// Sends QueueEnable for `index` and waits. On a refusal the queue is disabled and the
    /// device needs a reset; on a tube failure the device is detached as well.
    fn send_queue_enable(&mut self, index: u16) {
        let (Some(link), Some(q), Some(ev)) = (
            self.link.as_ref(),
            self.queue(index).copied(),
            self.events.get(usize::from(index)),
        ) else {
            return;
        };
        let setup = QueueSetup {
            index,
            size: q.size,
            desc: q.desc,
            avail: q.driver,
            used: q.device,
            event_idx: self.v.driver_features & VIRTIO_F_RING_EVENT_IDX != 0,
        };
        let fds = [eventfd_as_fd(&ev.kick), eventfd_as_fd(&ev.call)];
        let got = request(
            link,
            &self.seq,
            "QueueEnable",
            |seq| TransportMsg::QueueEnable { seq, queue: setup },
            &fds,
        )
        .and_then(|r| done(r, "QueueEnable"));
        match got {
            Ok(()) => {
                if let Some(q) = self.v.queues.get_mut(usize::from(index)) {
                    q.live = true;
                }
            }
            Err(e) => {
                log::error!("virtio-pci: queue {index}: {e}; the device needs a reset");
                let transport_failed = !matches!(e, Error::Refused { .. });
                if let Some(q) = self.v.queues.get_mut(usize::from(index)) {
                    q.enabled = false;
                }
                if transport_failed {
                    self.detach();
                } else {
                    self.v.needs_reset = true;
                    self.config_changed();
                }
            }
        }
    }

    /// Device status 0: the device drops everything (the write completes only after its
    /// Done), then every virtio register is back to its initial value.
    pub(super) fn reset(&mut self) {
        if let Some(link) = &self.link {
            let got = request(
                link,
                &self.seq,
                "Reset",
                |seq| TransportMsg::Reset { seq },
                &[],
            )
            .and_then(|r| done(r, "Reset"));
            if let Err(e) = got {
                // The driver polls the status for 0 after a reset, so it must read 0 even so;
                // the device's next answer (or its supervisor) tells what became of it.
                log::error!("virtio-pci: device reset failed: {e}");
            }
        }
        self.v = VirtioState::INITIAL;
    }
}

fn reply_seq(r: &TransportReply) -> u64 {
    match r {
        TransportReply::Done { seq, .. }
        | TransportReply::Stats { seq, .. }
        | TransportReply::Trace { seq, .. } => *seq,
    }
}

/// One exchange: send, then wait for the reply with the same seq (older replies, left by
/// an exchange that timed out, are skipped).
fn request(
    link: &Link,
    seq_counter: &AtomicU64,
    what: &'static str,
    msg: impl FnOnce(u64) -> TransportMsg,
    fds: &[BorrowedFd<'_>],
) -> Result<TransportReply, Error> {
    let _one_at_a_time = link.exchange.lock().unwrap_or_else(|p| p.into_inner());
    let seq = seq_counter.fetch_add(1, Ordering::Relaxed);
    link.tube
        .send(&msg(seq), fds)
        .map_err(|source| Error::Send { what, source })?;
    loop {
        let (reply, _fds) = link
            .tube
            .recv::<TransportReply>()
            .map_err(|source| Error::Recv { what, source })?;
        let got = reply_seq(&reply);
        if got == seq {
            return Ok(reply);
        }
        if got > seq {
            return Err(Error::UnexpectedReply {
                what,
                seq,
                got: format!("{reply:?}"),
            });
        }
        log::warn!("virtio-pci: stale reply {reply:?} while waiting for {what} {seq}; skipped");
    }
}

/// `Ok` for `Done { error: None }`.
fn done(reply: TransportReply, what: &'static str) -> Result<(), Error> {
    match reply {
        TransportReply::Done { error: None, .. } => Ok(()),
        TransportReply::Done {
            error: Some(reason),
            ..
        } => Err(Error::Refused { what, reason }),
        other => Err(Error::UnexpectedReply {
            what,
            seq: reply_seq(&other),
            got: format!("{other:?}"),
        }),
    }
}
