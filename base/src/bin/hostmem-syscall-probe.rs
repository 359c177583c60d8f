//! Test helper for the seccomp policy suite: installs the filter it was handed
//! (`--seccomp-fd N`, as the jail launcher passes it), then makes one forbidden call named
//! on the command line. Exit 0 means the call returned (the policy allowed it or answered
//! with an errno: the errno is printed), death by SIGSYS means the filter killed it.

use std::io::Read;

use clap::Parser;
use hostmem_base::seccomp::set_no_new_privs;
use hostmem_base::seccomp::{install_filter, install_filter_logged, program_from_bytes};

/// Installs the seccomp filter it is handed, then makes one call (or reports one fact of
/// the jail through its exit code).
#[derive(Debug, Parser)]
#[command(name = "hostmem-syscall-probe")]
struct Args {
    /// The call to make (execve, socket_inet, ptrace, mmap_exec, mprotect_exec,
    /// open_host_path, kill_parent, clone_process, getpid) or the fact to report
    /// (count_root, count_fds, connect_loopback, env_count); anything else calls nothing.
    #[arg(default_value = "")]
    what: String,
    /// The seccomp program's fd (the jail launcher appends it).
    #[arg(long)]
    seccomp_fd: Option<i32>,
}

fn main() {
    let args = Args::parse();
    let what = args.what;
    if let Some(fd) = args.seccomp_fd {
        let mut f = std::fs::File::from(hostmem_base::fd::take_inherited(fd).expect("seccomp fd"));
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).expect("read program");
        let prog = program_from_bytes(&bytes).expect("program");
        // As the device does: report a trapped call (number and arguments) on the pipe the
        // launcher named, before the filter goes in, and have the kernel log the trap (its
        // record is the fact, ours only a claim).
        let report_fd = std::env::var("HOSTMEM_SIGSYS_FD")
            .ok()
            .and_then(|v| v.parse().ok());
        if let Some(fd) = report_fd {
            hostmem_base::sandbox::install_sigsys_reporter(fd).expect("SIGSYS reporter");
        }
        set_no_new_privs().expect("no_new_privs");
        let installed = if report_fd.is_some() {
            install_filter_logged(&prog, false)
        } else {
            install_filter(&prog, false)
        };
        if installed.is_err() {
            std::process::exit(3);
        }
    }
    // Facts about the jail, reported through the exit code (stdout is /dev/null there).
    match what.as_str() {
        "count_root" => {
            std::process::exit(std::fs::read_dir("/").map_or(255, |d| d.count() as i32))
        }
        "count_fds" => std::process::exit(
            std::fs::read_dir("/proc/self/fd").map_or(255, |d| d.count() as i32 - 1),
        ),
        "connect_loopback" => {
            let ok = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], 22)),
                std::time::Duration::from_millis(200),
            );
            // 0: the network is unreachable (what the jail promises), 1: it connected or was
            // refused by a listener (a reachable network).
            std::process::exit(match ok {
                Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => 0,
                _ => 1,
            })
        }
        "env_count" => std::process::exit(std::env::vars().count() as i32),
        _ => {}
    }
    let r = call(&what);
    println!("{what}: returned {r}");
}

fn call(what: &str) -> i64 {
    // SAFETY: each call passes integer arguments or null pointers that the kernel checks
    // (it fails with EFAULT rather than touching our memory), so no Rust memory is affected;
    // the point is only to see whether seccomp lets the syscall through.
    unsafe {
        match what {
            "execve" => libc::syscall(
                libc::SYS_execve,
                c"/bin/true".as_ptr(),
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
            ),
            "socket_inet" => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
            "ptrace" => libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0),
            "mmap_exec" => libc::syscall(
                libc::SYS_mmap,
                0,
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ),
            "mprotect_exec" => libc::syscall(
                libc::SYS_mprotect,
                0,
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
            ),
            "open_host_path" => {
                libc::syscall(libc::SYS_open, c"/etc/passwd".as_ptr(), libc::O_RDONLY)
            }
            // Outside the jail this would be the parent; signal 0 only probes.
            "kill_parent" => libc::syscall(libc::SYS_kill, 1, 0),
            "clone_process" => libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0),
            "getpid" => libc::syscall(libc::SYS_getpid),
            _ => -1,
        }
    }
}
