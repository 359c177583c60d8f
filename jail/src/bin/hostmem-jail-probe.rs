//! Test payload for the jail launcher: reports what it sees from inside the jail as one
//! JSON line on stdout. Usage: `hostmem-jail-probe <what> [--ro PATH] [--seccomp-fd N]`.
//! `--seccomp-fd` is handled first, as the device does ([`child_install_seccomp`]).
//!
//! * `facts`: uid/gid, root listing, open fds, environment, capability lines, rlimits,
//!   hostname, a loopback connect attempt, and (with `--ro PATH`) reading and writing PATH;
//!   then waits for stdin to close, so the test can look at it from outside.
//! * `getppid` / `umask`: makes that call (twice) and reports that it survived.
//!
//! [`child_install_seccomp`]: hostmem_jail::launch::child_install_seccomp

#![forbid(unsafe_code)]

use std::io::{Read, Write};

use clap::Parser;
use serde_json::json;

/// Reports what it sees from inside the jail as one JSON line on stdout.
#[derive(Debug, Parser)]
#[command(name = "hostmem-jail-probe")]
struct Args {
    /// `facts`, `getppid` or `umask`.
    #[arg(default_value = "")]
    what: String,
    /// With `facts`: a read-only bind to read and try to write.
    #[arg(long)]
    ro: Option<String>,
    /// The seccomp program's fd (the jail launcher appends it).
    #[arg(long)]
    seccomp_fd: Option<i32>,
}

fn errno_of(r: std::io::Result<impl Sized>) -> serde_json::Value {
    match r {
        Ok(_) => json!("ok"),
        Err(e) => json!(e.raw_os_error().unwrap_or(-1)),
    }
}

fn main() {
    let args = Args::parse();
    if let Some(fd) = args.seccomp_fd {
        if let Err(e) = hostmem_jail::launch::child_install_seccomp(fd) {
            eprintln!("hostmem-jail-probe: {e}");
            std::process::exit(3);
        }
    }
    let what = args.what;
    let out = match what.as_str() {
        "facts" => facts(args.ro),
        "getppid" => {
            let a = nix::unistd::getppid();
            let b = nix::unistd::getppid();
            json!({"survived": "getppid", "ret": [a.as_raw(), b.as_raw()]})
        }
        "umask" => {
            let m = nix::sys::stat::Mode::from_bits_truncate(0o027);
            let old = nix::sys::stat::umask(m);
            json!({"survived": "umask", "old": old.bits()})
        }
        _ => json!({"error": format!("unknown probe {what:?}")}),
    };
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{out}");
    let _ = o.flush();
    drop(o);
    if what == "facts" {
        let mut buf = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut buf);
    }
}

fn facts(ro: Option<String>) -> serde_json::Value {
    let root: Vec<String> = std::fs::read_dir("/")
        .map(|d| {
            let mut v: Vec<String> = d
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            let mut v: Vec<i32> = d
                .flatten()
                // Not the directory handle this listing uses.
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| !t.ends_with("fd")))
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps: Vec<&str> = status
        .lines()
        .filter(|l| {
            l.starts_with("Cap") || l.starts_with("NoNewPrivs") || l.starts_with("Seccomp:")
        })
        .collect();
    let lim = |r| nix::sys::resource::getrlimit(r).map_or((0, 0), |(s, h)| (s, h));
    use nix::sys::resource::Resource;
    let net = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], 22)),
        std::time::Duration::from_millis(200),
    );
    let mut v = json!({
        "uid": nix::unistd::getuid().as_raw(),
        "gid": nix::unistd::getgid().as_raw(),
        "pid": std::process::id(),
        "root": root,
        "fds": fds,
        "env": std::env::vars().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "caps": caps,
        "nofile": lim(Resource::RLIMIT_NOFILE),
        "core": lim(Resource::RLIMIT_CORE),
        "fsize": lim(Resource::RLIMIT_FSIZE),
        "as": lim(Resource::RLIMIT_AS),
        "hostname": nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
        "connect_loopback": errno_of(net),
        // The signal the kernel sends us when our parent dies (0: none; credential changes
        // and privileged execs clear it).
        "pdeathsig": nix::sys::prctl::get_pdeathsig().ok().flatten().map_or(0, |s| s as i32),
    });
    if let Some(p) = ro {
        let path = std::path::Path::new(&p);
        v["ro_read"] = json!(std::fs::read_to_string(path.join("hello")).unwrap_or_default());
        v["ro_write_existing"] = errno_of(
            std::fs::OpenOptions::new()
                .append(true)
                .open(path.join("hello")),
        );
        v["ro_create"] = errno_of(std::fs::File::create(path.join("new")));
    }
    v
}
