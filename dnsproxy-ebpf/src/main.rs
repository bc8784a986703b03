//! The dnsproxy data path: cgroup `sock_addr` programs that redirect DNS aimed at the
//! configured cluster DNS servers to the local proxy listener, and report the original
//! server back to the application on `recvmsg`/`getpeername`.
//!
//! Every decision is made from maps the daemon fills (`dp_config`, `dp_dns_servers`,
//! `dp_policy`); every outcome increments one per-CPU counter in `dp_stats`. Programs
//! always return "allow" (1): the data path may rewrite, never block.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("dnsproxy-bpf is an eBPF object; build it for bpfel-unknown-none");
}
