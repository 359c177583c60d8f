//! Serving a queue: kicks, popping chains, and handing control and cursor commands to the
//! [`Gpu`].

use std::io::Read;
use std::os::fd::AsFd;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use crate::gpu::Placer;
use crate::wire::{CtrlHdr, ErrorCode, Response, CTRL_HDR_SIZE, VIRTIO_GPU_RESP_OK_NODATA};

use super::{
    min_response, read_chain, token, write_segments, BadChain, GuestMemoryMmap, Pending, Refused,
    VirtioGpu, CONTROLQ, MAX_CURSOR_REQUEST, MAX_REQUEST, MAX_ROUNDS, NUM_QUEUES,
};

impl<P: Placer> VirtioGpu<P> {
    /// A kick on queue `index`: reads its eventfd's counter (if it is readable; never
    /// blocks), then serves the queue.
    pub fn kick(&mut self, index: u16) {
        let Some(Some(q)) = self.queues.get_mut(usize::from(index)) else {
            self.limiter.warn(
                "kick on a disabled queue",
                format_args!("kick on queue {index}, which is not enabled"),
            );
            return;
        };
        let mut pfd = [nix::poll::PollFd::new(
            q.kick.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let readable =
            matches!(nix::poll::poll(&mut pfd, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0);
        if readable {
            let mut buf = [0u8; 8];
            if let Ok(8) = (&q.kick).read(&mut buf) {
                self.stats.wakeups += 1;
                self.stats.kicks = self.stats.kicks.saturating_add(u64::from_ne_bytes(buf));
            }
        }
        self.process_queue(index);
    }

    /// Serves queue `index` without looking at its eventfd: takes every available chain,
    /// submits control commands, returns cursor chains, writes the responses that are ready
    /// and notifies the driver if it asked for it. Then re-enables driver notifications
    /// (event index: `avail_event` = next avail) and goes again if more chains came
    /// meanwhile, at most [`MAX_ROUNDS`] times: after that the queue is marked
    /// [`VirtioGpu::busy`] and the loop serves it again without waiting for a kick, so one
    /// busy queue cannot starve the transport tube.
    pub fn process_queue(&mut self, index: u16) {
        let Some(mem) = self.mem.clone() else {
            self.limiter.warn(
                "no guest memory",
                format_args!("queue {index} served before guest memory"),
            );
            return;
        };
        for _ in 0..MAX_ROUNDS {
            let heads = {
                let Some(Some(q)) = self.queues.get_mut(usize::from(index)) else {
                    return;
                };
                q.more = false;
                if q.broken {
                    return;
                }
                match q.queue.iter(&mem) {
                    Ok(iter) => iter.map(|c| c.head_index()).collect::<Vec<u16>>(),
                    Err(e) => {
                        q.broken = true;
                        self.stats.bad_chains += 1;
                        self.limiter.warn(
                            BadChain::AvailIndex.describe(),
                            format_args!("queue {index}: {e}: ignored until reset"),
                        );
                        return;
                    }
                }
            };
            for head in heads {
                self.stats.chains += 1;
                if index == CONTROLQ {
                    self.control_chain(&mem, head);
                } else {
                    self.cursor_chain(&mem, index, head);
                }
            }
            // The run's maps went to the VMM as they were announced; the device's own
            // placements of them now, while the VMM makes its copies.
            self.gpu.place_due();
            self.flush();
            let Some(Some(q)) = self.queues.get_mut(usize::from(index)) else {
                return;
            };
            match q.queue.enable_notification(&mem) {
                Ok(true) => q.more = true,
                Ok(false) => return,
                Err(_) => {
                    // The used ring was checked at enable; nothing more to do here.
                    return;
                }
            }
        }
    }

    /// True when a queue has chains left from a busy [`VirtioGpu::process_queue`]: serve
    /// them ([`VirtioGpu::process_busy`]) without waiting for a kick.
    pub fn busy(&self) -> bool {
        self.queues.iter().flatten().any(|q| q.more && !q.broken)
    }

    /// Serves the queues that [`VirtioGpu::busy`] reported.
    pub fn process_busy(&mut self) {
        for index in 0..NUM_QUEUES as u16 {
            if matches!(self.queues.get(usize::from(index)), Some(Some(q)) if q.more) {
                self.process_queue(index);
            }
        }
    }

    fn cursor_chain(&mut self, mem: &GuestMemoryMmap, index: u16, head: u16) {
        let Some(Some(q)) = self.queues.get_mut(usize::from(index)) else {
            return;
        };
        // Checked here, not left to add_used: virtio-queue logs every out-of-range head
        // itself, which a flooding driver would turn into a flood of log lines.
        if head >= q.queue.size() {
            self.stats.bad_chains += 1;
            self.limiter.warn(
                BadChain::HeadOutOfRange.describe(),
                format_args!("queue {index}: head {head} cannot be returned: dropped"),
            );
            return;
        }
        let desc = GuestAddress(q.queue.desc_table());
        let size = q.queue.size();
        match read_chain(mem, desc, size, head, MAX_CURSOR_REQUEST) {
            Ok(chain) => self.gpu.cursor(&chain.request),
            Err(refused) => {
                self.stats.bad_chains += 1;
                self.limiter.warn(
                    refused.kind.describe(),
                    format_args!("cursorq: head {head}: {}", refused.kind),
                );
            }
        }
        // Returned at once with nothing written (cursor commands have no response, and no
        // cursor head is ever in flight).
        self.return_used(mem, index, head, 0);
    }

    fn control_chain(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let Some(Some(q)) = self.queues.get_mut(usize::from(CONTROLQ)) else {
            return;
        };
        if q.heads.contains(&head) {
            self.stats.bad_chains += 1;
            self.limiter.warn(
                BadChain::HeadInFlight.describe(),
                format_args!("controlq: head {head} offered again while in flight: dropped"),
            );
            return;
        }
        let desc = GuestAddress(q.queue.desc_table());
        let size = q.queue.size();
        let refused = match read_chain(mem, desc, size, head, MAX_REQUEST) {
            Ok(chain) => {
                let need = min_response(&chain.request);
                if chain.writable_len >= need {
                    let t = token(self.generation, CONTROLQ, head);
                    q.heads.insert(head);
                    self.pending.insert(
                        t,
                        Pending {
                            writable: chain.writable,
                            writable_len: chain.writable_len,
                            hdr: CtrlHdr::parse(&chain.request).ok(),
                        },
                    );
                    self.gpu.submit(t, &chain.request);
                    return;
                }
                Refused {
                    kind: BadChain::ResponseTooSmall,
                    hdr: CtrlHdr::parse(&chain.request).ok(),
                    writable: chain.writable,
                    writable_len: chain.writable_len,
                }
            }
            Err(r) => r,
        };
        self.stats.bad_chains += 1;
        self.limiter.warn(
            refused.kind.describe(),
            format_args!("controlq: head {head}: {}", refused.kind),
        );
        if refused.kind == BadChain::HeadOutOfRange {
            return;
        }
        let written = if refused.writable_len >= CTRL_HDR_SIZE {
            let hdr = refused.hdr.unwrap_or_default();
            let resp = Response::error_for(&hdr, refused.kind.code()).encode();
            write_segments(mem, &refused.writable, &resp)
        } else {
            0
        };
        self.return_used(mem, CONTROLQ, head, written);
    }
}

/// The response as it goes into the chain: `OK_NODATA` cut to the writable part (its tail
/// is hostmem's extension), anything else that does not fit replaced by `ERR_UNSPEC`.
pub(super) fn fit_response(resp: Vec<u8>, p: &Pending) -> Vec<u8> {
    if resp.len() <= p.writable_len {
        return resp;
    }
    let ok_nodata = CtrlHdr::parse(&resp).is_ok_and(|h| h.type_ == VIRTIO_GPU_RESP_OK_NODATA);
    if ok_nodata {
        let mut r = resp;
        r.truncate(p.writable_len);
        return r;
    }
    crate::gpu::COMMAND_WARNINGS.warn(
        "response does not fit",
        format_args!(
            "virtio: response of {} bytes does not fit the {} writable bytes: ERR_UNSPEC",
            resp.len(),
            p.writable_len
        ),
    );
    Response::error_for(&p.hdr.unwrap_or_default(), ErrorCode::Unspec).encode()
}
