//! `hostmem-gpu-device`: the virtio-gpu hostmem device process, started by the VMM's
//! launcher inside the jail. See `hostmem_device::process`.

fn main() {
    hostmem_device::process::init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(hostmem_device::process::main_with_args(&args));
}
