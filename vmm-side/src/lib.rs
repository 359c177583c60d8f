//! hostmem-vmm: the VMM side of hostmem (binary `hostmem`).
//!
//! * [`hostmem`]: the window, the VM and its memslots, and every check the VMM makes of a
//!   placement event before it repeats it (invariant 1 in docs/invariants.md).
//! * [`service`]: the mapping-service thread on the mapping tube.
//! * [`device`]: starting the jailed device, checking its jail, supervising and restarting it.
//! * [`queue_driver`]: a virtio-gpu driver in the host (tests and the bench): split
//!   virtqueues in a guest RAM of its own, handed to the device over the transport tube.
//! * [`probe`]: a real KVM vCPU (ring-3 guest) that reads and writes the window as the guest.
//! * [`run`]: the `hostmem run` workload and its report.
//! * [`resources`]: fd/VMA/RSS accounting of both processes (what a soak checks).
//! * [`latency`]: latency summaries (p50/p99) and a fixed-size `hdrhistogram` recorder.
//! * [`mod@bench`]: `hostmem bench` (cases, runner, limits, report, plot, the
//!   `vhost-user-sandboxed` case).
//! * [`policy`]: compiling the device's seccomp policy.
//! * [`display`]: the frames a device sends: checked, copied out, the latest per scanout
//!   kept, written as PNG (`--screenshot`).
//! * [`stop`]: SIGINT/SIGTERM as a request to stop (both supervisors).
//! * [`virtio_pci`]: the GPU's virtio-pci transport (config space, BAR0, the link to the
//!   device: the transport tube or vhost-user).
//! * [`vhost_user`]: `hostmem vhost-user`: the jailed device as a vhost-user backend on a
//!   listening socket, supervised.
//! * [`vhost_frontend`]: `hostmem run --transport vhost-user`: the VMM as the device's
//!   vhost-user frontend, every `SHMEM_MAP` checked and placed in the one-memslot window.

#![forbid(unsafe_code)]

pub mod affinity;
pub mod bench;
pub mod device;
pub mod display;
pub mod guest;
pub mod hostmem;
pub mod latency;
pub mod policy;
pub mod probe;
pub mod queue_driver;
pub mod resources;
pub mod run;
pub mod service;
pub mod stop;
pub mod vhost_frontend;
pub mod vhost_user;
pub mod virtio_pci;
