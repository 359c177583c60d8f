//! The run's device and how the virtio-pci function reaches it: [`Transport`] picks the
//! native device (transport tube + mapping tube, [`crate::device`]) or the same binary
//! serving vhost-user ([`crate::vhost_frontend`]); a `Session` is one started, attached
//! device of either kind.

use std::sync::Arc;

use crate::device::{Device, DeviceExit, DeviceFacts};
use crate::hostmem::Hostmem;
use crate::vhost_frontend::VhostUserDevice;
use crate::virtio_pci::{VirtioPciGpu, REPLY_TIMEOUT};

use super::{RunOptions, VirtqueueReport};

/// How the VMM's virtio-pci function reaches the device process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Transport {
    /// hostmem's transport tube and mapping tube (the device mirrors the window).
    #[default]
    VirtioPci,
    /// vhost-user: the VMM is the device's frontend; `SHMEM_MAP`s are placed in the window.
    VhostUser,
}

impl Transport {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Transport::VirtioPci => "virtio-pci",
            Transport::VhostUser => "vhost-user",
        }
    }
}

/// One device and its transport attachment.
pub(super) enum Session {
    /// Transport tube + mapping tube.
    Native(Device),
    /// vhost-user; the link lives in the transport.
    VhostUser(VhostUserDevice),
}

impl Session {
    pub(super) fn facts(&self) -> &DeviceFacts {
        match self {
            Session::Native(d) => d.facts(),
            Session::VhostUser(d) => d.facts(),
        }
    }
    pub(super) fn pid(&self) -> i32 {
        self.facts().pid
    }
    /// `--kill-after` (cargo feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub(super) fn kill(&self, signal: i32) {
        match self {
            Session::Native(d) => d.kill(signal),
            Session::VhostUser(d) => d.kill(signal),
        }
    }
    pub(super) fn has_ended(&self) -> bool {
        match self {
            Session::Native(d) => d.has_ended(),
            Session::VhostUser(d) => d.has_ended(),
        }
    }
    pub(super) fn stop(self, cause: &str) -> DeviceExit {
        match self {
            Session::Native(d) => d.stop(cause),
            Session::VhostUser(d) => d.stop(cause),
        }
    }
    /// [`Session::stop`] at the normal end (a clean end logs at info).
    pub(super) fn finish(self, cause: &str) -> DeviceExit {
        match self {
            Session::Native(d) => d.finish(cause),
            Session::VhostUser(d) => d.finish(cause),
        }
    }
}

pub(super) fn connect(
    opts: &RunOptions,
    hostmem: &Arc<Hostmem>,
    pci: &mut VirtioPciGpu,
) -> anyhow::Result<Session> {
    match opts.transport {
        Transport::VirtioPci => {
            let device = Device::start(&opts.device, hostmem.clone())?;
            pci.set_num_scanouts(device.facts().num_scanouts);
            if let Err(e) = pci.attach(device.transport(), device.facts().num_capsets) {
                let exit = device.stop("the transport could not attach it");
                // Stopped: a loss the transport declared during the attach is settled.
                pci.detach();
                anyhow::bail!("attaching the device to the virtio-pci transport: {e} ({exit:?})");
            }
            Ok(Session::Native(device))
        }
        Transport::VhostUser => {
            let mut device = VhostUserDevice::start(&opts.device, hostmem.clone(), REPLY_TIMEOUT)?;
            let num_capsets = device.facts().num_capsets;
            pci.set_num_scanouts(device.facts().num_scanouts);
            let attached = match device.take_link() {
                Some(link) => pci
                    .attach_link(link, num_capsets)
                    .map_err(|e| e.to_string()),
                None => Err("no link".into()),
            };
            if let Err(e) = attached {
                let exit = device.stop("the transport could not attach it");
                pci.detach();
                anyhow::bail!("attaching the vhost-user device to the transport: {e} ({exit:?})");
            }
            Ok(Session::VhostUser(device))
        }
    }
}

/// Adds the device's virtqueue counters to `vq` (before it stops).
pub(super) fn add_stats(
    pci: &VirtioPciGpu,
    vq: &mut VirtqueueReport,
    warnings: &mut std::collections::BTreeMap<String, u64>,
    blobs: &mut super::BlobMemoryReport,
) {
    match pci.stats() {
        Ok(s) => {
            hostmem_base::log_limit::merge_counts(warnings, &s.warnings);
            if s.blob_budget != 0 {
                blobs.device_budget = Some(s.blob_budget);
            }
            blobs.device_bytes_max = blobs.device_bytes_max.max(s.blob_bytes_max);
            blobs.device_refused = blobs.device_refused.saturating_add(s.blob_budget_refusals);
            vq.kicks += s.kicks;
            vq.chains += s.chains;
            vq.bad_chains += s.bad_chains;
            vq.interrupts += s.interrupts;
        }
        Err(e) => log::debug!("virtqueue stats: {e}"),
    }
}
