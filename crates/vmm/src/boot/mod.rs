//! x86_64 direct kernel boot: load an ELF vmlinux (PVH entry when the ELF carries the note, else
//! the 64-bit Linux boot protocol) or a bzImage, the initrd and the command line, and describe
//! the machine to the guest (e820, zero page or PVH start info, MP table).

pub mod mptable;
pub mod params;
pub mod regs;
pub mod smbios;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bexar_devices::memory::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
pub use params::BootInfo;
pub use regs::EntryMode;

/// Errors preparing the guest for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {err}")]
    KernelFile {
        /// Kernel path.
        path: PathBuf,
        /// Underlying error.
        err: std::io::Error,
    },
    /// The file is neither an x86_64 ELF nor a bzImage.
    #[error("{0} is not a kernel: expected a 64-bit x86 ELF (vmlinux) or a bzImage")]
    UnknownFormat(PathBuf),
    /// The ELF is not a 64-bit x86 ELF.
    #[error("{path} is an ELF but not a 64-bit x86_64 one ({what})")]
    WrongElf {
        /// Kernel path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The kernel does not fit in guest memory.
    #[error("the kernel needs {need_mib} MiB of guest memory (it loads up to {end:#x}) but the VM has {have_mib} MiB")]
    KernelTooBig {
        /// Highest byte the kernel occupies.
        end: u64,
        /// Memory needed in MiB.
        need_mib: u64,
        /// Memory configured in MiB.
        have_mib: u64,
    },
    /// The loader refused the image.
    #[error("cannot load kernel {path}: {err}")]
    Load {
        /// Kernel path.
        path: PathBuf,
        /// Loader error.
        err: linux_loader::loader::Error,
    },
    /// The bzImage does not support the 64-bit entry.
    #[error(
        "bzImage {0} has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)"
    )]
    NoBzImage64(PathBuf),
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {err}")]
    InitrdFile {
        /// Initrd path.
        path: PathBuf,
        /// Underlying error.
        err: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory above the kernel (end {kernel_end:#x}); give the VM more memory")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// End of the kernel image.
        kernel_end: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Low memory the boot structures need is missing.
    #[error("guest memory has no room for boot structures at {0:#x}")]
    LowMemory(u64),
    /// Writing the boot parameters failed.
    #[error("cannot write boot parameters: {0}")]
    Params(String),
    /// Too many memory regions for the zero page.
    #[error("too many memory regions for the boot memory map")]
    TooManyMemoryRegions,
    /// Too many (or zero) vCPUs for the MP table.
    #[error("{0} vCPUs requested; between 1 and 32 are supported")]
    TooManyVcpus(u8),
}

/// Kernel image formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelFormat {
    /// An ELF vmlinux (or any ELF following the Linux boot protocol).
    Elf,
    /// A compressed bzImage; its decompressor runs in the guest.
    BzImage,
}

/// How the loaded guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootEntry {
    /// Entry protocol.
    pub mode: EntryMode,
    /// Entry point (guest physical).
    pub entry: u64,
    /// Address of boot_params (Linux64) or hvm_start_info (PVH).
    pub params: u64,
    /// Format the kernel came in.
    pub format: KernelFormat,
}

/// Determines the kernel format from its first bytes.
pub fn probe_format(path: &Path, file: &mut File) -> Result<KernelFormat, BootError> {
    let io = |err| BootError::KernelFile {
        path: path.to_owned(),
        err,
    };
    let mut head = [0u8; 0x210];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let n = read_up_to(file, &mut head).map_err(io)?;
    if n >= 64 && head[..4] == *b"\x7fELF" {
        if head[4] != 2 {
            return Err(BootError::WrongElf {
                path: path.to_owned(),
                what: "not ELFCLASS64".into(),
            });
        }
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if machine != 62 {
            return Err(BootError::WrongElf {
                path: path.to_owned(),
                what: format!("e_machine {machine}, want 62 (x86_64)"),
            });
        }
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat(path.to_owned()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Highest guest address any PT_LOAD segment of a 64-bit ELF reaches (0 if unreadable).
fn elf_load_end(file: &mut File) -> u64 {
    let mut eh = [0u8; 64];
    if file.seek(SeekFrom::Start(0)).is_err() || read_up_to(file, &mut eh).unwrap_or(0) < 64 {
        return 0;
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as u64;
    let phnum = u16::from_le_bytes([eh[56], eh[57]]) as u64;
    if phentsize < 56 || phnum > 256 {
        return 0;
    }
    let mut end = 0u64;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        if file.seek(SeekFrom::Start(phoff + i * phentsize)).is_err()
            || read_up_to(file, &mut ph).unwrap_or(0) < 56
        {
            return end;
        }
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap_or_default());
        let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap_or_default());
        let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap_or_default());
        if p_type == 1 {
            end = end.max(paddr.saturating_add(memsz));
        }
    }
    end
}

/// What a successful load produced.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Format.
    pub format: KernelFormat,
    /// Entry point for the 64-bit protocol.
    pub entry64: u64,
    /// PVH entry, if the ELF advertises one.
    pub pvh_entry: Option<u64>,
    /// First byte after the kernel.
    pub end: u64,
    /// The bzImage setup header.
    pub header: Option<setup_header>,
}

/// Loads the kernel image at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let file = open_ro(path).map_err(|err| BootError::KernelFile {
        path: path.to_owned(),
        err,
    })?;
    load_kernel_file(mem, path, file)
}

/// Loads the kernel image open as `file` (named `path` in errors) into guest memory.
pub fn load_kernel_file(
    mem: &GuestMemoryMmap,
    path: &Path,
    mut file: File,
) -> Result<LoadedKernel, BootError> {
    let format = probe_format(path, &mut file)?;
    let mem_end = mem.last_addr().0 + 1;
    let have_mib = mem.iter().map(|r| r.len()).sum::<u64>() >> 20;
    if format == KernelFormat::Elf {
        let end = elf_load_end(&mut file);
        if end > mem_end.min(MMIO_GAP_START) {
            return Err(BootError::KernelTooBig {
                end,
                need_mib: end.div_ceil(1 << 20) + 1,
                have_mib,
            });
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|err| BootError::KernelFile {
            path: path.to_owned(),
            err,
        })?;
    let load_err = |err| BootError::Load {
        path: path.to_owned(),
        err,
    };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let pvh_entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            };
            Ok(LoadedKernel {
                format,
                entry64: r.kernel_load.0,
                pvh_entry,
                end: r.kernel_end,
                header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(
                |err| match err {
                    linux_loader::loader::Error::Bzimage(
                        linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
                    ) => BootError::KernelTooBig {
                        end: 0,
                        need_mib: 0,
                        have_mib,
                    },
                    e => load_err(e),
                },
            )?;
            let hdr = r
                .setup_header
                .ok_or_else(|| BootError::NoBzImage64(path.to_owned()))?;
            // XLF_KERNEL_64: the 64-bit entry sits 0x200 bytes into the protected-mode kernel.
            if hdr.version < 0x020c || hdr.xloadflags & 1 == 0 {
                return Err(BootError::NoBzImage64(path.to_owned()));
            }
            Ok(LoadedKernel {
                format,
                entry64: r.kernel_load.0 + 0x200,
                pvh_entry: None,
                end: r.kernel_end,
                header: Some(hdr),
            })
        }
    }
}

/// Loads the initrd at `path` at the top of low memory, above the kernel; returns (address,
/// size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let file = open_ro(path).map_err(|err| BootError::InitrdFile {
        path: path.to_owned(),
        err,
    })?;
    load_initrd_file(mem, path, file, kernel_end)
}

/// [`load_initrd`] of the initrd open as `file` (named `path` in errors).
pub fn load_initrd_file(
    mem: &GuestMemoryMmap,
    path: &Path,
    mut file: File,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let err = |err| BootError::InitrdFile {
        path: path.to_owned(),
        err,
    };
    let size = file.metadata().map_err(err)?.len();
    let low_end = (mem.last_addr().0 + 1).min(MMIO_GAP_START);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end && size > 0)
        .ok_or(BootError::InitrdTooBig { size, kernel_end })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::InitrdFile {
            path: path.to_owned(),
            err: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

/// Writes the command line; returns its length.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len())
}

/// The kernel and initrd of a boot, open: opened before the VMM's jail (they are host files
/// the jail's root does not hold) and read, which is parsing an image a tenant may have
/// supplied, only after it ([`prepare`]).
/// A kernel or initrd as the agent handed it, or opened by path ([`bexar_util::handed`]).
fn open_ro(path: &Path) -> std::io::Result<File> {
    bexar_util::handed::file(path, false, || File::open(path))
}

#[derive(Debug)]
pub struct BootFiles {
    kernel: (PathBuf, File),
    initrd: Option<(PathBuf, File)>,
}

impl BootFiles {
    /// Opens the kernel and the initrd; reads nothing yet.
    pub fn open(kernel: &Path, initrd: Option<&Path>) -> Result<Self, BootError> {
        let k = open_ro(kernel).map_err(|err| BootError::KernelFile {
            path: kernel.to_owned(),
            err,
        })?;
        let i = match initrd {
            Some(p) => Some((
                p.to_owned(),
                open_ro(p).map_err(|err| BootError::InitrdFile {
                    path: p.to_owned(),
                    err,
                })?,
            )),
            None => None,
        };
        Ok(Self {
            kernel: (kernel.to_owned(), k),
            initrd: i,
        })
    }
}

/// Loads everything and writes the boot structures; returns how to enter the guest.
pub fn prepare(
    mem: &GuestMemoryMmap,
    files: BootFiles,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    let BootFiles { kernel, initrd } = files;
    let k = load_kernel_file(mem, &kernel.0, kernel.1)?;
    let initrd = match initrd {
        Some((path, file)) => Some(load_initrd_file(mem, &path, file, k.end)?),
        None => None,
    };
    let info = BootInfo {
        cmdline_len: write_cmdline(mem, cmdline)?,
        initrd,
    };
    if let Some(entry) = k.pvh_entry {
        params::write_pvh_info(mem, info)?;
        return Ok(BootEntry {
            mode: EntryMode::Pvh,
            entry,
            params: crate::layout::PVH_INFO_START,
            format: k.format,
        });
    }
    params::write_zero_page(mem, k.header, info)?;
    // Touch the zero page to be sure it is in guest memory before the vCPU starts.
    mem.read_obj::<u8>(GuestAddress(crate::layout::ZERO_PAGE_START))
        .map_err(|_| BootError::LowMemory(crate::layout::ZERO_PAGE_START))?;
    Ok(BootEntry {
        mode: EntryMode::Linux64,
        entry: k.entry64,
        params: crate::layout::ZERO_PAGE_START,
        format: k.format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bexar-boot-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal x86_64 ELF: one PT_LOAD of `code` at `paddr`, entry at its start.
    fn elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes());
        e[18..20].copy_from_slice(&62u16.to_le_bytes());
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut e[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes());
        ph[4..8].copy_from_slice(&5u32.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn loads_a_minimal_elf_with_the_64_bit_entry() {
        let ram = create_guest_memory(8).unwrap();
        let p = tmp("ok.elf", &elf(0x10_0000, &[0xf4], 1));
        let e = prepare(
            &ram.mem,
            BootFiles::open(&p, None).unwrap(),
            "console=ttyS0",
        )
        .unwrap();
        assert_eq!(e.mode, EntryMode::Linux64);
        assert_eq!(e.entry, 0x10_0000);
        let b: u8 = ram.mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(b, 0xf4);
        let mut cl = [0u8; 14];
        ram.mem
            .read_slice(&mut cl, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn kernel_larger_than_memory_is_refused_clearly() {
        let ram = create_guest_memory(4).unwrap();
        let p = tmp("big.elf", &elf(0x100_0000, &[0xf4], 1 << 20));
        let err = load_kernel(&ram.mem, &p).unwrap_err();
        assert!(matches!(err, BootError::KernelTooBig { .. }), "{err}");
        assert!(err.to_string().contains("MiB"));
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn garbage_and_truncated_elves_are_errors_not_panics() {
        let ram = create_guest_memory(8).unwrap();
        let p = tmp("junk", b"this is not a kernel");
        assert!(matches!(
            load_kernel(&ram.mem, &p),
            Err(BootError::UnknownFormat(_))
        ));
        let mut e = elf(0x10_0000, &[0xf4; 16], 16);
        e.truncate(100); // program header cut in half
        let p2 = tmp("trunc.elf", &e);
        assert!(load_kernel(&ram.mem, &p2).is_err());
        let mut e32 = elf(0x10_0000, &[0xf4], 1);
        e32[4] = 1;
        let p3 = tmp("e32.elf", &e32);
        assert!(matches!(
            load_kernel(&ram.mem, &p3),
            Err(BootError::WrongElf { .. })
        ));
        for p in [p, p2, p3] {
            std::fs::remove_file(p).ok();
        }
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let ram = create_guest_memory(8).unwrap();
        let err = load_kernel(&ram.mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn initrd_goes_to_the_top_of_memory() {
        let ram = create_guest_memory(16).unwrap();
        let p = tmp("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&ram.mem, &p, 0x20_0000).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr, ((16 << 20) - 5000) & !0xfff);
        let b: u8 = ram.mem.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 7);
        assert!(load_initrd(&ram.mem, &p, 16 << 20).is_err());
        std::fs::remove_file(p).ok();
    }
}
