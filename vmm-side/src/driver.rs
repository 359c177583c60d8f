//! The stand-in guest driver: writes virtio-gpu commands (wire layout) on the control queue
//! as a guest's virtqueue would, with a tag per request, and collects the responses. Many
//! requests may be in flight (`submit` then `wait`), as a guest driver that batches.
//!
//! It also tells [`Hostmem`] which map/unmap/unref commands are in flight, because the VMM
//! accepts a placement event only as the answer to a guest command it knows about.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hostmem_device::wire::{
    Command, ErrorCode, Response, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE, VIRTIO_GPU_BLOB_MEM_HOST3D,
};
use hostmem_ipc::protocol::{frame, unframe};
use hostmem_ipc::Tube;

use crate::hostmem::{Expect, Hostmem};

/// Default time a command may take before the device is declared hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the device.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The control queue failed (hang-up, timeout, …): the device must be restarted.
    #[error("control queue: {0}")]
    Tube(#[from] hostmem_ipc::Error),
    /// The device answered a tag that is not in flight.
    #[error("response for unknown tag {0}")]
    UnknownTag(u64),
    /// A response without a tag.
    #[error("response of {0} bytes has no tag")]
    Untagged(usize),
}

/// A request in flight.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The resource whose expectation to clear when the response comes.
    resource: Option<u32>,
}

/// The guest side of the control queue.
#[derive(Debug)]
pub struct Driver {
    control: Tube,
    hostmem: Arc<Hostmem>,
    next_tag: u64,
    pending: HashMap<u64, Pending>,
    done: HashMap<u64, Vec<u8>>,
}

impl Driver {
    /// A driver on `control` (a dup of the VMM's end of the control queue).
    pub fn new(control: Tube, hostmem: Arc<Hostmem>) -> Result<Self, DriverError> {
        control.set_recv_timeout(Some(COMMAND_TIMEOUT))?;
        // The device answers most commands within microseconds: poll before sleeping.
        control.set_recv_spin(hostmem_ipc::REPLY_SPIN);
        // A device that stops reading the queue must not block the guest side forever.
        control.set_send_timeout(Some(COMMAND_TIMEOUT))?;
        Ok(Driver {
            control,
            hostmem,
            next_tag: 1,
            pending: HashMap::new(),
            done: HashMap::new(),
        })
    }

    /// Changes how long a response (or a full queue) may take before the device is
    /// declared hung.
    pub fn set_timeout(&self, t: Duration) -> Result<(), DriverError> {
        self.control.set_send_timeout(Some(t))?;
        Ok(self.control.set_recv_timeout(Some(t))?)
    }

    /// Sends one command. `expect` announces the placement event it may cause.
    pub fn submit(
        &mut self,
        cmd: &[u8],
        expect: Option<(u32, Expect)>,
    ) -> Result<u64, DriverError> {
        let tag = self.next_tag;
        self.next_tag += 1;
        if let Some((res, what)) = expect {
            self.hostmem.expect(res, what);
        }
        self.control.send_bytes(&frame(tag, cmd), &[])?;
        self.pending.insert(
            tag,
            Pending {
                resource: expect.map(|(r, _)| r),
            },
        );
        Ok(tag)
    }

    /// Waits for the response to `tag` (responses to other tags are kept for later).
    pub fn wait(&mut self, tag: u64) -> Result<Vec<u8>, DriverError> {
        loop {
            if let Some(r) = self.done.remove(&tag) {
                return Ok(r);
            }
            let (bytes, _fds) = self.control.recv_bytes()?;
            let (got, payload) = unframe(&bytes).ok_or(DriverError::Untagged(bytes.len()))?;
            let p = self
                .pending
                .remove(&got)
                .ok_or(DriverError::UnknownTag(got))?;
            if let Some(res) = p.resource {
                self.hostmem.done(res);
            }
            self.done.insert(got, payload.to_vec());
        }
    }

    /// Sends one command and waits for its response.
    pub fn call(
        &mut self,
        cmd: &[u8],
        expect: Option<(u32, Expect)>,
    ) -> Result<Vec<u8>, DriverError> {
        let tag = self.submit(cmd, expect)?;
        self.wait(tag)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// A command that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The device answered with a virtio-gpu error response.
    #[error("device answered {0}")]
    Device(ErrorCode),
    /// The control queue failed: the device is gone or hung.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The response is not what the command calls for.
    #[error("bad response: {0}")]
    BadResponse(String),
}

impl CmdError {
    /// True if the device must be restarted (as opposed to a refused command).
    pub fn device_lost(&self) -> bool {
        matches!(self, CmdError::Driver(_))
    }
}

fn expect_ok(bytes: &[u8]) -> Result<Response, CmdError> {
    match Response::parse(bytes) {
        Ok(Response::Err { code, .. }) => Err(CmdError::Device(code)),
        Ok(r) => Ok(r),
        Err(e) => Err(CmdError::BadResponse(e.to_string())),
    }
}

impl Driver {
    /// Sends a typed command and parses the response; an error response is `Err`.
    pub fn command(
        &mut self,
        cmd: &Command,
        expect: Option<(u32, Expect)>,
    ) -> Result<Response, CmdError> {
        let bytes = self.call(&cmd.encode(), expect)?;
        expect_ok(&bytes)
    }

    /// `CTX_CREATE`.
    pub fn ctx_create(&mut self, ctx: u32, capset: u32) -> Result<(), CmdError> {
        self.command(&Command::ctx_create(ctx, capset, b"hostmem"), None)
            .map(drop)
    }

    /// `RESOURCE_CREATE_BLOB` of a mappable HOST3D blob.
    pub fn create_blob(
        &mut self,
        ctx: u32,
        res: u32,
        blob_id: u64,
        size: u64,
    ) -> Result<(), CmdError> {
        let cmd = Command::create_blob(
            ctx,
            res,
            VIRTIO_GPU_BLOB_MEM_HOST3D,
            VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
            blob_id,
            size,
        );
        self.command(&cmd, None).map(drop)
    }

    /// Encodes `RESOURCE_MAP_BLOB` and announces the placement it causes.
    pub fn submit_map(
        &mut self,
        ctx: u32,
        res: u32,
        offset: u64,
        size: u64,
    ) -> Result<u64, DriverError> {
        let cmd = Command::map_blob(ctx, res, offset).encode();
        self.submit(&cmd, Some((res, Expect::Map { offset, len: size })))
    }

    /// Encodes `RESOURCE_UNMAP_BLOB` and announces the unmap it causes.
    pub fn submit_unmap(&mut self, ctx: u32, res: u32) -> Result<u64, DriverError> {
        self.submit(
            &Command::unmap_blob(ctx, res).encode(),
            Some((res, Expect::Unmap)),
        )
    }

    /// Waits for a map response: the map_info.
    pub fn wait_map(&mut self, tag: u64) -> Result<u32, CmdError> {
        match expect_ok(&self.wait(tag)?)? {
            Response::OkMapInfo { map_info, .. } => Ok(map_info),
            other => Err(CmdError::BadResponse(format!("{other:?} for MAP_BLOB"))),
        }
    }

    /// Waits for an OK_NODATA response.
    pub fn wait_ok(&mut self, tag: u64) -> Result<Vec<u8>, CmdError> {
        match expect_ok(&self.wait(tag)?)? {
            Response::OkNoData { reply, .. } => Ok(reply),
            other => Err(CmdError::BadResponse(format!(
                "{other:?} instead of OK_NODATA"
            ))),
        }
    }

    /// `RESOURCE_MAP_BLOB` of a blob of `size` bytes at `offset`; returns the map_info.
    pub fn map_blob(
        &mut self,
        ctx: u32,
        res: u32,
        offset: u64,
        size: u64,
    ) -> Result<u32, CmdError> {
        let tag = self.submit_map(ctx, res, offset, size)?;
        self.wait_map(tag)
    }

    /// `RESOURCE_UNMAP_BLOB`.
    pub fn unmap_blob(&mut self, ctx: u32, res: u32) -> Result<(), CmdError> {
        let tag = self.submit_unmap(ctx, res)?;
        self.wait_ok(tag).map(drop)
    }

    /// `RESOURCE_UNREF` (unmaps first if the blob is mapped).
    pub fn unref(&mut self, res: u32) -> Result<(), CmdError> {
        let tag = self.submit(&Command::unref(res).encode(), Some((res, Expect::Unmap)))?;
        self.wait_ok(tag).map(drop)
    }

    /// `SUBMIT_3D`: returns the reply bytes (the hostmem extension after OK_NODATA).
    pub fn submit_3d(&mut self, ctx: u32, stream: Vec<u8>) -> Result<Vec<u8>, CmdError> {
        let tag = self.submit(&Command::submit_3d(ctx, stream).encode(), None)?;
        self.wait_ok(tag)
    }
}
