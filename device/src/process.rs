//! The device process: what `hostmem-gpu-device` runs after the launcher exec'd it.
//!
//! Order matters: the seccomp filter the launcher handed over is installed **first**, before
//! any input is read; then the handshake, the hostmem memfd (mapped as the mirror), `Ready`,
//! and the command loop on the control queue until the VMM closes it.

use std::time::Duration;

use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;
use hostmem_ipc::protocol::{frame, handshake, unframe, DeviceMsg, Role, VmmMsg};
use hostmem_ipc::{Error as TubeError, Tube};

use crate::backend::Backend;
use crate::gpu::Gpu;
use crate::mirror::MirrorPlacer;
use crate::{Error, Result};

/// Exit code when the VMM broke the protocol or the mapping tube failed.
pub const EXIT_TUBE: i32 = 3;
/// Exit code for bad arguments or a failed start.
pub const EXIT_START: i32 = 2;

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Fd of the control queue.
    pub control_fd: i32,
    /// Fd of the mapping tube.
    pub mapping_fd: i32,
    /// Fd holding the compiled seccomp program, if any.
    pub seccomp_fd: Option<i32>,
    /// Renderer backend.
    pub backend: String,
    /// Test knob: allow the mirror only this many VMAs above the count at start (8 of them
    /// kept in reserve), to exercise the headroom refusal.
    pub vma_limit: Option<usize>,
    /// Test knob: the backend's hostmem-private test ops (virgl: see `backend::virgl`).
    pub test_ops: bool,
    /// virgl: the inherited fd of a socket to a running render server
    /// (`--virgl-server-fd N`; the VMM starts the server).
    pub render_server_fd: Option<i32>,
}

impl Args {
    /// Parses `--control-fd N --mapping-fd N [--seccomp-fd N] [--backend NAME]`.
    pub fn parse(args: &[String]) -> std::result::Result<Args, String> {
        let mut a = Args {
            control_fd: -1,
            mapping_fd: -1,
            seccomp_fd: None,
            backend: "shm".into(),
            vma_limit: None,
            test_ops: false,
            render_server_fd: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            let fd = |v: &String| v.parse::<i32>().map_err(|_| format!("{flag}: bad fd {v}"));
            match flag.as_str() {
                "--control-fd" => a.control_fd = fd(val()?)?,
                "--mapping-fd" => a.mapping_fd = fd(val()?)?,
                "--seccomp-fd" => a.seccomp_fd = Some(fd(val()?)?),
                "--backend" => a.backend = val()?.clone(),
                "--test-ops" => a.test_ops = true,
                "--virgl-server-fd" => a.render_server_fd = Some(fd(val()?)?),
                "--vma-limit" => {
                    let v = val()?;
                    a.vma_limit = Some(v.parse().map_err(|_| format!("--vma-limit: bad {v}"))?)
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if a.control_fd < 0 || a.mapping_fd < 0 {
            return Err("--control-fd and --mapping-fd are required".into());
        }
        Ok(a)
    }
}

/// Creates the named backend.
pub fn make_backend(name: &str) -> Result<Box<dyn Backend>> {
    make_backend_with(name, false, None)
}

/// Creates the named backend; `test_ops` turns on its hostmem-private test ops (virgl),
/// `render_server` (a socket to a running render server) runs virgl's venus there.
pub fn make_backend_with(
    name: &str,
    test_ops: bool,
    render_server: Option<std::os::fd::OwnedFd>,
) -> Result<Box<dyn Backend>> {
    if render_server.is_some() && name != "virgl" {
        return Err(Error::Backend(format!(
            "a render server is for the virgl backend, not {name}"
        )));
    }
    match name {
        "shm" => Ok(Box::new(crate::backend::shm::ShmBackend::new())),
        #[cfg(feature = "virgl")]
        "virgl" => {
            let opts = crate::backend::virgl::VirglOptions {
                test_ops,
                render_server,
            };
            crate::backend::virgl::VirglBackend::with_options(opts)
                .map(|b| Box::new(b) as Box<dyn Backend>)
                .map_err(|e| Error::Backend(format!("virgl: {e}")))
        }
        other => {
            let _ = test_ops;
            let built = if cfg!(feature = "virgl") {
                "shm, virgl"
            } else {
                "shm"
            };
            Err(Error::Backend(format!(
                "unknown backend {other} (this build has: {built})"
            )))
        }
    }
}

/// Logging to stderr for the device process: `RUST_LOG` (default `info`), no colours (so no
/// terminal ioctl is ever needed under seccomp).
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .write_style(env_logger::WriteStyle::Never)
        .init();
}

/// The device's main: returns the process exit code.
pub fn main_with_args(args: &[String]) -> i32 {
    let args = match Args::parse(args) {
        Ok(a) => a,
        Err(e) => {
            log::error!("hostmem-gpu-device: {e}");
            return EXIT_START;
        }
    };
    // First act: the seccomp filter, before any input from anyone is read.
    if let Some(fd) = args.seccomp_fd {
        if let Err(e) = hostmem_jail::launch::child_install_seccomp(fd) {
            log::error!("installing the seccomp filter failed: {e}");
            return EXIT_START;
        }
    }
    match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("device: {e}");
            EXIT_TUBE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let take = |fd| hostmem_base::fd::take_inherited(fd).map_err(Error::Base);
    let control = Tube::from_fd(take(args.control_fd)?)?;
    let mapping = Tube::from_fd(take(args.mapping_fd)?)?;
    handshake::<DeviceMsg, VmmMsg>(&mapping, Role::Device, Duration::from_secs(20))?;
    mapping.set_recv_timeout(Some(Duration::from_secs(20)))?;
    let (msg, mut fds) = mapping.recv::<VmmMsg>()?;
    let VmmMsg::Hostmem { size } = msg else {
        return Err(Error::Protocol(format!("expected Hostmem, got {msg:?}")));
    };
    let memfd = fds
        .pop()
        .ok_or_else(|| Error::Protocol("Hostmem without fd".into()))?;
    let mirror = Window::from_memfd(SharedMemory::from_fd(memfd, size)?)?;
    if let Some(limit) = args.vma_limit {
        let now = hostmem_base::procfs::vma_count()?;
        log::warn!("test knob: mirror VMA limit {now} + {limit} (reserve 8)");
        mirror.set_vma_limit(now + limit, 8);
    }
    let server = match args.render_server_fd {
        Some(fd) => Some(hostmem_base::fd::take_inherited(fd)?),
        None => None,
    };
    let backend = make_backend_with(&args.backend, args.test_ops, server)?;
    let backend_name = backend.name().to_string();
    mapping.send(
        &DeviceMsg::Ready {
            backend: backend_name.clone(),
        },
        &[],
    )?;
    log::info!("device ready: backend {backend_name}, window {size:#x} bytes");
    let mut gpu = Gpu::new(backend, MirrorPlacer::new(mirror, mapping));
    loop {
        // Take commands while they come; MAP/UNMAP only start their placement (the VMM
        // works on the event meanwhile). When no command is waiting, or too many placements
        // are in flight, settle the oldest one.
        let next = if gpu.in_flight() == 0 {
            control.recv_bytes().map(Some)
        } else if gpu.in_flight() >= MAX_IN_FLIGHT {
            Ok(None)
        } else {
            control.try_recv_bytes()
        };
        let (bytes, fds) = match next {
            Ok(Some(m)) => m,
            Ok(None) => {
                gpu.finish_one();
                send_ready(&control, &mut gpu)?;
                if stop_if_asked(&gpu)? {
                    return Ok(());
                }
                continue;
            }
            Err(TubeError::Hangup) => {
                log::info!("control queue closed: exiting");
                return Ok(());
            }
            Err(e) => {
                log::warn!("control queue: dropped a bad message: {e}");
                continue;
            }
        };
        if !fds.is_empty() {
            log::warn!("control queue: ignoring {} unexpected fds", fds.len());
        }
        drop(fds);
        let Some((tag, cmd)) = unframe(&bytes) else {
            log::warn!("control queue: message of {} bytes has no tag", bytes.len());
            continue;
        };
        gpu.submit(tag, cmd);
        send_ready(&control, &mut gpu)?;
        if stop_if_asked(&gpu)? {
            return Ok(());
        }
    }
}

/// Placements in flight at most before the device waits for the oldest verdict.
const MAX_IN_FLIGHT: usize = 32;

/// Sends the responses that are ready, in command order.
fn send_ready(control: &Tube, gpu: &mut Gpu<MirrorPlacer>) -> Result<()> {
    for (tag, response) in gpu.take_ready() {
        control.send_bytes(&frame(tag, &response), &[])?;
    }
    Ok(())
}

/// `true` when the VMM asked for shutdown; an error when the mapping tube broke.
fn stop_if_asked(gpu: &Gpu<MirrorPlacer>) -> Result<bool> {
    let placer = gpu.placer();
    if placer.shutdown_requested() {
        log::info!("VMM asked for shutdown");
        return Ok(true);
    }
    if let Some(why) = placer.broken() {
        return Err(Error::Protocol(format!("mapping tube: {why}")));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Args, String> {
        Args::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn args_name_the_render_server_socket() {
        let a = parse(&[
            "--control-fd",
            "3",
            "--mapping-fd",
            "4",
            "--backend",
            "virgl",
            "--virgl-server-fd",
            "5",
        ])
        .unwrap();
        assert_eq!((a.backend.as_str(), a.render_server_fd), ("virgl", Some(5)));
        let bad = parse(&[
            "--control-fd",
            "3",
            "--mapping-fd",
            "4",
            "--virgl-server-fd",
            "x",
        ]);
        assert!(bad.unwrap_err().contains("bad fd"));
        assert!(parse(&[
            "--control-fd",
            "3",
            "--mapping-fd",
            "4",
            "--virgl-server-fd"
        ])
        .unwrap_err()
        .contains("needs a value"));
    }

    #[test]
    fn a_render_server_is_for_virgl_only() {
        let (a, _b) = hostmem_ipc::Tube::pair().unwrap();
        match make_backend_with("shm", false, Some(a.into_fd())) {
            Err(e) => assert!(e.to_string().contains("not shm"), "{e}"),
            Ok(b) => panic!("the {} backend took a render server", b.name()),
        }
    }
}
