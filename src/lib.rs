//! Bexar: one binary per hypervisor host that runs KVM microVMs itself.
//!
//! * [`vmm`] builds and runs one VM in this process: memory, boot, vCPUs.
//! * [`devices`] holds the emulated devices and the buses they sit on.
//! * [`hostnet`] is the agent's host networking: links, nftables, router advertisements, DHCP.
//! * [`block`] holds block I/O backends (io_uring).
//! * [`agent`] is the host agent: VM records, lifecycle, VMM processes, events.
//! * [`api`] is the agent's HTTP API on a Unix socket, and its client.
//! * [`cli`] is the command line: `bexar run`, `bexar boot-test`, `bexar agent`, `bexar vm`...

pub mod agent;
pub mod api;
pub mod block;
pub mod cli;
pub mod devices;
pub mod hostnet;
pub mod vmm;
