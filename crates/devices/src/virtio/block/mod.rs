//! virtio-blk, one concern per file:
//!
//! * [`request`]: the request parser (header, request types, the status each error maps to);
//! * [`device`]: the device (configuration space, features, requests to the backend and
//!   completions back to the ring, save and restore);
//! * [`event_handler`]: its place on the event loop (queue notifications, backend completions).
//!
//! The disk itself is a [`crate::block::DiskBackend`].

pub mod device;
pub mod event_handler;
pub mod request;
#[cfg(test)]
mod tests;

pub use crate::block::{BlockError, DiskConfig};
pub use device::{Block, BlockState, QUEUE_SIZE};
