//! Returning chains: responses into their chains, used entries, notifications (with
//! `EVENT_IDX`), fences and asynchronous placements finished.

use std::io::Write;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::gpu::Placer;

use super::{
    queue::fit_response, split_token, write_segments, BadChain, GuestMemoryMmap, VirtioGpu,
    VRING_AVAIL_F_NO_INTERRUPT,
};

impl<P: Placer> VirtioGpu<P> {
    pub(super) fn return_used(
        &mut self,
        mem: &GuestMemoryMmap,
        index: u16,
        head: u16,
        written: usize,
    ) {
        let Some(Some(q)) = self.queues.get_mut(usize::from(index)) else {
            return;
        };
        q.heads.remove(&head);
        let len = u32::try_from(written).unwrap_or(u32::MAX);
        if q.queue.add_used(mem, head, len).is_err() {
            self.stats.bad_chains += 1;
            self.limiter.warn(
                BadChain::UsedRing.describe(),
                format_args!("queue {index}: head {head}: used ring not writable"),
            );
            return;
        }
        q.dirty = true;
    }

    /// Writes every response the handler has ready into its chain, returns the chains used
    /// and notifies the driver where it asked for it.
    pub fn flush(&mut self) {
        let ready = self.gpu.take_ready();
        if let Some(mem) = self.mem.clone() {
            for (t, resp) in ready {
                let Some(p) = self.pending.remove(&t) else {
                    log::debug!("response for unknown token {t:#x} dropped");
                    continue;
                };
                let (generation, index, head) = split_token(t);
                if generation != self.generation {
                    continue;
                }
                let bytes = fit_response(resp, &p);
                let written = write_segments(&mem, &p.writable, &bytes);
                self.return_used(&mem, index, head, written);
            }
            self.notify(&mem);
        }
    }

    /// Signals the call eventfd of every queue with new used entries whose driver wants to
    /// hear of it.
    fn notify(&mut self, mem: &GuestMemoryMmap) {
        for q in self.queues.iter_mut().flatten() {
            if !q.dirty {
                continue;
            }
            q.dirty = false;
            let wanted = match q.queue.needs_notification(mem) {
                Ok(true) if !q.queue.event_idx_enabled() => {
                    // Without event index the driver's avail flags decide.
                    let flags: u16 = mem
                        .read_obj(GuestAddress(q.queue.avail_ring()))
                        .map(u16::from_le)
                        .unwrap_or(0);
                    flags & VRING_AVAIL_F_NO_INTERRUPT == 0
                }
                Ok(w) => w,
                Err(_) => true,
            };
            if wanted {
                if let Err(e) = (&q.call).write_all(&1u64.to_ne_bytes()) {
                    log::warn!("virtio: signalling the call eventfd failed: {e}");
                }
                self.stats.interrupts += 1;
            } else {
                self.stats.suppressed += 1;
            }
        }
    }

    /// Releases the responses whose fences retired ([`Gpu::poll_fences`]) and writes them.
    ///
    /// [`Gpu::poll_fences`]: crate::gpu::Gpu::poll_fences
    pub fn poll_fences(&mut self) {
        if self.gpu.parked() > 0 && self.gpu.poll_fences() > 0 {
            self.flush();
        }
    }

    /// Settles the oldest pipelined placement and writes what became ready.
    pub fn finish_one(&mut self) {
        self.gpu.finish_one();
        self.flush();
    }

    /// Settles the oldest pipelined placement and every following one whose verdict is
    /// already in ([`Gpu::finish_ready`]), then writes what became ready: one notification
    /// for the run, where one per verdict woke the driver again and again.
    ///
    /// [`Gpu::finish_ready`]: crate::gpu::Gpu::finish_ready
    pub fn finish_ready(&mut self) {
        self.gpu.finish_ready();
        self.flush();
    }
}
