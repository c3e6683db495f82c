//! Helpers shared by every layer of Bexar. This crate sits at the bottom of the crate graph and
//! knows nothing of VMs, devices or the agent.
//!
//! * [`sync`]: a mutex lock that survives a panicking holder.
//! * [`unix`]: owner-only Unix sockets.
//! * [`fs`]: atomic, durable file replacement and advisory locks.
//! * [`handed`]: descriptors a process was handed at exec in place of paths to open.
//! * [`procfs`]: fields of `/proc/PID/status` and `/proc/PID/stat`.

pub mod fs;
pub mod handed;
pub mod procfs;
pub mod sync;
pub mod unix;
