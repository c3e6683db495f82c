//! A disk copied while its guest runs (live migration without shared storage): what the
//! sending side reads ([`CopySource`]) and what the receiving side writes ([`CopyTarget`]).
//!
//! Both work on the disk as the guest sees it, not on the image file: a raw image's bytes are
//! the disk's, but a qcow2 overlay's file holds metadata the sending process caches (its L2
//! and refcount tables are written back only at a flush), so a second reader of the file
//! could see a cluster the guest wrote as still unallocated. The source therefore reads
//! through the device's own open image (imago serves concurrent readers and writers), and the
//! receiver writes through its own, which turns zeros into zero clusters rather than holes
//! that would show the backing image.
//!
//! What the first pass covers ([`CopySource::extents`]): all of a raw disk (its holes as
//! zeros, so the receiver's file may start with anything), but only what a qcow2 image itself
//! holds: ranges that read through to a backing image are left out, because the receiver's
//! overlay sits on the same base image (the agent checks its content hash), so they read the
//! same there already. That is the whole of "only the overlay moves".

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::ShallowMapping;

use super::qcow2::{self, Image};
use super::{BlockError, DiskConfig, DiskFormat};

/// What a range of the disk holds, for the first pass of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Data to read and send (it may still read as zeros).
    Data,
    /// Zeros the disk itself records (a raw file's hole, a qcow2 zero cluster): the receiver
    /// must make them read as zeros whatever lies under its disk.
    Zero,
}

/// The sending side: reads the disk as its guest sees it, while the guest writes it.
#[derive(Debug)]
pub enum CopySource {
    /// A raw image: a second descriptor of the device's file (so an O_DIRECT image needs
    /// aligned buffers).
    Raw(File),
    /// A qcow2 image, the device's own open chain.
    Qcow2(Arc<Image>),
}

impl CopySource {
    /// The ranges `(offset, len, what)` of the first `capacity` bytes a copy must send, in
    /// increasing order (see the module's description for what is left out).
    pub fn extents(&self, capacity: u64) -> io::Result<Vec<(u64, u64, Extent)>> {
        let mut out = Vec::new();
        match self {
            Self::Raw(file) => {
                let mut at = 0;
                for (data, len) in bexar_util::fs::data_extents(file, capacity)? {
                    if data > at {
                        out.push((at, data - at, Extent::Zero));
                    }
                    out.push((data, len, Extent::Data));
                    at = data + len;
                }
                if capacity > at {
                    out.push((at, capacity - at, Extent::Zero));
                }
            }
            Self::Qcow2(image) => {
                let mut at = 0;
                while at < capacity {
                    let (mapping, len) = image.get_shallow_mapping(at, capacity - at)?;
                    let what = match mapping {
                        // Held by this image (data, or compressed data read through imago).
                        ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => {
                            Some(Extent::Data)
                        }
                        ShallowMapping::Zero { explicit: true, .. } => Some(Extent::Zero),
                        // Read from the backing image, or unallocated zeros: the receiver's
                        // overlay on the same base reads the same.
                        ShallowMapping::Indirect { .. } | ShallowMapping::Zero { .. } => None,
                        ShallowMapping::Eof { .. } => break,
                        // A mapping this imago version adds later: copy it, to be safe.
                        _ => Some(Extent::Data),
                    };
                    if len == 0 {
                        break;
                    }
                    if let Some(what) = what {
                        match out.last_mut() {
                            Some((o, l, w)) if *w == what && *o + *l == at => *l += len,
                            _ => out.push((at, len, what)),
                        }
                    }
                    at += len;
                }
            }
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes of the disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Self::Raw(file) => file.read_exact_at(buf, offset),
            Self::Qcow2(image) => image.readv(IoVectorMut::from(buf), offset),
        }
    }
}

/// The receiving side: a disk the stream's blocks are written into.
#[derive(Debug)]
pub enum CopyTarget {
    /// A raw image file.
    Raw(File),
    /// A qcow2 image (the receiver's own overlay on the sender's base image), with its chain.
    Qcow2(Image),
}

impl CopyTarget {
    /// The target for the disk `cfg` describes, opened for writing: `None` for a disk a copy
    /// does not write (read-only, remote).
    pub fn open(cfg: &DiskConfig) -> Result<Option<Self>, BlockError> {
        if cfg.read_only || cfg.is_remote() {
            return Ok(None);
        }
        Self::on(&super::preopen_disk(cfg)?)
    }

    /// The target on a disk opened before ([`super::preopen_disk`]), through its own
    /// descriptors: `None` for a disk a copy does not write. A qcow2 image's metadata is
    /// parsed here; the target is dropped (its metadata written back by [`Self::sync`])
    /// before the disk's backend is made on the same files.
    pub fn on(disk: &super::OpenedDisk) -> Result<Option<Self>, BlockError> {
        let cfg = disk.config();
        if cfg.read_only {
            return Ok(None);
        }
        let Some((format, files)) = disk.local() else {
            return Ok(None);
        };
        Ok(Some(match format {
            DiskFormat::Raw => {
                let f = files
                    .first()
                    .map(|(_, f)| f.try_clone())
                    .unwrap_or_else(|| Err(io::ErrorKind::NotFound.into()))
                    .map_err(|err| BlockError::Open {
                        path: cfg.path.clone(),
                        err,
                    })?;
                Self::Raw(f)
            }
            DiskFormat::Qcow2 => Self::Qcow2(qcow2::open_chain_with(
                &cfg.path,
                DiskFormat::Qcow2,
                true,
                false,
                &mut Vec::new(),
                &mut disk.opener(),
            )?),
        }))
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        match self {
            Self::Raw(f) => Ok(f.metadata()?.len()),
            Self::Qcow2(image) => Ok(image.size()),
        }
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Self::Raw(f) => f.write_all_at(data, offset),
            Self::Qcow2(image) => image.writev(IoVector::from(data), offset),
        }
    }

    /// Makes `[offset, offset + len)` read as zeros: a raw file gets a hole (free on a new
    /// sparse file) or written zeros where the file system cannot punch; a qcow2 image gets
    /// zero clusters, which hide whatever its backing image holds there. `buf` is scratch.
    pub fn zero(&self, offset: u64, len: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Self::Raw(file) => {
                use nix::fcntl::{fallocate, FallocateFlags};
                let punch =
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                if fallocate(file, punch, offset as i64, len as i64).is_ok() {
                    return Ok(());
                }
                buf.fill(0);
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(buf.len() as u64) as usize;
                    file.write_all_at(&buf[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Self::Qcow2(image) => image.write_zeroes(offset, len),
        }
    }

    /// Puts what was written on stable storage (a qcow2 image's cached metadata first).
    pub fn sync(&self) -> io::Result<()> {
        match self {
            Self::Raw(f) => f.sync_data(),
            Self::Qcow2(image) => {
                image.flush()?;
                image.sync()
            }
        }
    }
}
