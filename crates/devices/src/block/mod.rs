//! Block I/O backends used by virtio-blk.
//!
//! The device probes once, when it opens its image: [`uring::Uring`] (io_uring, zero copy into
//! guest memory, completions on an eventfd) when the host kernel has io_uring and the image is
//! not opened with O_DIRECT; otherwise requests run synchronously through a bounce buffer.

pub mod uring;
