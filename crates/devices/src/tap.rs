//! A TAP device opened with virtio-net headers (IFF_VNET_HDR), so frames and their offload
//! metadata pass between the guest and the host kernel without translation.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

// The TUN ioctls of <linux/if_tun.h>: type 'T', each taking an int (or unsigned int).
const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
ioctl_iow_nr!(TUNSETPERSIST, TUNTAP, 203, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);

/// TUN_F_* offload flags (what the host may hand the guest).
pub mod offload {
    /// Partial checksums.
    pub const CSUM: u32 = 0x01;
    /// TCPv4 segmentation offload.
    pub const TSO4: u32 = 0x02;
    /// TCPv6 segmentation offload.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = 0x08;
}

/// Size of the virtio-net header for VIRTIO_F_VERSION_1 devices.
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not a valid interface name.
    #[error("invalid TAP name {0:?}: 1-15 bytes, no '/' or whitespace")]
    Name(String),
    /// An ioctl or open failed.
    #[error("cannot open TAP {name}: {what}: {err}")]
    Open {
        /// Interface name.
        name: String,
        /// Step that failed.
        what: &'static str,
        /// Underlying error.
        err: io::Error,
    },
}

/// An open TAP queue.
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates the TAP `name` as a persistent device (it outlives this process and any VMM
    /// that opens it, until it is deleted), or does nothing if it exists.
    pub fn create_persistent(name: &str) -> Result<(), TapError> {
        let tap = Self::open(name)?;
        // SAFETY: TUNSETPERSIST takes its argument by value.
        if unsafe { ioctl_with_val(&tap.file, TUNSETPERSIST(), 1) } < 0 {
            return Err(TapError::Open {
                name: name.to_owned(),
                what: "TUNSETPERSIST",
                err: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Opens (or creates, when allowed) the TAP `name` with virtio-net headers.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() > 15
            || name
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(TapError::Name(name.to_owned()));
        }
        let err = |what, err| TapError::Open {
            name: name.to_owned(),
            what,
            err,
        };
        let handed = bexar_util::handed::What::Tap {
            name: name.to_owned(),
        };
        if let Some(fd) = bexar_util::handed::take(&handed) {
            // Attached by whoever handed it, with the same flags and header size.
            let file = std::fs::File::from(fd.map_err(|e| err("take the handed TAP", e))?);
            return Ok(Self {
                file,
                name: name.to_owned(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| err("open /dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes).
        if unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) } < 0 {
            return Err(err("TUNSETIFF", io::Error::last_os_error()));
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr) } < 0 {
            return Err(err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// Tells the host kernel which offloads the guest accepts on receive.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), flags.into()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TAP file (non-blocking; one frame per read or write, with its virtio-net header).
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // The values <linux/if_tun.h> gives on x86_64.
        assert_eq!(super::TUNSETIFF(), 0x4004_54ca);
        assert_eq!(super::TUNSETPERSIST(), 0x4004_54cb);
        assert_eq!(super::TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(super::TUNSETVNETHDRSZ(), 0x4004_54d8);
    }
}
