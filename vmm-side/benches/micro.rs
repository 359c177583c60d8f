//! Criterion micro-benchmarks of the pieces a placement goes through:
//!
//! * `tube/*`: a SOCK_SEQPACKET round trip to an echo thread, with and without an fd
//!   (SCM_RIGHTS), as every placement event does;
//! * `hostmem/*`: the VMM's validation of a placement event (`Hostmem::check_map`, and with
//!   the `fstat`/seals look-up of the fd that precedes it);
//! * `policy/*`: compiling the device's seccomp policy (minijail syntax → BPF);
//! * `seccomp/*`: the filter's cost per syscall — `getpid` on a thread without a filter and
//!   on a thread that installed the device policy (log mode, so nothing dies), both in the
//!   kernel; and the jail crate's BPF interpreter on the same program.
//!
//! Run: `cargo bench -p hostmem-vmm --bench micro`.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::os::fd::AsFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hostmem_base::seccomp::{install_filter, set_no_new_privs, SockFilter};
use hostmem_base::shm::{file_facts, SharedMemory};
use hostmem_ipc::Tube;
use hostmem_jail::compiler::{compile_file, CompileOptions};
use hostmem_jail::interp::{self, SeccompData};
use hostmem_vmm::hostmem::{Hostmem, Limits, MapEvent, Mode, DEFAULT_WINDOW_GPA};

fn tube(c: &mut Criterion) {
    let (a, b) = Tube::pair().expect("tube pair");
    let echo = std::thread::spawn(move || {
        while let Ok((bytes, fds)) = b.recv_bytes() {
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            if b.send_bytes(&bytes, &borrowed).is_err() {
                break;
            }
        }
    });
    let blob = SharedMemory::new("bench-blob", 4096).expect("memfd");
    let msg = vec![0x5au8; 160]; // about the size of a serialized Map event
    let mut g = c.benchmark_group("tube");
    g.bench_function("roundtrip_with_fd", |bch| {
        bch.iter(|| {
            a.send_bytes(&msg, &[blob.as_fd()]).expect("send");
            let (r, fds) = a.recv_bytes().expect("recv");
            black_box((r, fds));
        })
    });
    g.bench_function("roundtrip_no_fd", |bch| {
        bch.iter(|| {
            a.send_bytes(&msg, &[]).expect("send");
            black_box(a.recv_bytes().expect("recv"));
        })
    });
    g.finish();
    drop(a);
    let _ = echo.join();
}

fn hostmem(c: &mut Criterion) {
    let hm = Arc::new(
        Hostmem::new(
            64 << 20,
            None,
            DEFAULT_WINDOW_GPA,
            Mode::Fixed,
            Limits::default(),
        )
        .expect("hostmem"),
    );
    let blob = SharedMemory::new("bench-blob", 64 << 10).expect("memfd");
    blob.seal_size().expect("seal");
    let ev = MapEvent {
        resource_id: 7,
        offset: 1 << 20,
        len: 64 << 10,
        fd_offset: 0,
        prot: 3,
    };
    let facts = file_facts(blob.as_fd()).expect("facts");
    hm.check_map(&ev, &facts).expect("the event is valid");
    let mut g = c.benchmark_group("hostmem");
    g.bench_function("check_map", |bch| {
        bch.iter(|| black_box(hm.check_map(black_box(&ev), &facts)))
    });
    g.bench_function("file_facts+check_map", |bch| {
        bch.iter(|| {
            let f = file_facts(blob.as_fd()).expect("facts");
            black_box(hm.check_map(black_box(&ev), &f))
        })
    });
    g.finish();
}

fn policy_path() -> std::path::PathBuf {
    hostmem_vmm::policy::default_dir().join("gpu_device_shm.policy")
}

fn policy(c: &mut Criterion) {
    let path = policy_path();
    let opts = CompileOptions::for_device(false);
    let prog = compile_file(&path, &opts).expect("policy compiles");
    println!("gpu_device_shm.policy: {} BPF instructions", prog.len());
    c.bench_function("policy/compile_gpu_device_shm", |bch| {
        bch.iter(|| black_box(compile_file(black_box(&path), &opts).expect("compile")))
    });
}

/// A thread that runs `getpid` loops on request, with `prog` installed on it (only on it).
fn getpid_worker(prog: Option<Vec<SockFilter>>) -> (Sender<u64>, Receiver<Duration>) {
    let (tx, rx) = channel::<u64>();
    let (dtx, drx) = channel();
    std::thread::spawn(move || {
        if let Some(p) = prog {
            set_no_new_privs().expect("no_new_privs");
            install_filter(&p, false).expect("install filter");
        }
        for n in rx {
            let t = Instant::now();
            for _ in 0..n {
                black_box(nix::unistd::getpid());
            }
            if dtx.send(t.elapsed()).is_err() {
                break;
            }
        }
    });
    (tx, drx)
}

fn seccomp(c: &mut Criterion) {
    // Log mode: a syscall the policy does not allow on this thread is logged, not fatal.
    let prog = compile_file(&policy_path(), &CompileOptions::for_device(true)).expect("compile");
    let mut g = c.benchmark_group("seccomp");
    for (name, filter) in [
        ("getpid_kernel_no_filter", None),
        ("getpid_kernel_device_filter", Some(prog.clone())),
    ] {
        let (tx, rx) = getpid_worker(filter);
        g.bench_function(name, |bch| {
            bch.iter_custom(|iters| {
                tx.send(iters).expect("worker");
                rx.recv().expect("worker")
            })
        });
    }
    let getpid = SeccompData::x86_64(libc::SYS_getpid as u32, [0; 6]);
    let mmap = SeccompData::x86_64(
        libc::SYS_mmap as u32,
        [
            0,
            4096,
            3,
            (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
            5,
            0,
        ],
    );
    g.bench_function("interp_getpid", |bch| {
        bch.iter(|| black_box(interp::run(&prog, black_box(&getpid))))
    });
    g.bench_function("interp_mmap_with_args", |bch| {
        bch.iter(|| black_box(interp::run(&prog, black_box(&mmap))))
    });
    g.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = tube, hostmem, policy, seccomp
}
criterion_main!(micro);
