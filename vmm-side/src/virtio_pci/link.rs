//! The link to the device process: the [`DeviceLink`] trait and its native implementation
//! [`TubeLink`] (the transport tube), and attaching a (new) device, queue enables and
//! resets sent over the link, each answered before the guest's access completes.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostmem_base::kvm::{eventfd_as_fd, EventFd};
use hostmem_ipc::protocol::{GuestRegion, QueueSetup, QueueStats, TransportMsg, TransportReply};
use hostmem_ipc::Tube;

use super::{status, Error, VirtioPciGpu, VirtioState, NUM_QUEUES, VIRTIO_F_RING_EVENT_IDX};

/// Stale replies on a device link (the device answers what was not asked, or late): the
/// one per-process limiter of the transport, since the exchange has no transport at hand.
pub(super) static LINK_WARNINGS: hostmem_base::log_limit::LogLimiter =
    hostmem_base::log_limit::LogLimiter::new("hostmem_vmm::virtio_pci::link");

/// The transport's link to the device: what it must tell the device process when the guest
/// sets the device up. Every call completes only when the device has answered.
pub trait DeviceLink: Send + std::fmt::Debug {
    /// Short name for logs and reports (`transport-tube`, `vhost-user`).
    fn name(&self) -> &'static str;
    /// Guest RAM: the regions and their memfds (sent once per device, at attach).
    fn guest_memory(
        &mut self,
        regions: &[GuestRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error>;
    /// The driver enabled queue `setup.index` with these ring addresses (guest-physical);
    /// `driver_features` are the features it accepted. `kick`/`call` are bound in KVM and
    /// stay the transport's.
    fn queue_enable(
        &mut self,
        setup: &QueueSetup,
        driver_features: u64,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), Error>;
    /// Device status 0: the device drops every queue, context and blob.
    fn reset(&mut self) -> Result<(), Error>;
    /// The device's virtqueue counters.
    fn stats(&self) -> Result<QueueStats, Error>;
}

/// The native link: [`TransportMsg`]s over the transport tube.
#[derive(Debug)]
pub struct TubeLink {
    tube: Arc<Tube>,
    /// One request/reply exchange at a time (`stats` takes `&self`).
    exchange: Mutex<()>,
    seq: AtomicU64,
    /// Each exchange's deadline, from its send.
    timeout: Duration,
    /// The receive timeout was shortened to what was left of a deadline (stale replies).
    shortened: AtomicBool,
}

impl TubeLink {
    /// A link over `tube`, each exchange bounded by `timeout`.
    pub fn new(tube: Arc<Tube>, timeout: Duration) -> Result<TubeLink, Error> {
        tube.set_recv_timeout(Some(timeout))
            .map_err(Error::Timeouts)?;
        tube.set_send_timeout(Some(timeout))
            .map_err(Error::Timeouts)?;
        Ok(TubeLink {
            tube,
            exchange: Mutex::new(()),
            seq: AtomicU64::new(1),
            timeout,
            shortened: AtomicBool::new(false),
        })
    }
}

impl DeviceLink for TubeLink {
    fn name(&self) -> &'static str {
        "transport-tube"
    }

    fn guest_memory(
        &mut self,
        regions: &[GuestRegion],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let regions = regions.to_vec();
        let reply = request(
            self,
            "GuestMemory",
            |seq| TransportMsg::GuestMemory { seq, regions },
            fds,
        )?;
        done(reply, "GuestMemory")
    }

    fn queue_enable(
        &mut self,
        setup: &QueueSetup,
        _driver_features: u64,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), Error> {
        let fds = [eventfd_as_fd(kick), eventfd_as_fd(call)];
        let queue = *setup;
        request(
            self,
            "QueueEnable",
            |seq| TransportMsg::QueueEnable { seq, queue },
            &fds,
        )
        .and_then(|r| done(r, "QueueEnable"))
    }

    fn reset(&mut self) -> Result<(), Error> {
        request(self, "Reset", |seq| TransportMsg::Reset { seq }, &[])
            .and_then(|r| done(r, "Reset"))
    }

    fn stats(&self) -> Result<QueueStats, Error> {
        match request(self, "Stats", |seq| TransportMsg::Stats { seq }, &[])? {
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
}

impl VirtioPciGpu {
    /// The device cfg's `num_scanouts` from now on (the next device's, before it attaches;
    /// at least 1): a configuration change if it changed.
    pub fn set_num_scanouts(&mut self, n: u32) {
        let n = n.max(1);
        if n != self.num_scanouts {
            self.num_scanouts = n;
            self.config_changed();
        }
    }

    /// A (new) device behind its transport tube: [`VirtioPciGpu::attach_link`] with a
    /// [`TubeLink`] whose exchanges are bounded by the reply timeout.
    pub fn attach(&mut self, transport: Arc<Tube>, num_capsets: u32) -> Result<(), Error> {
        let link = TubeLink::new(transport, self.reply_timeout)?;
        self.attach_link(Box::new(link), num_capsets)
    }

    /// A (new) device: remember its link and num_capsets, send guest RAM and wait for the
    /// answer. Queues the guest enabled while no device was attached are then sent (unless
    /// the status says DEVICE_NEEDS_RESET: the driver must reset first). On an error the
    /// device is not attached.
    pub fn attach_link(
        &mut self,
        mut link: Box<dyn DeviceLink>,
        num_capsets: u32,
    ) -> Result<(), Error> {
        if self.link.is_some() {
            log::warn!("virtio-pci: a device attaches while another is attached; replacing it");
            self.detach();
        }
        let regions: Vec<GuestRegion> = self.guest_ram.iter().map(|(r, _)| *r).collect();
        let fds: Vec<BorrowedFd<'_>> = self.guest_ram.iter().map(|(_, fd)| fd.as_fd()).collect();
        link.guest_memory(&regions, &fds)?;
        if num_capsets != self.num_capsets {
            self.num_capsets = num_capsets;
            self.config_changed();
        }
        log::info!(
            "virtio-pci: device attached over {} ({num_capsets} capsets)",
            link.name()
        );
        self.link = Some(link);
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

    /// The device is gone (it died, or its supervisor stopped it after
    /// [`VirtioPciGpu::lost`]): forget it; set DEVICE_NEEDS_RESET in device_status and the
    /// ISR's config-change bit, bump config_generation; queues are no longer live. A loss
    /// the transport declared is settled: the guest's next reset can complete.
    pub fn detach(&mut self) {
        if self.link.take().is_some() {
            log::info!("virtio-pci: device detached; the driver must reset");
        }
        if let Some(why) = self.lost.take() {
            log::info!("virtio-pci: the lost device ({why}) is stopped; the driver must reset");
        }
        self.v.needs_reset = true;
        for q in &mut self.v.queues {
            q.live = false;
        }
        self.config_changed();
    }

    /// The transport gives up on the device (a reset it did not complete, a link that
    /// failed or timed out): it is forgotten as by [`VirtioPciGpu::detach`], the guest reads
    /// DEVICE_NEEDS_RESET, and [`VirtioPciGpu::lost`] says why until the supervisor has
    /// stopped it. The device may still run and still have placements in the window: only
    /// its supervisor can kill it and restore the window, and no reset completes before.
    fn declare_lost(&mut self, why: String) {
        self.warnings.log(
            log::Level::Error,
            "device lost",
            format_args!(
                "virtio-pci: device lost: {why}; it must be stopped, the driver must reset"
            ),
        );
        self.link = None;
        self.v.needs_reset = true;
        for q in &mut self.v.queues {
            q.live = false;
        }
        self.config_changed();
        if self.lost.is_none() {
            self.lost = Some(why);
        }
    }

    /// Whether a device is attached.
    pub fn is_attached(&self) -> bool {
        self.link.is_some()
    }

    /// The device's QueueStats (TransportMsg::Stats), when attached.
    pub fn stats(&self) -> Result<QueueStats, Error> {
        self.link.as_ref().ok_or(Error::NotAttached)?.stats()
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
            self.warnings.warn(
                "queue enable refused",
                format_args!("virtio-pci: enabling missing queue {index} refused"),
            );
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
            self.warnings.warn(
                "queue enable refused",
                format_args!("virtio-pci: enabling queue {index} refused: {why}"),
            );
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
            self.link.as_mut(),
            self.v.queues.get(usize::from(index)).copied(),
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
        let got = link.queue_enable(&setup, self.v.driver_features, &ev.kick, &ev.call);
        match got {
            Ok(()) => {
                if let Some(q) = self.v.queues.get_mut(usize::from(index)) {
                    q.live = true;
                }
            }
            Err(e) => {
                self.warnings.log(
                    log::Level::Error,
                    "queue enable failed",
                    format_args!("virtio-pci: queue {index}: {e}; the device needs a reset"),
                );
                let transport_failed = !matches!(e, Error::Refused { .. });
                if let Some(q) = self.v.queues.get_mut(usize::from(index)) {
                    q.enabled = false;
                }
                if transport_failed {
                    self.declare_lost(format!("queue {index} could not be enabled: {e}"));
                } else {
                    self.v.needs_reset = true;
                    self.config_changed();
                }
            }
        }
    }

    /// Device status 0: the device drops everything (the write completes only after its
    /// Done), then every virtio register is back to its initial value. A reset is complete
    /// only when the device answered it and left nothing in the window
    /// ([`VirtioPciGpu::watch_window`]); otherwise the device is declared lost
    /// ([`VirtioPciGpu::lost`]) and the status reads DEVICE_NEEDS_RESET, never 0, until the
    /// supervisor stopped it and the driver reset again (virtio 1.2 §2.1, §4.1.4.3.2: the
    /// driver waits for 0 before it re-initialises).
    pub(super) fn reset(&mut self) {
        if let Some(why) = &self.lost {
            // The lost device still runs (its supervisor has not stopped it): nothing it
            // holds is dropped yet.
            self.warnings.warn(
                "reset while the device is lost",
                format_args!("virtio-pci: reset while the lost device ({why}) is not stopped yet; status stays DEVICE_NEEDS_RESET"),
            );
            self.v = VirtioState::INITIAL;
            self.v.needs_reset = true;
            return;
        }
        let failed = match self.link.as_mut().map(|link| link.reset()) {
            None => None,
            Some(Err(e)) => Some(format!("reset not completed: {e}")),
            Some(Ok(())) => match self.window.as_ref().map(|h| h.live()) {
                Some(n) if n > 0 => Some(format!(
                    "reset answered with {n} placements still in the window"
                )),
                _ => None,
            },
        };
        self.v = VirtioState::INITIAL;
        if let Some(why) = failed {
            self.declare_lost(why);
        }
    }
}

fn reply_seq(r: &TransportReply) -> u64 {
    match r {
        TransportReply::Done { seq, .. } | TransportReply::Stats { seq, .. } => *seq,
        #[cfg(feature = "trace")]
        TransportReply::Trace { seq, .. } => *seq,
    }
}

/// One exchange: send, then wait for the reply with the same seq (older replies, left by
/// an exchange that timed out, are skipped). The whole exchange has one deadline, the
/// link's timeout from the send: a device that keeps sending stale replies cannot keep us
/// waiting past it.
fn request(
    link: &TubeLink,
    what: &'static str,
    msg: impl FnOnce(u64) -> TransportMsg,
    fds: &[BorrowedFd<'_>],
) -> Result<TransportReply, Error> {
    let _one_at_a_time = link.exchange.lock().unwrap_or_else(|p| p.into_inner());
    if link.shortened.swap(false, Ordering::Relaxed) {
        link.tube
            .set_recv_timeout(Some(link.timeout))
            .map_err(Error::Timeouts)?;
    }
    let seq = link.seq.fetch_add(1, Ordering::Relaxed);
    let deadline = Instant::now().checked_add(link.timeout);
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
        LINK_WARNINGS.warn(
            "stale transport reply",
            format_args!(
                "virtio-pci: stale reply {reply:?} while waiting for {what} {seq}; skipped"
            ),
        );
        // (A timeout past the clock's range has no deadline: each wait gets all of it.)
        let left = match deadline {
            Some(d) => d
                .checked_duration_since(Instant::now())
                .filter(|l| !l.is_zero()),
            None => Some(link.timeout),
        };
        let Some(left) = left else {
            return Err(Error::NoAnswer {
                what,
                timeout: link.timeout,
            });
        };
        link.shortened.store(true, Ordering::Relaxed);
        link.tube
            .set_recv_timeout(Some(left))
            .map_err(Error::Timeouts)?;
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
