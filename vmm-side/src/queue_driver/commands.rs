//! Typed virtio-gpu commands over the [`QueueDriver`]: each builds a [`Command`], waits
//! for the response and turns an error response into [`CmdError::Device`].

use hostmem_device::wire::{
    Command, Response, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE, VIRTIO_GPU_BLOB_MEM_HOST3D,
};

use super::{CmdError, DriverError, QueueDriver};

fn expect_ok(bytes: &[u8]) -> Result<Response, CmdError> {
    match Response::parse(bytes) {
        Ok(Response::Err { code, .. }) => Err(CmdError::Device(code)),
        Ok(r) => Ok(r),
        Err(e) => Err(CmdError::BadResponse(e.to_string())),
    }
}

impl QueueDriver {
    /// Sends a typed command and parses the response; an error response is `Err`.
    pub fn command(&mut self, cmd: &Command) -> Result<Response, CmdError> {
        let bytes = self.call(&cmd.encode())?;
        expect_ok(&bytes)
    }

    /// `CTX_CREATE`.
    pub fn ctx_create(&mut self, ctx: u32, capset: u32) -> Result<(), CmdError> {
        self.command(&Command::ctx_create(ctx, capset, b"hostmem"))
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
        self.command(&cmd).map(drop)
    }

    /// Submits `RESOURCE_MAP_BLOB` of `res` at window offset `offset`.
    pub fn submit_map(&mut self, ctx: u32, res: u32, offset: u64) -> Result<u64, DriverError> {
        self.submit(&Command::map_blob(ctx, res, offset).encode())
    }

    /// Submits `RESOURCE_UNMAP_BLOB`.
    pub fn submit_unmap(&mut self, ctx: u32, res: u32) -> Result<u64, DriverError> {
        self.submit(&Command::unmap_blob(ctx, res).encode())
    }

    /// Waits for a map response: the map_info.
    pub fn wait_map(&mut self, tag: u64) -> Result<u32, CmdError> {
        match expect_ok(&self.wait(tag)?)? {
            Response::OkMapInfo { map_info, .. } => Ok(map_info),
            other => Err(CmdError::BadResponse(format!("{other:?} for MAP_BLOB"))),
        }
    }

    /// Waits for an OK_NODATA response; returns its reply bytes (the hostmem extension).
    pub fn wait_ok(&mut self, tag: u64) -> Result<Vec<u8>, CmdError> {
        match expect_ok(&self.wait(tag)?)? {
            Response::OkNoData { reply, .. } => Ok(reply),
            other => Err(CmdError::BadResponse(format!(
                "{other:?} instead of OK_NODATA"
            ))),
        }
    }

    /// Waits for a successful response of any kind (OK_NODATA or OK_MAP_INFO).
    pub fn wait_ok_or_map(&mut self, tag: u64) -> Result<(), CmdError> {
        expect_ok(&self.wait(tag)?).map(drop)
    }

    /// `RESOURCE_MAP_BLOB` at `offset`; returns the map_info.
    pub fn map_blob(&mut self, ctx: u32, res: u32, offset: u64) -> Result<u32, CmdError> {
        let tag = self.submit_map(ctx, res, offset)?;
        self.wait_map(tag)
    }

    /// `RESOURCE_UNMAP_BLOB`.
    pub fn unmap_blob(&mut self, ctx: u32, res: u32) -> Result<(), CmdError> {
        let tag = self.submit_unmap(ctx, res)?;
        self.wait_ok(tag).map(drop)
    }

    /// `RESOURCE_UNREF` (the device unmaps first if the blob is mapped).
    pub fn unref(&mut self, res: u32) -> Result<(), CmdError> {
        let tag = self.submit(&Command::unref(res).encode())?;
        self.wait_ok(tag).map(drop)
    }

    /// `SUBMIT_3D`: returns the reply bytes (the hostmem extension after OK_NODATA).
    pub fn submit_3d(&mut self, ctx: u32, stream: Vec<u8>) -> Result<Vec<u8>, CmdError> {
        let tag = self.submit(&Command::submit_3d(ctx, stream).encode())?;
        self.wait_ok(tag)
    }
}
