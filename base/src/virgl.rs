//! A safe wrapper of the system's virglrenderer (Debian 12: 0.10.4), for the device's
//! `virgl` backend. Behind the `virgl` feature of this crate.
//!
//! # Why `virglrenderer-sys`
//!
//! The `virglrenderer-sys` crate (0.1.4) runs bindgen over the installed
//! `<virgl/virglrenderer.h>` (found with pkg-config, `>= 0.10`, with
//! `VIRGL_RENDERER_UNSTABLE_APIS`), so its declarations are exactly those of the library we
//! link: it builds against 0.10.4 here with `libvirglrenderer-dev`, `pkg-config` and
//! `libclang-dev`. Hand-written declarations would have to be kept in sync with the header
//! by hand; the generated ones cannot drift.
//!
//! The one function the 0.10.4 header lacks, `virgl_renderer_resource_map_fixed` (from
//! 1.3.0 on), is looked up at run time with `dlsym` ([`Renderer::has_map_fixed`]).
//!
//! # Global state
//!
//! virglrenderer is one global renderer per process: [`Renderer::init`] succeeds once at a
//! time (a second live `Renderer` is refused), and dropping the `Renderer` calls
//! `virgl_renderer_cleanup`. The library is not thread-safe; `Renderer` is `Send` but not
//! `Sync`, so all calls come from the thread that owns it.
//!
//! # Resource ids
//!
//! virglrenderer looks resource ids up in its own table, but some versions dereference an
//! unknown id before checking it (1.3.0's `map_fixed`). Callers (the device's backend) must
//! pass only ids they created; this wrapper additionally refuses id 0.

use std::ffi::{c_char, c_int, c_void};
use std::marker::PhantomData;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use virglrenderer_sys as sys;

use crate::mmap::Prot;
use crate::window::FixedTarget;

/// `VIRGL_RENDERER_USE_EGL`.
pub const USE_EGL: u32 = 1;
/// `VIRGL_RENDERER_USE_SURFACELESS`.
pub const USE_SURFACELESS: u32 = 1 << 3;
/// `VIRGL_RENDERER_USE_GLES`.
pub const USE_GLES: u32 = 1 << 4;
/// `VIRGL_RENDERER_VENUS`.
pub const VENUS: u32 = 1 << 6;
/// `VIRGL_RENDERER_RENDER_SERVER`: venus contexts run in a render server process, reached
/// over a SOCK_SEQPACKET socket (Debian's 1.3.0 builds venus only that way; 0.10.4 runs it
/// in-process). [`Renderer::init_with_server`] hands the library a socket to a server that
/// someone else started, through the `get_server_fd` callback, so the library never forks.
pub const RENDER_SERVER: u32 = 1 << 9;
/// The flags that work headless on Mesa llvmpipe/lavapipe (0x59): EGL alone and GLX need
/// a render node; SURFACELESS without EGL crashes inside the library.
pub const HEADLESS_FLAGS: u32 = USE_EGL | USE_SURFACELESS | USE_GLES | VENUS;

/// `VIRGL_RENDERER_BLOB_FD_TYPE_DMABUF`.
pub const FD_TYPE_DMABUF: u32 = 1;
/// `VIRGL_RENDERER_BLOB_FD_TYPE_OPAQUE`.
pub const FD_TYPE_OPAQUE: u32 = 2;
/// `VIRGL_RENDERER_BLOB_FD_TYPE_SHM`.
pub const FD_TYPE_SHM: u32 = 3;

/// Largest capset blob we accept from `virgl_renderer_get_cap_set` (venus's is ~160 B,
/// virgl2's ~1 KiB); a bigger answer is treated as a library bug.
pub const MAX_CAPSET_SIZE: u32 = 1 << 16;

/// Why a virglrenderer call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `Renderer` is alive already (the library is one global renderer).
    #[error("virglrenderer is already initialized in this process")]
    AlreadyInitialized,
    /// `virgl_renderer_init` failed.
    #[error("virgl_renderer_init(flags {flags:#x}) failed: {ret}")]
    Init {
        /// The flags.
        flags: u32,
        /// Its return value.
        ret: i32,
    },
    /// A library call returned an error.
    #[error("{op} of {id} failed: {ret} ({})", errno_name(*.ret))]
    Call {
        /// The function.
        op: &'static str,
        /// Resource or context id.
        id: u32,
        /// Its return value (often `-errno`).
        ret: i32,
    },
    /// An argument this wrapper refuses before calling the library.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// The library answers `-errno` from most calls but a positive errno from some (0.10.4's
/// export_blob answers `EINVAL`): name either.
fn errno_name(ret: i32) -> String {
    match ret.checked_abs() {
        Some(e) if e != 0 => nix::errno::Errno::from_raw(e).desc().to_string(),
        _ => "error".into(),
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, Error>;

static INITIALIZED: AtomicBool = AtomicBool::new(false);
/// The cookie handed to the library: it refuses a null cookie, and our callbacks ignore it.
static COOKIE: u8 = 0;

fn cookie() -> *mut c_void {
    std::ptr::addr_of!(COOKIE).cast_mut().cast()
}
/// Highest fence id the renderer reported through `write_fence`.
static LAST_FENCE: AtomicU64 = AtomicU64::new(0);

extern "C" fn write_fence(_cookie: *mut c_void, fence: u32) {
    LAST_FENCE.fetch_max(u64::from(fence), Ordering::SeqCst);
}

/// Context fences (venus) the renderer signalled: the highest id per (context, ring).
static CONTEXT_FENCES: std::sync::Mutex<Vec<((u32, u32), u64)>> = std::sync::Mutex::new(Vec::new());

/// The highest context fence the renderer signalled on `ring_idx` of `ctx_id`.
pub fn last_context_fence(ctx_id: u32, ring_idx: u32) -> u64 {
    CONTEXT_FENCES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(k, _)| *k == (ctx_id, ring_idx))
        .map_or(0, |(_, f)| *f)
}

extern "C" fn write_context_fence(_cookie: *mut c_void, ctx_id: u32, ring_idx: u32, fence: u64) {
    log::debug!("virgl: context {ctx_id} ring {ring_idx} fence {fence} signalled");
    let mut v = CONTEXT_FENCES.lock().unwrap_or_else(|p| p.into_inner());
    match v.iter_mut().find(|(k, _)| *k == (ctx_id, ring_idx)) {
        Some((_, f)) => *f = (*f).max(fence),
        None => v.push(((ctx_id, ring_idx), fence)),
    }
}

/// The render server socket handed to the library by `get_server_fd` (taken once).
static SERVER_FD: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

extern "C" fn get_server_fd(_cookie: *mut c_void, version: u32) -> c_int {
    let fd = SERVER_FD.lock().unwrap_or_else(|p| p.into_inner()).take();
    match fd {
        // The library owns the fd from here on (it closes it at cleanup).
        Some(fd) => {
            log::info!("virgl: render server socket handed over (protocol version {version})");
            fd.into_raw_fd()
        }
        None => {
            log::warn!("virgl: the library asked for a render server socket; none was given");
            -1
        }
    }
}

/// The `virgl_renderer_resource_map_fixed(res, addr)` signature of virglrenderer >= 1.3.0.
type MapFixedFn = unsafe extern "C" fn(u32, *mut c_void) -> c_int;

/// What `virgl_renderer_resource_export_blob` gave.
#[derive(Debug)]
pub struct ExportedFd {
    /// `FD_TYPE_*`.
    pub fd_type: u32,
    /// The fd (ours: the library hands out a dup).
    pub fd: OwnedFd,
}

/// virglrenderer 1.3.0's `struct virgl_renderer_resource_info`: 0.10.4's (the bindings')
/// with `int fd` appended.
#[repr(C)]
struct ResourceInfo13 {
    base: sys::virgl_renderer_resource_info,
    fd: c_int,
}

/// The process's virglrenderer. See the module docs.
#[derive(Debug)]
pub struct Renderer {
    flags: u32,
    map_fixed: Option<MapFixedFn>,
    /// Not `Sync`: the library is not thread-safe.
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl Renderer {
    /// `virgl_renderer_init(flags)` with our fence callbacks, and the run-time lookup of
    /// `virgl_renderer_resource_map_fixed`.
    pub fn init(flags: u32) -> Result<Renderer> {
        Self::init_with_server(flags, None)
    }

    /// [`Renderer::init`]; with `server`, a connected socket to a running render server
    /// (`virgl_render_server --socket-fd`), venus runs there: [`RENDER_SERVER`] is added to
    /// the flags and the library gets the socket from our `get_server_fd` callback instead
    /// of forking and executing a server itself.
    pub fn init_with_server(flags: u32, server: Option<OwnedFd>) -> Result<Renderer> {
        if INITIALIZED.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyInitialized);
        }
        let flags = if server.is_some() {
            flags | RENDER_SERVER
        } else {
            flags
        };
        *SERVER_FD.lock().unwrap_or_else(|p| p.into_inner()) = server;
        // The library keeps the pointer to the callbacks for its whole life: a static.
        static mut CALLBACKS: sys::virgl_renderer_callbacks = sys::virgl_renderer_callbacks {
            version: 3,
            write_fence: Some(write_fence),
            create_gl_context: None,
            destroy_gl_context: None,
            make_current: None,
            get_drm_fd: None,
            write_context_fence: Some(write_context_fence),
            get_server_fd: Some(get_server_fd),
            get_egl_display: None,
        };
        let flags_c = c_int::try_from(flags)
            .map_err(|_| Error::InvalidArgument(format!("flags {flags:#x}")))?;
        // SAFETY: CALLBACKS is a static (lives forever) that only the library reads, and
        // INITIALIZED makes this the only init in the process until cleanup; the cookie is
        // never dereferenced (our callbacks ignore it), it only has to be non-null.
        let ret = unsafe {
            sys::virgl_renderer_init(cookie(), flags_c, std::ptr::addr_of_mut!(CALLBACKS))
        };
        // A socket the library did not take is closed here.
        let unused = SERVER_FD.lock().unwrap_or_else(|p| p.into_inner()).take();
        if ret != 0 {
            INITIALIZED.store(false, Ordering::SeqCst);
            return Err(Error::Init { flags, ret });
        }
        if let Some(fd) = unused {
            log::warn!("virgl: the library did not take the render server socket");
            drop(fd);
        }
        let name = c"virgl_renderer_resource_map_fixed";
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads the loaded
        // objects' symbol tables.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        let map_fixed = if sym.is_null() {
            None
        } else {
            // SAFETY: the symbol of that name has this signature in every virglrenderer that
            // exports it (1.3.0 on); a non-null pointer from dlsym is a valid function address.
            Some(unsafe { std::mem::transmute::<*mut c_void, MapFixedFn>(sym) })
        };
        log::info!(
            "virglrenderer initialized (flags {flags:#x}); virgl_renderer_resource_map_fixed {}",
            if map_fixed.is_some() {
                "present"
            } else {
                "absent (placement exports the blob and maps its fd)"
            }
        );
        Ok(Renderer {
            flags,
            map_fixed,
            _not_sync: PhantomData,
        })
    }

    /// The init flags.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Whether the loaded library has `virgl_renderer_resource_map_fixed` (>= 1.3.0).
    pub fn has_map_fixed(&self) -> bool {
        self.map_fixed.is_some()
    }

    /// `virgl_renderer_resource_map_fixed(res_id, target)` (virglrenderer >= 1.3.0): the
    /// library maps the blob over `target` itself, MAP_FIXED | MAP_SHARED, read/write, from
    /// file offset 0 over the resource's map size. `shm_fd` is the blob's SHM export
    /// ([`Renderer::export_blob`], type [`FD_TYPE_SHM`]), which is the file the library
    /// maps (its export is a dup of it).
    ///
    /// `Ok(false)` (the caller maps the fd itself) when the library lacks the function,
    /// when the placement is not read/write, when the fd's size is not exactly the
    /// target's length (the library maps its recorded size, which must not spill past the
    /// placement), or when the library answers `-EOPNOTSUPP`. Any other failure is an
    /// error, after which the range's contents are unknown (the window maps over it).
    pub fn map_fixed(
        &self,
        res_id: u32,
        shm_fd: BorrowedFd<'_>,
        target: &FixedTarget<'_>,
    ) -> Result<bool> {
        let Some(map_fixed) = self.map_fixed else {
            return Ok(false);
        };
        if res_id == 0 {
            return Err(Error::InvalidArgument("resource id 0".into()));
        }
        if target.prot() != Prot::READ_WRITE {
            return Ok(false);
        }
        let size = crate::shm::file_facts(shm_fd)
            .map_err(|e| Error::InvalidArgument(format!("resource {res_id}: {e}")))?
            .size;
        if usize::try_from(size).ok() != Some(target.len()) {
            log::debug!(
                "resource {res_id}: fd of {size:#x} bytes for a placement of {:#x}: \
                 not mapped by the renderer",
                target.len()
            );
            return Ok(false);
        }
        // Why the call below is sound: `target` is a window range that the Window checked
        // (inside its own mapping, page-aligned, no live placement) and keeps locked while
        // this runs; the window's memory is never accessed through Rust references, so
        // replacing its pages with a MAP_SHARED mapping of the blob (what the library does,
        // as the window's own MAP_FIXED would) invalidates nothing. The library maps `size`
        // bytes (its map size, the SHM file's size), which equals the target's length.
        // res_id is one the caller created (1.3.0 dereferences unknown ids).
        let addr = target.addr() as *mut c_void;
        // SAFETY: a checked, locked window range of exactly the blob's size (see above).
        let ret = unsafe { map_fixed(res_id, addr) };
        match ret {
            0 => Ok(true),
            r if r == -libc::EOPNOTSUPP => Ok(false),
            ret => Err(Error::Call {
                op: "virgl_renderer_resource_map_fixed",
                id: res_id,
                ret,
            }),
        }
    }

    /// `virgl_renderer_get_cap_set`: `(max_version, max_size)`; size 0 when not offered.
    /// (0.10.4 reports venus with max version 0: the size says whether a set exists.)
    pub fn capset_info(&self, set: u32) -> (u32, u32) {
        let (mut ver, mut size) = (0u32, 0u32);
        // SAFETY: two valid out-pointers to u32s on our stack.
        unsafe { sys::virgl_renderer_get_cap_set(set, &mut ver, &mut size) };
        (ver, size)
    }

    /// `virgl_renderer_fill_caps`: the capset blob of `set`/`version`.
    pub fn fill_caps(&self, set: u32, version: u32) -> Result<Vec<u8>> {
        let (max_ver, size) = self.capset_info(set);
        if size == 0 || version > max_ver || size > MAX_CAPSET_SIZE {
            return Err(Error::InvalidArgument(format!(
                "capset {set} version {version} (offered: version {max_ver}, {size} bytes)"
            )));
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: the library writes at most the `size` it reported for this set, and buf
        // has exactly that many bytes.
        unsafe { sys::virgl_renderer_fill_caps(set, version, buf.as_mut_ptr().cast()) };
        Ok(buf)
    }

    /// `virgl_renderer_context_create_with_flags` with the capset id in the flags.
    pub fn context_create(&self, ctx_id: u32, capset_id: u32, name: &[u8]) -> Result<()> {
        if ctx_id == 0 || capset_id > 0xff {
            return Err(Error::InvalidArgument(format!(
                "context {ctx_id} capset {capset_id}"
            )));
        }
        let nlen = u32::try_from(name.len().min(64)).unwrap_or(64);
        // SAFETY: name points to at least nlen readable bytes; the library copies them.
        let ret = unsafe {
            sys::virgl_renderer_context_create_with_flags(
                ctx_id,
                capset_id,
                nlen,
                name.as_ptr().cast::<c_char>(),
            )
        };
        check("virgl_renderer_context_create_with_flags", ctx_id, ret)
    }

    /// `virgl_renderer_context_destroy`. The context's signalled fences are forgotten, so a
    /// later context with the same id starts from fence 0.
    pub fn context_destroy(&self, ctx_id: u32) {
        // SAFETY: the library looks the id up and ignores unknown ids.
        unsafe { sys::virgl_renderer_context_destroy(ctx_id) };
        CONTEXT_FENCES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|((c, _), _)| *c != ctx_id);
    }

    /// `virgl_renderer_context_create_fence` on `ring_idx` of a context, without waiting:
    /// it retires through `write_context_fence` ([`last_context_fence`]) when the work
    /// submitted on that ring before it is done, seen after [`Renderer::context_poll`].
    pub fn context_create_fence(&self, ctx_id: u32, ring_idx: u32, fence_id: u64) -> Result<()> {
        // SAFETY: plain integer arguments; the library checks the context id.
        let ret =
            unsafe { sys::virgl_renderer_context_create_fence(ctx_id, 0, ring_idx, fence_id) };
        check("virgl_renderer_context_create_fence", ctx_id, ret)
    }

    /// `virgl_renderer_context_poll`: runs `write_context_fence` for the context's retired
    /// fences. Never blocks.
    pub fn context_poll(&self, ctx_id: u32) {
        // SAFETY: plain integer argument; the library ignores unknown ids.
        unsafe { sys::virgl_renderer_context_poll(ctx_id) };
    }

    /// `virgl_renderer_context_get_poll_fd`: an fd that is readable when the context has
    /// fences to retire ([`Renderer::context_poll`]), if the context has one. The library
    /// owns it; it stays open while the context lives (a caller that polls it after
    /// `context_destroy` sees POLLNVAL or a spurious wake-up, nothing worse).
    pub fn context_poll_fd(&self, ctx_id: u32) -> Option<BorrowedFd<'_>> {
        // SAFETY: plain integer argument; the library answers -1 for unknown ids.
        let fd = unsafe { sys::virgl_renderer_context_get_poll_fd(ctx_id) };
        // SAFETY: a non-negative answer is an fd the library keeps open for the context's
        // life (see above); borrowed, never closed here.
        (fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(fd) })
    }

    /// `virgl_renderer_submit_cmd`: `stream` must be whole dwords.
    pub fn submit_cmd(&self, ctx_id: u32, stream: &[u8]) -> Result<()> {
        if !stream.len().is_multiple_of(4) {
            return Err(Error::InvalidArgument(format!(
                "stream of {} bytes is not whole dwords",
                stream.len()
            )));
        }
        let ndw = c_int::try_from(stream.len() / 4)
            .map_err(|_| Error::InvalidArgument("stream too long".into()))?;
        // The library takes a mutable, dword-aligned buffer: copy into u32s.
        let mut dwords: Vec<u32> = stream
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ctx = c_int::try_from(ctx_id)
            .map_err(|_| Error::InvalidArgument(format!("context {ctx_id}")))?;
        // SAFETY: dwords holds exactly ndw u32s, aligned, alive for the call.
        let ret = unsafe { sys::virgl_renderer_submit_cmd(dwords.as_mut_ptr().cast(), ctx, ndw) };
        check("virgl_renderer_submit_cmd", ctx_id, ret)
    }

    /// `virgl_renderer_create_fence` then `virgl_renderer_poll` until the fence signalled
    /// or `spins` polls passed; returns whether it signalled.
    pub fn fence_and_wait(&self, fence_id: u32, ctx_id: u32, spins: u32) -> Result<bool> {
        let fence = c_int::try_from(fence_id)
            .map_err(|_| Error::InvalidArgument(format!("fence {fence_id}")))?;
        // SAFETY: plain integer arguments.
        let ret = unsafe { sys::virgl_renderer_create_fence(fence, ctx_id) };
        check("virgl_renderer_create_fence", ctx_id, ret)?;
        for _ in 0..spins {
            // SAFETY: no arguments; runs our write_fence callback for retired fences.
            unsafe { sys::virgl_renderer_poll() };
            if LAST_FENCE.load(Ordering::SeqCst) >= u64::from(fence_id) {
                return Ok(true);
            }
            std::thread::yield_now();
        }
        Ok(false)
    }

    /// `virgl_renderer_context_create_fence` on `ring_idx` of a context (venus), then
    /// `virgl_renderer_context_poll` until the renderer signalled it through
    /// `write_context_fence` or `spins` polls passed; returns whether it signalled.
    pub fn context_fence_and_wait(
        &self,
        ctx_id: u32,
        ring_idx: u32,
        fence_id: u64,
        spins: u32,
    ) -> Result<bool> {
        // SAFETY: plain integer arguments; the library checks the context id.
        let ret =
            unsafe { sys::virgl_renderer_context_create_fence(ctx_id, 0, ring_idx, fence_id) };
        check("virgl_renderer_context_create_fence", ctx_id, ret)?;
        for _ in 0..spins {
            if last_context_fence(ctx_id, ring_idx) >= fence_id {
                return Ok(true);
            }
            // SAFETY: plain integer argument; runs our write_context_fence callback for the
            // context's retired fences.
            unsafe { sys::virgl_renderer_context_poll(ctx_id) };
            std::thread::yield_now();
        }
        Ok(last_context_fence(ctx_id, ring_idx) >= fence_id)
    }

    /// `virgl_renderer_resource_create_blob` (no iovecs: HOST3D only).
    pub fn create_blob(
        &self,
        res_id: u32,
        ctx_id: u32,
        blob_mem: u32,
        blob_flags: u32,
        blob_id: u64,
        size: u64,
    ) -> Result<()> {
        if res_id == 0 {
            return Err(Error::InvalidArgument("resource id 0".into()));
        }
        let args = sys::virgl_renderer_resource_create_blob_args {
            res_handle: res_id,
            ctx_id,
            blob_mem,
            blob_flags,
            blob_id,
            size,
            iovecs: std::ptr::null(),
            num_iovs: 0,
        };
        // SAFETY: args is a valid struct with no iovecs (null, 0), read during the call.
        let ret = unsafe { sys::virgl_renderer_resource_create_blob(&args) };
        check("virgl_renderer_resource_create_blob", res_id, ret)
    }

    /// `virgl_renderer_resource_unref`.
    pub fn resource_unref(&self, res_id: u32) {
        // SAFETY: the library looks the id up and ignores unknown ids.
        unsafe { sys::virgl_renderer_resource_unref(res_id) };
    }

    /// `virgl_renderer_resource_get_map_info` (needs `fill_caps` to have run once).
    pub fn map_info(&self, res_id: u32) -> Result<u32> {
        let mut info = 0u32;
        // SAFETY: a valid out-pointer.
        let ret = unsafe { sys::virgl_renderer_resource_get_map_info(res_id, &mut info) };
        check("virgl_renderer_resource_get_map_info", res_id, ret).map(|()| info)
    }

    /// `virgl_renderer_resource_export_blob`: the blob's fd, which we own.
    pub fn export_blob(&self, res_id: u32) -> Result<ExportedFd> {
        let (mut fd_type, mut fd) = (0u32, -1 as c_int);
        // SAFETY: two valid out-pointers.
        let ret =
            unsafe { sys::virgl_renderer_resource_export_blob(res_id, &mut fd_type, &mut fd) };
        check("virgl_renderer_resource_export_blob", res_id, ret)?;
        if fd < 0 {
            return Err(Error::Call {
                op: "virgl_renderer_resource_export_blob (no fd)",
                id: res_id,
                ret: fd,
            });
        }
        // SAFETY: on success the library handed us a fresh fd (a dup) that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ExportedFd { fd_type, fd })
    }

    /// The fd virglrenderer keeps for a blob resource, duplicated (CLOEXEC, ours), from
    /// 1.3.0's `virgl_renderer_resource_get_info` (whose `info.fd` 0.10.4 lacks).
    ///
    /// For an OPAQUE blob (lavapipe's `VkDeviceMemory` in the render server): 1.3.0's
    /// `export_blob` refuses OPAQUE resources (`-EINVAL`) though the library holds their
    /// fd. What the fd is must be checked by the caller (its data does not start at 0).
    /// Refused on a library older than 1.3.0 (told by `map_fixed`, which came with `fd`).
    pub fn resource_fd(&self, res_id: u32) -> Result<OwnedFd> {
        if res_id == 0 {
            return Err(Error::InvalidArgument("resource id 0".into()));
        }
        if self.map_fixed.is_none() {
            return Err(Error::InvalidArgument(
                "virglrenderer before 1.3.0 does not report a resource's fd".into(),
            ));
        }
        let handle = c_int::try_from(res_id)
            .map_err(|_| Error::InvalidArgument(format!("resource {res_id}")))?;
        // SAFETY: an all-integer C struct: zero is a valid value.
        let mut info: ResourceInfo13 = unsafe { std::mem::zeroed() };
        info.fd = -1;
        // SAFETY: `info` is 1.3.0's struct (0.10.4's fields, then `fd`), which the running
        // library (1.3.0 on, checked above) fills; a valid, writable pointer for the call.
        let ret = unsafe {
            sys::virgl_renderer_resource_get_info(
                handle,
                std::ptr::addr_of_mut!(info).cast::<sys::virgl_renderer_resource_info>(),
            )
        };
        // The library sets `fd` before it asks the GL winsys about a texture, which fails
        // for a blob without one: a nonzero answer with the fd set still names the fd.
        if info.fd < 0 || info.base.handle != res_id {
            return Err(Error::Call {
                op: "virgl_renderer_resource_get_info (no fd)",
                id: res_id,
                ret: if ret != 0 { ret } else { info.fd },
            });
        }
        // SAFETY: the library owns info.fd and keeps it open while the resource lives (the
        // caller holds the resource); it is only borrowed long enough to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(info.fd) };
        borrowed.try_clone_to_owned().map_err(|e| Error::Call {
            op: "dup of the resource's fd",
            id: res_id,
            ret: -e.raw_os_error().unwrap_or(libc::EBADF),
        })
    }

    /// `virgl_renderer_resource_map`: the renderer's own mapping of the blob, unmapped when
    /// the returned value drops. The library allows one mapping per resource at a time.
    pub fn map(&self, res_id: u32) -> Result<RendererMapping<'_>> {
        if res_id == 0 {
            return Err(Error::InvalidArgument("resource id 0".into()));
        }
        // Whether the blob is SHM decides who unmaps it (see RendererMapping's Drop). The
        // export is a dup of the renderer's fd, closed right away.
        let shm = matches!(self.export_blob(res_id), Ok(x) if x.fd_type == FD_TYPE_SHM);
        let mut ptr: *mut c_void = std::ptr::null_mut();
        let mut size = 0u64;
        // SAFETY: two valid out-pointers.
        let ret = unsafe { sys::virgl_renderer_resource_map(res_id, &mut ptr, &mut size) };
        check("virgl_renderer_resource_map", res_id, ret)?;
        let len = usize::try_from(size).unwrap_or(0);
        let mapping = RendererMapping {
            res_id,
            ptr: ptr.cast(),
            len,
            shm,
            _renderer: PhantomData,
        };
        if ptr.is_null() || len == 0 {
            // Dropping `mapping` undoes the map.
            return Err(Error::Call {
                op: "virgl_renderer_resource_map (empty)",
                id: res_id,
                ret: 0,
            });
        }
        Ok(mapping)
    }
}

impl Drop for Renderer {
    fn drop(&mut self) {
        // SAFETY: init succeeded for this Renderer and nothing borrows it any more
        // (RendererMapping borrows it); cleanup frees every context and resource.
        unsafe { sys::virgl_renderer_cleanup(cookie()) };
        INITIALIZED.store(false, Ordering::SeqCst);
    }
}

fn check(op: &'static str, id: u32, ret: c_int) -> Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(Error::Call { op, id, ret })
    }
}

/// The renderer's own mapping of one resource (`virgl_renderer_resource_map`), for reads
/// and writes through the renderer's view. Unmapped on drop.
#[derive(Debug)]
pub struct RendererMapping<'r> {
    res_id: u32,
    ptr: *mut u8,
    len: usize,
    /// The blob is an SHM memfd that the library mmap'ed itself.
    shm: bool,
    _renderer: PhantomData<&'r Renderer>,
}

impl RendererMapping<'_> {
    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (an empty map is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "{offset:#x}+{len:#x} outside a mapping of {:#x} bytes",
                self.len
            ))),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub fn read_slice(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.range(offset, buf.len())?;
        // SAFETY: the range is inside the live mapping (checked above); volatile-free copy
        // is fine because nothing else in this process writes it concurrently.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write_slice(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.range(offset, data.len())?;
        // SAFETY: the range is inside the live, writable mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        Ok(())
    }
}

impl Drop for RendererMapping<'_> {
    fn drop(&mut self) {
        // SAFETY: this resource was mapped by Renderer::map and not unmapped since.
        let ret = unsafe { sys::virgl_renderer_resource_unmap(self.res_id) };
        if ret == -libc::EINVAL && self.shm && !self.ptr.is_null() {
            // virglrenderer 0.10.4's unmap handles vrend and dma-buf mappings only: for an
            // SHM blob it forgets the mapping (`res->mapped = NULL`) and answers EINVAL
            // without munmap, leaking one VMA per map. The library no longer refers to the
            // mapping, so we undo the mmap it made.
            // SAFETY: ptr/len are exactly the library's mmap(NULL, len, ...) of the SHM fd
            // (virgl_renderer_resource_map reported them), which nothing references any more.
            let r = unsafe { libc::munmap(self.ptr.cast(), self.len) };
            if r != 0 {
                log::warn!(
                    "munmap of the renderer's SHM mapping of resource {} failed: {}",
                    self.res_id,
                    std::io::Error::last_os_error()
                );
            }
        } else if ret != 0 {
            log::warn!(
                "virgl_renderer_resource_unmap({}) failed: {ret}",
                self.res_id
            );
        }
    }
}
