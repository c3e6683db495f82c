//! `bexar`: one binary per hypervisor host. The command line lives here; everything it drives
//! lives in the workspace's crates, each allowed to use only the ones below it:
//!
//! * `bexar-util`: locks, owner-only sockets, atomic files, /proc fields;
//! * `bexar-devices`: buses, UART, i8042, virtio devices and their transports, block backends, TAPs;
//! * `bexar-vmm`: one VM in this process (memory, boot, vCPUs, device manager, control socket);
//! * `bexar-hostnet`: the host's side of networking (links, nftables, RA, DHCP);
//! * `bexar-agent`: the host agent, its `/v1` API and the instance metadata service.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
