//! qcow2 images, with the chain of images under them (raw or qcow2, several levels), through
//! the `imago` crate (docs/storage.md says why that crate and what was tested).
//!
//! The chain is opened here, not by imago's implicit opener, so that each level is checked
//! before the next is trusted: a backing file that is missing, that loops back to an image
//! already in the chain, or that lies deeper than [`MAX_CHAIN`] levels is refused by name;
//! an external data file is refused. Every backing image is opened read-only.
//!
//! Where io_uring works, [`Qcow2Uring`] asks imago where a read or write lands and, when the
//! whole range is data already allocated in the top image, hands it to io_uring at that
//! host offset, exactly as a raw disk does ([`super::raw::RawUring`]: straight between the
//! file and guest pages, done on the spot when the page cache can serve it). Everything else
//! (a first write that allocates or copies a cluster, a read that falls through to a backing
//! image or a zero cluster, discard, write-zeroes, flush) runs at submit time on the caller's
//! thread (the device's event loop) in imago, straight between the image file and guest
//! memory: imago resolves each guest range to a host range, copies clusters on first write
//! (from the backing image when there is one) and writes the data with `pwritev` from guest
//! pages. Requests that can free clusters (discard, write-zeroes) first wait for the ring:
//! a write still in flight must not land in a cluster imago has given to another range. A flush writes imago's cached L2 and refcount blocks
//! back (refcounts before the tables that point at them) and then fsyncs the file, so what a
//! guest flushed survives a kill -9 of the VMM; writes after the last flush may be lost and
//! leave leaked clusters at worst, which `qemu-img check` reports as leaks, not corruption.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatCreateBuilder, StorageOpenOptions};
use vm_memory::GuestMemoryBackend;

use super::raw::RawUring;
use super::{
    check, BackingPin, BlockError, BlockOp, BlockRequest, Completion, DiskBackend, DiskFormat,
    DiskInfo, Immediate, SyncDisk,
};
use crate::memory::{mark_dirty, GuestMemoryMmap};

/// Deepest backing chain we open (the top image included). qemu has no fixed limit; a chain
/// of 16 is far beyond what an image service builds (base, overlay, a few snapshots) and
/// bounds the recursion a crafted chain can cause.
pub const MAX_CHAIN: usize = 16;

/// qcow2's magic, the first four bytes of every qcow2 file.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// An image opened with its chain.
pub type Image = FormatAccess<imago::file::File>;

/// Which format the file at `path` is in: qcow2 when it starts with qcow2's magic, raw
/// otherwise. Only for images a guest never wrote raw (a base image, an operator's file):
/// a guest owning a raw disk can write a qcow2 header into it, so a disk's format is probed
/// once, when it is first attached, and recorded.
pub fn probe(path: &Path) -> Result<DiskFormat, BlockError> {
    let f = File::open(path).map_err(|err| BlockError::Open {
        path: path.to_owned(),
        err,
    })?;
    probe_file(&f).map_err(|err| BlockError::Open {
        path: path.to_owned(),
        err,
    })
}

/// [`probe`] on an open file (its first four bytes, read in place).
pub fn probe_file(f: &File) -> io::Result<DiskFormat> {
    let mut magic = [0u8; 4];
    match f.read_exact_at(&mut magic, 0) {
        Ok(()) if magic == QCOW2_MAGIC => Ok(DiskFormat::Qcow2),
        Ok(()) => Ok(DiskFormat::Raw),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(DiskFormat::Raw),
        Err(e) => Err(e),
    }
}

fn image_err(path: &Path, reason: impl std::fmt::Display) -> BlockError {
    BlockError::Image {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Where a backing file named `name` in the header of `image` is: relative names are
/// relative to the directory of `image`, as qemu-img writes them.
fn backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        name.to_owned()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(name)
    }
}

/// One image and everything under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLevel {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
}

/// Opens `path` as `format` with its whole backing chain; `levels` receives each level, top
/// first.
pub fn open_chain(
    path: &Path,
    format: DiskFormat,
    writable: bool,
    direct: bool,
    levels: &mut Vec<ChainLevel>,
) -> Result<Image, BlockError> {
    let mut by_path = |p: &Path, writable: bool| {
        OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(p)
            .map(|f| (f, None))
    };
    open_chain_with(path, format, writable, direct, levels, &mut by_path)
}

/// How [`open_chain_with`] gets each file of a chain, by the path the chain names it by (and
/// whether it is to be written): opened there and then, or handed out from what was opened
/// before a jail ([`super::OpenedDisk`]), with the format the walk then took it to be (which
/// the parse keeps: the header it reads again may have been rewritten meanwhile).
pub type ChainOpener<'a> = dyn FnMut(&Path, bool) -> io::Result<(File, Option<DiskFormat>)> + 'a;

/// [`open_chain`] with the files coming from `open`.
pub fn open_chain_with(
    path: &Path,
    format: DiskFormat,
    writable: bool,
    direct: bool,
    levels: &mut Vec<ChainLevel>,
    open: &mut ChainOpener<'_>,
) -> Result<Image, BlockError> {
    let (file, _) = open(path, writable).map_err(|err| BlockError::Open {
        path: path.to_owned(),
        err,
    })?;
    let mut seen = Vec::new();
    chain_level(
        path, file, format, writable, direct, levels, &mut seen, open,
    )
}

/// One level of [`open_chain_with`], on its open `file`; `seen` holds the (device, inode) of
/// every level above it, so that a chain looping back is refused without a path lookup (which
/// a jailed process could not make).
#[allow(clippy::too_many_arguments)]
fn chain_level(
    path: &Path,
    file: File,
    format: DiskFormat,
    writable: bool,
    direct: bool,
    levels: &mut Vec<ChainLevel>,
    seen: &mut Vec<(u64, u64)>,
    open: &mut ChainOpener<'_>,
) -> Result<Image, BlockError> {
    let meta = file.metadata().map_err(|err| BlockError::Open {
        path: path.to_owned(),
        err,
    })?;
    let id = (meta.dev(), meta.ino());
    if let Some(at) = seen.iter().position(|s| *s == id) {
        return Err(image_err(
            path,
            format!(
                "backing chain loops: {} is already level {at} of the chain",
                path.display()
            ),
        ));
    }
    seen.push(id);
    let opts = StorageOpenOptions::new()
        .filename(path)
        .write(writable)
        .direct(direct);
    let storage = imago::file::File::from_open_file(file, opts).map_err(|e| image_err(path, e))?;
    levels.push(ChainLevel {
        path: path.to_owned(),
        format,
    });
    let image = match format {
        DiskFormat::Raw => {
            FormatAccess::new(Raw::open_image(storage, writable).map_err(|e| image_err(path, e))?)
        }
        DiskFormat::Qcow2 => {
            let mut q = Qcow2::<imago::file::File>::open_image(storage, writable)
                .map_err(|e| image_err(path, format!("not a usable qcow2 image: {e}")))?;
            if q.requires_external_data_file() {
                return Err(image_err(
                    path,
                    "qcow2 external data files are not supported",
                ));
            }
            let backing = match q.implicit_backing_file() {
                None => None,
                Some(_) if levels.len() >= MAX_CHAIN => {
                    return Err(image_err(
                        path,
                        format!("backing chain deeper than {MAX_CHAIN} images"),
                    ))
                }
                Some(name) => {
                    let bpath = backing_path(path, name);
                    let missing = || {
                        image_err(
                            path,
                            format!("its backing file {} is missing", bpath.display()),
                        )
                    };
                    let (bfile, walked) = match open(&bpath, false) {
                        Ok(f) => f,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                        Err(err) => {
                            return Err(BlockError::Open {
                                path: bpath.clone(),
                                err,
                            })
                        }
                    };
                    let header = match q.implicit_backing_format().map(String::as_str) {
                        Some("raw") => Some(DiskFormat::Raw),
                        Some("qcow2") => Some(DiskFormat::Qcow2),
                        Some(other) => {
                            return Err(image_err(
                                path,
                                format!("backing format {other:?} is not supported (raw or qcow2)"),
                            ))
                        }
                        None => None,
                    };
                    let bformat = match (walked, header) {
                        (Some(w), Some(h)) if w != h => {
                            return Err(image_err(
                                path,
                                format!(
                                    "its header changed while it was opened: its backing \
                                     file's format read {} before, {} now",
                                    w.as_str(),
                                    h.as_str()
                                ),
                            ))
                        }
                        (Some(f), _) | (None, Some(f)) => f,
                        // An operator's chain, opened here: probed, as qemu does.
                        (None, None) => probe_file(&bfile).map_err(|err| BlockError::Open {
                            path: bpath.clone(),
                            err,
                        })?,
                    };
                    Some(chain_level(
                        &bpath, bfile, bformat, false, direct, levels, seen, open,
                    )?)
                }
            };
            q.set_backing(backing);
            FormatAccess::new(q)
        }
    };
    Ok(image)
}

/// Opens, read-only, every backing file under the qcow2 image `top` (at `path`), reading of
/// each header no more than where its backing file is: the name (at most 1023 bytes, as qemu
/// writes) and, from the header extensions, the format. Returns `top` and those files, each
/// with the path the chain names it by, top first. This is what a VMM does with the host's
/// rights; the full parse ([`open_chain_with`]) comes once it has given them up, on these
/// descriptors, and fails if it reads the chain differently. A chain that loops or runs too
/// deep ends here without error: the full parse refuses it by name.
///
/// A backing file must be a regular file, and nothing else is ever opened (a device's
/// driver, a FIFO, a terminal: [`open_regular`]). Where `pinned` is given (what a writable image was made over), the top's header
/// is the one a VMM writes: the file it names, as opened (compared by inode), must be the
/// pinned one, or none where none was, and a format it gives must be the pinned one (the walk
/// takes the pinned format where it gives none).
pub fn open_chain_files(
    path: &Path,
    top: File,
    pinned: Option<&BackingPin>,
) -> Result<Vec<(PathBuf, File, DiskFormat)>, BlockError> {
    let rewritten = |what: String| {
        image_err(
            path,
            format!("{what} as when it was made: refused (a VMM may have rewritten its header)"),
        )
    };
    let mut files = vec![(path.to_owned(), top, DiskFormat::Qcow2)];
    let mut pin = pinned;
    loop {
        let (cur, file, _) = files.last().expect("the top is there");
        // Read once: what is checked is what is opened.
        let backing = backing_of(file).map_err(|e| image_err(cur, e))?;
        let first = pin.take();
        let Some((name, format)) = backing else {
            if let Some(want) = first.and_then(|p| p.file.as_ref()) {
                return Err(rewritten(format!(
                    "it names no backing file, not {}",
                    want.display()
                )));
            }
            return Ok(files);
        };
        let bpath = backing_path(cur, &name);
        if first.is_some_and(|p| p.file.is_none()) {
            return Err(rewritten(format!(
                "it names backing file {}, where it had none",
                bpath.display()
            )));
        }
        if files.len() >= MAX_CHAIN {
            return Ok(files);
        }
        let (bfile, meta) = match open_regular(&bpath) {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(image_err(
                    cur,
                    format!("its backing file {} is not a regular file", bpath.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(image_err(
                    cur,
                    format!("its backing file {} is missing", bpath.display()),
                ))
            }
            Err(err) => return Err(BlockError::Open { path: bpath, err }),
        };
        let mut format = format;
        if let Some(BackingPin {
            file: Some(want),
            format: wanted_format,
        }) = first
        {
            let same = std::fs::metadata(want)
                .is_ok_and(|w| (w.dev(), w.ino()) == (meta.dev(), meta.ino()));
            if !same {
                return Err(rewritten(format!(
                    "it names backing file {}, not {}",
                    bpath.display(),
                    want.display()
                )));
            }
            let Some(w) = wanted_format else {
                return Err(rewritten(
                    "its backing file's format was not recorded".into(),
                ));
            };
            match format.as_deref() {
                Some(f) if f != w.as_str() => {
                    return Err(rewritten(format!(
                        "it gives its backing file's format as {f:?}, not {:?}",
                        w.as_str()
                    )))
                }
                _ => format = Some(w.as_str().to_owned()),
            }
        }
        let looped = files.iter().any(|(_, f, _)| {
            f.metadata()
                .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
        });
        let format = match format.as_deref() {
            Some("qcow2") => DiskFormat::Qcow2,
            Some(_) => DiskFormat::Raw,
            None => probe_file(&bfile).map_err(|err| BlockError::Open {
                path: bpath.clone(),
                err,
            })?,
        };
        files.push((bpath, bfile, format));
        if looped || format != DiskFormat::Qcow2 {
            return Ok(files);
        }
    }
}

/// Opens `path` read-only if it is a regular file, `None` if it is something else, without
/// ever opening anything else: it is looked at through an `O_PATH` descriptor first (which
/// opens no device, FIFO or terminal), and that very file is then opened through
/// `/proc/self/fd`, so nothing can be swapped in between. Returns the file and what it is.
fn open_regular(path: &Path) -> io::Result<Option<(File, std::fs::Metadata)>> {
    use std::os::fd::AsRawFd;
    let what = bexar_util::handed::What::File {
        path: path.to_owned(),
        writable: false,
    };
    if let Some(fd) = bexar_util::handed::take(&what) {
        let file = File::from(fd?);
        let meta = file.metadata()?;
        return Ok(meta.is_file().then_some((file, meta)));
    }
    let look = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)?;
    let meta = look.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", look.as_raw_fd()))?;
    let opened = file.metadata()?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Ok(None);
    }
    Ok(Some((file, opened)))
}

/// The backing file a qcow2 header names, with the format its backing-format extension gives
/// (`None` for a file that is not qcow2 or has no backing file). Reads only the fixed header
/// fields that say where the name is, the name, and the extensions' type and length words.
fn backing_of(f: &File) -> Result<Option<(String, Option<String>)>, String> {
    /// Header extension: the backing file's format.
    const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Header extensions read at most (qemu writes a handful).
    const MAX_EXTENSIONS: usize = 64;
    let mut h = [0u8; 104];
    let n = read_up_to(f, &mut h, 0).map_err(|e| e.to_string())?;
    if n < 72 || h[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
    let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
    let version = be32(&h[4..]);
    let (offset, size) = (be64(&h[8..]), be32(&h[16..]));
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > 1023 {
        return Err(format!("backing file name of {size} bytes (at most 1023)"));
    }
    let mut name = vec![0u8; size as usize];
    f.read_exact_at(&mut name, offset)
        .map_err(|e| format!("backing file name: {e}"))?;
    let name = String::from_utf8(name).map_err(|_| "backing file name is not UTF-8".to_owned())?;
    // imago, which parses the image in the jail, reads header extensions of version 3 images
    // only, within the first cluster; so does this.
    if version < 3 || n < 104 {
        return Ok(Some((name, None)));
    }
    let cluster = 1u64 << be32(&h[20..]).clamp(9, 21);
    let mut at = u64::from(be32(&h[100..]));
    for _ in 0..MAX_EXTENSIONS {
        if at.saturating_add(8) > cluster {
            break;
        }
        let mut e = [0u8; 8];
        if f.read_exact_at(&mut e, at).is_err() {
            break;
        }
        let (kind, len) = (be32(&e), be32(&e[4..]));
        if kind == 0 {
            break;
        }
        if kind == EXT_BACKING_FORMAT {
            if len > 16 {
                // No format we take is this long: the walk stops, the parse names it.
                return Ok(Some((name, Some(String::new()))));
            }
            let mut fmt = vec![0u8; len as usize];
            f.read_exact_at(&mut fmt, at + 8)
                .map_err(|e| format!("backing format: {e}"))?;
            return Ok(Some((
                name,
                Some(String::from_utf8_lossy(&fmt).into_owned()),
            )));
        }
        at = at.saturating_add(8 + u64::from(len).next_multiple_of(8));
    }
    Ok(Some((name, None)))
}

/// Reads from `offset` until `buf` is full or the file ends; returns how much was read.
fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Creates a qcow2 image at `path` (which must not exist) over `backing` (recorded relative
/// to `path`'s directory when it is there, absolute otherwise), as big as the backing image
/// unless `size` asks for more. Returns the size. Written to a temporary name and renamed, so
/// a crash leaves no half-made image at `path`.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: DiskFormat,
    size: Option<u64>,
) -> Result<u64, BlockError> {
    let mut levels = Vec::new();
    let base = open_chain(backing, backing_format, false, false, &mut levels)?;
    let base_size = base.size();
    drop(base);
    let size = size.unwrap_or(base_size);
    if size < base_size {
        return Err(image_err(
            path,
            format!("{size} bytes is smaller than its backing image ({base_size} bytes)"),
        ));
    }
    let name = match (path.parent(), backing.parent()) {
        (Some(a), Some(b)) if a == b => backing
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        _ => std::fs::canonicalize(backing)
            .map_err(|err| BlockError::Open {
                path: backing.to_owned(),
                err,
            })?
            .to_string_lossy()
            .into_owned(),
    };
    let tmp = path.with_extension("qcow2.tmp");
    let made = (|| -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let storage = imago::file::File::from_open_file(
            file,
            StorageOpenOptions::new().filename(&tmp).write(true),
        )?;
        Qcow2::<imago::file::File>::create_builder(storage)
            .size(size)
            .backing(name, backing_format.as_str().to_owned())
            .create()?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        bexar_util::fs::sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(io::Error::other)
    })();
    made.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        image_err(path, format!("cannot create the overlay: {e}"))
    })?;
    Ok(size)
}

/// A qcow2 image (with its chain) served synchronously.
pub struct Qcow2Image {
    /// Shared only with a disk copy while one runs ([`super::copy::CopySource`]).
    image: std::sync::Arc<Image>,
    info: DiskInfo,
}

impl Qcow2Image {
    /// A disk on an opened chain.
    pub fn new(image: Image, read_only: bool) -> Self {
        let capacity = image.size();
        Self {
            image: std::sync::Arc::new(image),
            info: DiskInfo {
                capacity,
                read_only,
                discard: !read_only,
                write_zeroes: !read_only,
            },
        }
    }
}

impl SyncDisk for Qcow2Image {
    fn engine(&self) -> &'static str {
        "qcow2-sync"
    }
    fn copy_source(&self) -> Option<io::Result<super::copy::CopySource>> {
        Some(Ok(super::copy::CopySource::Qcow2(self.image.clone())))
    }
    fn info(&self) -> DiskInfo {
        self.info
    }
    fn run(&mut self, mem: &GuestMemoryMmap, req: &BlockRequest) -> io::Result<u64> {
        let slices = || {
            req.segments
                .iter()
                .map(|(addr, len)| {
                    mem.get_slice(*addr, *len as usize).map_err(|_| {
                        io::Error::other(format!("buffer at {:#x} is outside guest memory", addr.0))
                    })
                })
                .collect::<io::Result<Vec<_>>>()
        };
        match req.op {
            BlockOp::Read => {
                let slices = slices()?;
                let (bufv, guard) = IoVectorMut::from_volatile_slice(&slices);
                self.image.readv(bufv, req.offset)?;
                drop(guard);
                for (addr, len) in &req.segments {
                    mark_dirty(mem, *addr, *len as usize);
                }
                Ok(req.len)
            }
            BlockOp::Write => {
                let slices = slices()?;
                let (bufv, guard) = IoVector::from_volatile_slice(&slices);
                self.image.writev(bufv, req.offset)?;
                drop(guard);
                Ok(req.len)
            }
            BlockOp::Flush => {
                self.image.flush()?;
                self.image.sync()?;
                Ok(0)
            }
            BlockOp::WriteZeroes { unmap: false } => {
                self.image.write_zeroes(req.offset, req.len)?;
                Ok(0)
            }
            BlockOp::Discard | BlockOp::WriteZeroes { unmap: true } => {
                match std::sync::Arc::get_mut(&mut self.image) {
                    Some(image) => image.discard_to_zero(req.offset, req.len)?,
                    // A disk copy reads the image meanwhile: freeing clusters could hand one
                    // it is reading to another range, so the range becomes zero clusters
                    // (the guest reads the same zeros; the space comes back at its next
                    // discard).
                    None => self.image.write_zeroes(req.offset, req.len)?,
                }
                Ok(0)
            }
        }
    }
}

/// A qcow2 image whose reads and writes of allocated data go through io_uring (see the
/// module's documentation); the rest runs in imago at submit time.
pub struct Qcow2Uring {
    sync: Immediate<Qcow2Image>,
    ring: RawUring,
    /// Completions of the ring taken while waiting for it before a discard.
    held: Vec<Completion>,
}

impl Qcow2Uring {
    /// The ring works on `file`, a descriptor of the top image (the file imago has open); on
    /// failure the synchronous disk comes back with the error.
    pub fn new(
        sync: Immediate<Qcow2Image>,
        file: File,
    ) -> Result<Self, (Immediate<Qcow2Image>, io::Error)> {
        let ro = sync.disk().info.read_only;
        // The ring sees host offsets in the file, which grows as clusters are allocated: its
        // own bounds check must not stop it (the guest's range was checked against the disk).
        let info = DiskInfo {
            capacity: 1 << 62,
            read_only: ro,
            discard: false,
            write_zeroes: false,
        };
        match RawUring::new(file, info) {
            Ok(ring) => Ok(Self {
                sync,
                ring,
                held: Vec::new(),
            }),
            Err(e) => Err((sync, e)),
        }
    }

    /// Where `len` bytes at `offset` are, if all of them are data allocated in the top image.
    fn in_place(&self, offset: u64, len: u64) -> Option<u64> {
        match self.sync.disk().image.get_mapping(offset, len) {
            Ok((
                imago::Mapping::Raw {
                    offset: host,
                    writable: true,
                    ..
                },
                n,
            )) if n >= len => Some(host),
            _ => None,
        }
    }
}

impl DiskBackend for Qcow2Uring {
    fn engine(&self) -> &'static str {
        "qcow2-io_uring"
    }
    fn copy_source(&self) -> Option<io::Result<super::copy::CopySource>> {
        self.sync.copy_source()
    }
    fn info(&self) -> DiskInfo {
        self.sync.info()
    }
    fn submit(
        &mut self,
        mem: &GuestMemoryMmap,
        req: BlockRequest,
        user_data: u64,
    ) -> Result<(), BlockError> {
        check(&self.sync.info(), &req)?;
        match req.op {
            BlockOp::Read | BlockOp::Write => {
                if let Some(host) = self.in_place(req.offset, req.len) {
                    let req = BlockRequest {
                        offset: host,
                        ..req
                    };
                    return self.ring.submit(mem, req, user_data);
                }
            }
            BlockOp::Discard | BlockOp::WriteZeroes { .. } => {
                self.ring.drain(&mut self.held);
                if self.ring.in_flight() > 0 {
                    // The ring could not be waited for: freeing clusters now could hand one
                    // a write is still landing in to another range.
                    self.held.push(Completion {
                        user_data,
                        result: Err(io::Error::other("writes still in flight")),
                    });
                    return Ok(());
                }
            }
            BlockOp::Flush => {}
        }
        self.sync.submit(mem, req, user_data)
    }
    fn kick(&mut self) -> io::Result<()> {
        self.ring.kick()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.held);
        self.ring.reap(out);
        self.sync.reap(out);
    }
    fn notifier(&self) -> &vmm_sys_util::eventfd::EventFd {
        // The synchronous side never needs it: its completions are there when submit returns.
        self.ring.notifier()
    }
    fn in_flight(&self) -> usize {
        self.held.len() + self.ring.in_flight() + self.sync.in_flight()
    }
    fn drain(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.held);
        self.ring.drain(out);
        self.sync.drain(out);
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // imago flushes its caches when the image is dropped too; doing it here reports it.
        if !self.info.read_only {
            if let Err(e) = self.image.flush() {
                tracing::warn!("qcow2 metadata flush at close failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! qemu-img and qemu-io are the outside witnesses: they make images Bexar must open, and
    //! check and compare what Bexar wrote.
    use super::*;
    use crate::block::{open_disk, DiskBackend, DiskConfig};
    use std::process::Command;
    use vm_memory::{Bytes, GuestAddress};

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("bexar-qcow2-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn path(&self, f: &str) -> PathBuf {
            self.0.join(f)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn run(cmd: &str, args: &[&str]) -> (i32, String) {
        let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
            panic!("{cmd} is needed for this test (scripts/deps installs qemu-utils): {e}")
        });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code().unwrap_or(-1), text)
    }

    fn ok(cmd: &str, args: &[&str]) -> String {
        let (code, text) = run(cmd, args);
        assert_eq!(code, 0, "{cmd} {args:?}: {text}");
        text
    }

    /// `qemu-img create -f qcow2` of `path` over `backing` (named relative to it) in
    /// `format`, as large as the backing file.
    fn qcow2_over(path: &str, backing: &str, format: &str) {
        ok(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", backing, "-F", format, path,
            ],
        );
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn submit(
        b: &mut dyn DiskBackend,
        mem: &GuestMemoryMmap,
        req: BlockRequest,
    ) -> io::Result<u64> {
        b.submit(mem, req, 1).unwrap();
        let mut out = Vec::new();
        b.drain(&mut out);
        assert_eq!(out.len(), 1);
        out.pop().unwrap().result
    }

    fn write(b: &mut dyn DiskBackend, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) {
        // Split across two guest buffers, to exercise vectors.
        let half = data.len() / 2;
        mem.write_slice(&data[..half], GuestAddress(0x1000))
            .unwrap();
        mem.write_slice(&data[half..], GuestAddress(0x80000))
            .unwrap();
        let req = BlockRequest {
            op: BlockOp::Write,
            offset,
            len: data.len() as u64,
            segments: vec![
                (GuestAddress(0x1000), half as u32),
                (GuestAddress(0x80000), (data.len() - half) as u32),
            ],
        };
        assert_eq!(submit(b, mem, req).unwrap(), data.len() as u64);
    }

    fn read(b: &mut dyn DiskBackend, mem: &GuestMemoryMmap, offset: u64, len: usize) -> Vec<u8> {
        let req = BlockRequest {
            op: BlockOp::Read,
            offset,
            len: len as u64,
            segments: vec![(GuestAddress(0x100000), len as u32)],
        };
        assert_eq!(submit(b, mem, req).unwrap(), len as u64);
        let mut out = vec![0u8; len];
        mem.read_slice(&mut out, GuestAddress(0x100000)).unwrap();
        out
    }

    fn simple(b: &mut dyn DiskBackend, mem: &GuestMemoryMmap, op: BlockOp, offset: u64, len: u64) {
        let req = BlockRequest {
            op,
            offset,
            len,
            segments: vec![],
        };
        submit(b, mem, req).unwrap();
    }

    fn open(path: &Path) -> Box<dyn DiskBackend> {
        open_disk(&DiskConfig {
            path: path.to_owned(),
            ..Default::default()
        })
        .unwrap()
    }

    /// Writes at the same offsets into a raw "expected" file.
    fn expect(path: &Path, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(data, offset)
            .unwrap();
    }

    #[test]
    fn a_chain_opened_before_is_parsed_and_used_with_no_path_left() {
        // What a jailed VMM does: the chain's files are opened (reading of each header only
        // where its backing file is), the directory goes away, and the image is parsed and
        // written through the descriptors alone.
        let d = Dir::new("preopened");
        let mem = crate::memory::test_memory(4);
        const SIZE: u64 = 4 << 20;
        let base = d.path("base.raw");
        std::fs::write(&base, pattern(3, SIZE as usize)).unwrap();
        let mid = d.path("mid.qcow2");
        let top = d.path("top.qcow2");
        qcow2_over(mid.to_str().unwrap(), "base.raw", "raw");
        qcow2_over(top.to_str().unwrap(), "mid.qcow2", "qcow2");
        ok(
            "qemu-io",
            &["-c", "write -P 0x6b 64k 64k", mid.to_str().unwrap()],
        );
        let cfg = DiskConfig {
            path: top.clone(),
            ..Default::default()
        };
        // A writable image's backing file and its format are the ones recorded, or the image
        // is refused.
        use crate::block::BackingPin;
        let pin = |file: Option<&PathBuf>, format| BackingPin {
            file: file.cloned(),
            format: Some(format),
        };
        for (pinned, ok) in [
            (pin(Some(&base), DiskFormat::Raw), false),
            (pin(Some(&mid), DiskFormat::Raw), false),
            (pin(None, DiskFormat::Raw), false),
            (pin(Some(&mid), DiskFormat::Qcow2), true),
        ] {
            let r = crate::block::preopen_disk(&DiskConfig {
                backing: Some(pinned),
                ..cfg.clone()
            });
            match r {
                Ok(_) => assert!(ok),
                Err(e) => assert!(!ok && e.to_string().contains("refused"), "{e}"),
            }
        }
        // A backing file that is not a regular file is refused, without blocking on it.
        let pipe = d.path("pipe");
        let fifo = d.path("fifo.qcow2");
        assert!(std::process::Command::new("mkfifo")
            .arg(&pipe)
            .status()
            .unwrap()
            .success());
        let f = fifo.to_str().unwrap();
        ok(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", "pipe", "-F", "raw", f, "1M",
            ],
        );
        let e = crate::block::preopen_disk(&DiskConfig {
            path: fifo.clone(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let opened = crate::block::preopen_disk(&cfg).unwrap();
        let (format, files) = opened.local().unwrap();
        assert_eq!(format, DiskFormat::Qcow2);
        let names: Vec<_> = files.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(names, [top.clone(), mid.clone(), base.clone()]);
        let gone = d.0.with_extension("gone");
        std::fs::rename(&d.0, &gone).unwrap();
        let mut b = crate::block::open_disk_from(opened).unwrap();
        assert_eq!(b.info().capacity, SIZE);
        assert_eq!(read(b.as_mut(), &mem, 0, 4096), pattern(3, 4096));
        assert_eq!(read(b.as_mut(), &mem, 64 << 10, 512), vec![0x6b; 512]);
        write(b.as_mut(), &mem, 1 << 20, &[0x77; 8192]);
        simple(b.as_mut(), &mem, BlockOp::Flush, 0, 0);
        drop(b);
        std::fs::rename(&gone, &d.0).unwrap();
        let t = top.to_str().unwrap();
        ok("qemu-img", &["check", "-q", t]);
        let out = ok(
            "qemu-io",
            &["-c", "read -P 0x77 1M 8k", "-c", "read -P 0x6b 64k 64k", t],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
        // A backing file the chain names and nobody opened is not found, by name.
        let opened = crate::block::preopen_disk(&DiskConfig {
            path: mid.clone(),
            format: Some(DiskFormat::Raw),
            ..Default::default()
        })
        .unwrap();
        let e = open_chain_with(
            &mid,
            DiskFormat::Qcow2,
            false,
            false,
            &mut Vec::new(),
            &mut opened.opener(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("base.raw") && e.contains("missing"), "{e}");
    }

    #[test]
    fn a_pinned_backing_format_holds_when_the_header_gives_none() {
        // A raw base whose first bytes a tenant chose to look like qcow2, under an overlay
        // whose header gives no backing format: probed, the base would be parsed as qcow2;
        // pinned raw, it is read as the raw bytes it is, in the walk and in the parse.
        let d = Dir::new("pinned-format");
        let mem = crate::memory::test_memory(4);
        let base = d.path("base.raw");
        let mut bytes = QCOW2_MAGIC.to_vec();
        bytes.extend(pattern(9, (1 << 20) - 4));
        std::fs::write(&base, &bytes).unwrap();
        let top = d.path("top.qcow2");
        let t = top.to_str().unwrap();
        // A version 2 header: its format extension is read neither by imago nor by the walk.
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "base.raw",
                "-F",
                "raw",
                t,
            ],
        );
        let cfg = DiskConfig {
            path: top.clone(),
            format: Some(DiskFormat::Qcow2),
            ..Default::default()
        };
        let pinned = |format| DiskConfig {
            backing: Some(crate::block::BackingPin {
                file: Some(base.clone()),
                format,
            }),
            ..cfg.clone()
        };
        let mut b = crate::block::open_disk_from(
            crate::block::preopen_disk(&pinned(Some(DiskFormat::Raw))).unwrap(),
        )
        .unwrap();
        assert_eq!(read(b.as_mut(), &mem, 0, 4096), bytes[..4096].to_vec());
        drop(b);
        // A pin that does not say the format is no pin.
        let e = crate::block::preopen_disk(&pinned(None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("format was not recorded"), "{e}");
    }

    #[test]
    fn overlays_over_raw_and_qcow2_bases_check_clean_and_compare_equal() {
        let d = Dir::new("chain");
        let mem = crate::memory::test_memory(4);
        const SIZE: u64 = 8 << 20;
        // Base: raw, with data everywhere.
        let base = d.path("base.raw");
        std::fs::write(&base, pattern(1, SIZE as usize)).unwrap();
        // Middle: qcow2 over it made by qemu-img, with writes by qemu-io (data and zeroes).
        let mid = d.path("mid.qcow2");
        qcow2_over(mid.to_str().unwrap(), "base.raw", "raw");
        ok(
            "qemu-io",
            &[
                "-c",
                "write -P 0x5a 1M 192k",
                "-c",
                "write -z 3M 64k",
                mid.to_str().unwrap(),
            ],
        );
        // The expected image: the base with qemu-io's writes.
        let want = d.path("want.raw");
        std::fs::copy(&base, &want).unwrap();
        expect(&want, 1 << 20, &[0x5a; 192 << 10]);
        expect(&want, 3 << 20, &[0; 64 << 10]);
        // Top: Bexar's overlay over the qcow2 middle.
        let top = d.path("top.qcow2");
        assert_eq!(
            create_overlay(&top, &mid, DiskFormat::Qcow2, None).unwrap(),
            SIZE
        );
        let mut levels = Vec::new();
        drop(open_chain(&top, DiskFormat::Qcow2, false, false, &mut levels).unwrap());
        assert_eq!(levels.len(), 3, "{levels:?}");
        assert_eq!(levels[2].format, DiskFormat::Raw);

        let mut b = open(&top);
        // Allocated data through io_uring, the rest in imago: rewrites below take the ring.
        assert_eq!(b.engine(), "qcow2-io_uring");
        assert_eq!(b.info().capacity, SIZE);
        // Reads fall through to each level.
        assert_eq!(read(b.as_mut(), &mem, 0, 4096), pattern(1, 4096));
        assert_eq!(
            read(b.as_mut(), &mem, (1 << 20) + 4096, 512),
            vec![0x5a; 512]
        );
        assert_eq!(read(b.as_mut(), &mem, 3 << 20, 4096), vec![0; 4096]);
        // Writes of every shape: sub-cluster (copy-on-write of the rest of the cluster from
        // below), across clusters, whole clusters, unaligned to 4 KiB.
        let mut x = 7u64;
        for i in 0..200u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (((x >> 33) % 256) + 1) * 512;
            let off = ((x >> 11) % ((SIZE - len) / 512)) * 512;
            let data = pattern(100 + i, len as usize);
            write(b.as_mut(), &mem, off, &data);
            expect(&want, off, &data);
            assert_eq!(read(b.as_mut(), &mem, off, len as usize), data, "write {i}");
        }
        // Write-zeroes, with and without unmap, and a discard (reads as zeros here).
        simple(
            b.as_mut(),
            &mem,
            BlockOp::WriteZeroes { unmap: false },
            5 << 20,
            70_000 / 512 * 512,
        );
        expect(&want, 5 << 20, &vec![0; 70_000 / 512 * 512]);
        simple(
            b.as_mut(),
            &mem,
            BlockOp::WriteZeroes { unmap: true },
            (6 << 20) + 512,
            200 << 10,
        );
        expect(&want, (6 << 20) + 512, &[0; 200 << 10]);
        simple(b.as_mut(), &mem, BlockOp::Discard, 0, 128 << 10);
        expect(&want, 0, &[0; 128 << 10]);
        assert_eq!(read(b.as_mut(), &mem, 0, 4096), vec![0; 4096]);
        simple(b.as_mut(), &mem, BlockOp::Flush, 0, 0);
        drop(b);

        // The witnesses: a clean check, the same contents, and the chain as we made it.
        ok("qemu-img", &["check", top.to_str().unwrap()]);
        ok("qemu-img", &["check", mid.to_str().unwrap()]);
        let same = ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                top.to_str().unwrap(),
                want.to_str().unwrap(),
            ],
        );
        assert!(same.contains("identical"), "{same}");
        let info = ok(
            "qemu-img",
            &["info", "--output=json", top.to_str().unwrap()],
        );
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["backing-filename"], "mid.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
        // The lower levels are untouched.
        assert_eq!(std::fs::read(&base).unwrap(), pattern(1, SIZE as usize));
        ok("qemu-img", &["check", mid.to_str().unwrap()]);
    }

    #[test]
    fn compressed_clusters_read_and_writes_over_them_work() {
        let d = Dir::new("compressed");
        let mem = crate::memory::test_memory(2);
        let raw = d.path("src.raw");
        // Compressible: runs of a byte; and some incompressible data.
        let mut data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i / 4096) as u8).collect();
        data[(1 << 20)..(1 << 20) + 65536].copy_from_slice(&pattern(9, 65536));
        std::fs::write(&raw, &data).unwrap();
        let c = d.path("c.qcow2");
        ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                c.to_str().unwrap(),
            ],
        );
        let map = ok("qemu-img", &["map", "--output=json", c.to_str().unwrap()]);
        assert!(
            map.contains("\"compressed\": true"),
            "qemu-img made no compressed cluster: {map}"
        );
        let mut b = open(&c);
        for off in [0u64, 12_288, 1 << 20, (2 << 20) - 8192] {
            assert_eq!(
                read(b.as_mut(), &mem, off, 8192),
                &data[off as usize..off as usize + 8192],
                "at {off}"
            );
        }
        // A write into a compressed cluster: the rest of the cluster is kept.
        let w = pattern(3, 1024);
        write(b.as_mut(), &mem, 4096 + 512, &w);
        data[4608..4608 + 1024].copy_from_slice(&w);
        simple(b.as_mut(), &mem, BlockOp::Flush, 0, 0);
        drop(b);
        std::fs::write(&raw, &data).unwrap();
        ok("qemu-img", &["check", c.to_str().unwrap()]);
        let same = ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                c.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert!(same.contains("identical"), "{same}");
    }

    #[test]
    fn bad_chains_are_refused_by_name() {
        let d = Dir::new("bad");
        let p = |f: &str| d.path(f);
        let s = |f: &str| d.path(f).to_string_lossy().into_owned();
        let err = |path: &Path| match open_disk(&DiskConfig {
            path: path.to_owned(),
            ..Default::default()
        }) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e.to_string(),
        };
        // A missing backing file.
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "gone.raw",
                "-F",
                "raw",
                &s("orphan.qcow2"),
                "1M",
            ],
        );
        let e = err(&p("orphan.qcow2"));
        assert!(
            e.contains("orphan.qcow2") && e.contains("gone.raw") && e.contains("missing"),
            "{e}"
        );
        // A loop: a over b over a.
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &s("a.qcow2"), "1M"],
        );
        qcow2_over(&s("b.qcow2"), "a.qcow2", "qcow2");
        ok(
            "qemu-img",
            &[
                "rebase",
                "-u",
                "-b",
                "b.qcow2",
                "-F",
                "qcow2",
                &s("a.qcow2"),
            ],
        );
        let e = err(&p("b.qcow2"));
        assert!(e.contains("loops"), "{e}");
        // Too deep.
        ok("qemu-img", &["create", "-q", "-f", "raw", &s("l0"), "1M"]);
        for i in 1..=MAX_CHAIN {
            let (below, fmt) = (format!("l{}", i - 1), if i == 1 { "raw" } else { "qcow2" });
            qcow2_over(&s(&format!("l{i}")), &below, fmt);
        }
        let e = err(&p(&format!("l{MAX_CHAIN}")));
        assert!(e.contains("deeper than 16"), "{e}");
        assert!(open_disk(&DiskConfig {
            path: p(&format!("l{}", MAX_CHAIN - 1)),
            ..Default::default()
        })
        .is_ok());
        // A corrupt header: a qcow2 magic with garbage after it.
        let mut junk = QCOW2_MAGIC.to_vec();
        junk.extend(pattern(5, 4092));
        std::fs::write(p("junk.qcow2"), junk).unwrap();
        let e = err(&p("junk.qcow2"));
        assert!(e.contains("junk.qcow2") && e.contains("qcow2"), "{e}");
        // An unknown backing format.
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "l0",
                "-F",
                "vmdk",
                &s("vm.qcow2"),
                "1M",
            ],
        );
        let e = err(&p("vm.qcow2"));
        assert!(e.contains("vmdk"), "{e}");
        // An external data file.
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=ext.raw",
                &s("ext.qcow2"),
                "1M",
            ],
        );
        let e = err(&p("ext.qcow2"));
        assert!(e.contains("external data"), "{e}");
        // A failed overlay creation leaves nothing.
        assert!(
            create_overlay(&p("new.qcow2"), &p("orphan.qcow2"), DiskFormat::Qcow2, None).is_err()
        );
        assert!(!p("new.qcow2").exists() && !p("new.qcow2.tmp").exists());
        assert!(create_overlay(&p("small.qcow2"), &p("l0"), DiskFormat::Raw, Some(512)).is_err());
        assert!(!p("small.qcow2").exists());
    }

    #[test]
    fn formats_are_probed_and_recorded_formats_win() {
        let d = Dir::new("probe");
        let q = d.path("q.qcow2");
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "1M"],
        );
        assert_eq!(probe(&q).unwrap(), DiskFormat::Qcow2);
        let r = d.path("r.raw");
        std::fs::write(&r, [0u8; 2]).unwrap();
        assert_eq!(probe(&r).unwrap(), DiskFormat::Raw);
        // A raw disk whose guest wrote a qcow2 header stays raw when its format is recorded.
        let mut fake = QCOW2_MAGIC.to_vec();
        fake.resize(1 << 20, 0);
        let f = d.path("guest.raw");
        std::fs::write(&f, fake).unwrap();
        let b = open_disk(&DiskConfig {
            path: f.clone(),
            format: Some(DiskFormat::Raw),
            ..Default::default()
        })
        .unwrap();
        assert!(!b.engine().starts_with("qcow2"), "{}", b.engine());
        assert_eq!(b.info().capacity, 1 << 20);
    }
}
