//! The device process: what `hostmem-gpu-device` runs after the launcher exec'd it.
//!
//! Order matters: the seccomp filter the launcher handed over is installed **first**, before
//! any input is read; then the handshake on the mapping tube, the hostmem memfd (mapped as
//! the mirror), the backend, `Ready { backend, num_capsets }`, and [`serve`]: the poll loop
//! over the transport tube (fd 3: guest memory, queue setup, reset, stats) and the enabled
//! queues' kick eventfds ([`crate::virtio`]) until the VMM closes the transport tube.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;

use hostmem_ipc::protocol::{handshake, DeviceMsg, Role, TransportMsg, TransportReply, VmmMsg};
use hostmem_ipc::{Error as TubeError, Message, Tube};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::backend::Backend;
use crate::gpu::{Gpu, Placer};
use crate::mirror::MirrorPlacer;
use crate::virtio::{guest_memory, VirtioGpu};
use crate::{Error, Result};

/// Exit code when the VMM broke the protocol or the mapping tube failed.
pub const EXIT_TUBE: i32 = 3;
/// Exit code for bad arguments or a failed start.
pub const EXIT_START: i32 = 2;

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// Fd of the transport tube (the virtio transport's messages).
    pub transport_fd: i32,
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
    /// Parses `--transport-fd N --mapping-fd N [--seccomp-fd N] [--backend NAME]`.
    pub fn parse(args: &[String]) -> std::result::Result<Args, String> {
        let mut a = Args {
            transport_fd: -1,
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
                "--transport-fd" => a.transport_fd = fd(val()?)?,
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
        if a.transport_fd < 0 || a.mapping_fd < 0 {
            return Err("--transport-fd and --mapping-fd are required".into());
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
    // The launcher installed the seccomp filter before the exec (it covers the loader and
    // the runtime's start-up). First act: the SIGSYS reporter, if the launcher asked for it
    // (a program-installed filter, `--seccomp-fd`, is still honoured).
    let installed = match args.seccomp_fd {
        Some(fd) => hostmem_jail::launch::child_install_seccomp(fd),
        None => hostmem_jail::launch::child_install_sigsys_reporter(),
    };
    if let Err(e) = installed {
        log::error!("seccomp set-up failed: {e}");
        return EXIT_START;
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
    let transport = Tube::from_fd(take(args.transport_fd)?)?;
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
    let num_capsets = u32::try_from(backend.capsets().len()).unwrap_or(u32::MAX);
    mapping.send(
        &DeviceMsg::Ready {
            backend: backend_name.clone(),
            num_capsets,
        },
        &[],
    )?;
    log::info!(
        "device ready: backend {backend_name} ({num_capsets} capsets), window {size:#x} bytes"
    );
    let mut dev = VirtioGpu::new(Gpu::new(backend, MirrorPlacer::new(mirror, mapping)));
    serve(&transport, &mut dev)
}

/// Placements in flight at most before the device waits for the oldest verdict.
pub const MAX_IN_FLIGHT: usize = 32;

/// The device's loop: poll(2) on the transport tube and every enabled queue's kick
/// eventfd. Kicks serve their queue; transport messages are answered in order
/// ([`handle_transport`]). While MAP/UNMAP placements are in flight the poll does not
/// sleep: when nothing new came, the oldest verdict is settled (as the control-queue loop
/// did), and at [`MAX_IN_FLIGHT`] the device settles before it takes more. Returns when
/// the transport tube closes (EOF: exit 0) or the VMM asked for shutdown; an error when the
/// mapping tube broke.
pub fn serve(transport: &Tube, dev: &mut VirtioGpu<MirrorPlacer>) -> Result<()> {
    loop {
        if dev.in_flight() >= MAX_IN_FLIGHT {
            dev.finish_one();
            if stop_if_asked(dev.gpu())? {
                return Ok(());
            }
            continue;
        }
        let timeout = if dev.in_flight() > 0 || dev.busy() {
            PollTimeout::ZERO
        } else {
            PollTimeout::NONE
        };
        let (transport_ready, kicked) = {
            let kicks = dev.kick_fds();
            let mut fds = vec![PollFd::new(transport.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                kicks
                    .iter()
                    .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::Poll(e)),
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let t = fds.first().is_some_and(ready);
            let k: Vec<u16> = kicks
                .iter()
                .zip(fds.iter().skip(1))
                .filter(|(_, f)| ready(f))
                .map(|((i, _), _)| *i)
                .collect();
            (t, k)
        };
        if dev.busy() {
            dev.process_busy();
        } else if !transport_ready && kicked.is_empty() {
            // Nothing new while placements are in flight: settle the oldest.
            dev.finish_one();
        }
        for index in kicked {
            dev.kick(index);
        }
        if transport_ready {
            match transport.try_recv_bytes() {
                Ok(Some((bytes, fds))) => {
                    if let Some(reply) = handle_transport(dev, &bytes, fds) {
                        match transport.send(&reply, &[]) {
                            Ok(()) => {}
                            Err(TubeError::Hangup) => {
                                log::info!("transport tube closed: exiting");
                                return Ok(());
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Ok(None) => {}
                Err(TubeError::Hangup) => {
                    log::info!("transport tube closed: exiting");
                    return Ok(());
                }
                Err(e) => log::warn!("transport tube: dropped a bad message: {e}"),
            }
        }
        if stop_if_asked(dev.gpu())? {
            return Ok(());
        }
    }
}

/// Handles one transport message (its JSON `bytes` and the fds that came with it) and
/// returns the reply: `Done` (with the reason when refused) or `Stats`, with the message's
/// `seq`. `None` for bytes that are no transport message (logged; there is no seq to
/// answer).
///
/// * `GuestMemory`: mapped with [`guest_memory`] and taken with
///   [`VirtioGpu::set_memory`] (refused while a queue is enabled).
/// * `QueueEnable`: [`VirtioGpu::enable_queue`] with its kick and call eventfds.
/// * `Reset`: [`VirtioGpu::reset`]; the reply goes out only after every placement was
///   undone through the placer, so the VMM has heard every `Unmap` first.
/// * `Stats`: the counters.
pub fn handle_transport<P: Placer>(
    dev: &mut VirtioGpu<P>,
    bytes: &[u8],
    fds: Vec<OwnedFd>,
) -> Option<TransportReply> {
    let msg: TransportMsg = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        Err(e) => {
            log::warn!("transport: not a message ({} bytes): {e}", bytes.len());
            return None;
        }
    };
    let seq = match &msg {
        TransportMsg::GuestMemory { seq, .. }
        | TransportMsg::QueueEnable { seq, .. }
        | TransportMsg::Reset { seq }
        | TransportMsg::Stats { seq } => *seq,
    };
    let done = |r: Result<()>| {
        let error = r.err().map(|e| {
            log::warn!("transport message {seq} refused: {e}");
            e.to_string()
        });
        Some(TransportReply::Done { seq, error })
    };
    if fds.len() != msg.fd_count() {
        return done(Err(Error::Protocol(format!(
            "expected {} fds, got {}",
            msg.fd_count(),
            fds.len()
        ))));
    }
    match msg {
        TransportMsg::GuestMemory { regions, .. } => {
            let r = guest_memory(&regions, fds).and_then(|m| dev.set_memory(m));
            if r.is_ok() {
                log::info!("guest memory: {} regions", regions.len());
            }
            done(r)
        }
        TransportMsg::QueueEnable { queue, .. } => {
            let mut it = fds.into_iter();
            match (it.next(), it.next()) {
                (Some(kick), Some(call)) => done(dev.enable_queue(&queue, kick, call)),
                _ => done(Err(Error::Protocol("QueueEnable without 2 fds".into()))),
            }
        }
        TransportMsg::Reset { .. } => {
            dev.reset();
            done(Ok(()))
        }
        TransportMsg::Stats { .. } => Some(TransportReply::Stats {
            seq,
            stats: dev.stats(),
        }),
    }
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
            "--transport-fd",
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
            "--transport-fd",
            "3",
            "--mapping-fd",
            "4",
            "--virgl-server-fd",
            "x",
        ]);
        assert!(bad.unwrap_err().contains("bad fd"));
        assert!(parse(&[
            "--transport-fd",
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
