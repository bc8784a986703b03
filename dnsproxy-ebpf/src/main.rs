//! The dnsproxy data path: cgroup `sock_addr` programs that redirect DNS aimed at the
//! configured cluster DNS servers to the local proxy listener, translate virtual IPs
//! to real backends, and report the original address back to the application on
//! `recvmsg`/`getpeername`.
//!
//! Every decision is made from maps the daemon fills (`dp_config`, `dp_dns_servers`,
//! `dp_policy`, `dp_vips`, `dp_services`; per-socket memory in `dp_sock_orig`); every
//! outcome increments one per-CPU counter in `dp_stats`. Programs allow the syscall,
//! possibly rewritten, with one exception: a connect/sendmsg to a VIP that has no
//! backend fails at once (EPERM) instead of hanging on an address nobody answers.
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
