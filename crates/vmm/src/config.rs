//! [`VmConfig`]: everything one VM is built from, and the only home of every bound on it.
//!
//! The CLI (`bexar run`, `bexar boot-test`) and the agent's VM spec both convert into it; the
//! agent hands it to each `bexar vmm` process in `launch.json` (see [`crate::launch`]), so a
//! snapshot can store the same document. [`VmConfig::validate`] names the field it refuses;
//! callers translate that name into theirs (a flag, a field of the API's spec).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use bexar_devices::block::DiskConfig;
pub use bexar_devices::serial::ConsoleConfig;
pub use bexar_devices::virtio::net::NicConfig;
pub use bexar_devices::virtio::vsock::VsockConfig;

use crate::boot::smbios::{self, SmbiosIdentity};
use crate::cpuid::CpuTemplate;
use crate::layout::{CMDLINE_MAX_SIZE, VIRTIO_SLOTS};

/// Most vCPUs a VM may have: what the MP table in the last KiB of base memory describes.
pub const MAX_VCPUS: u8 = crate::boot::mptable::MAX_VCPUS;
/// Least guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most guest memory, MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Longest command line a caller may give: the guest's buffer less room for what the VMM
/// appends itself (platform parameters, one `virtio_mmio.device=` per device).
pub const MAX_CMDLINE: usize = CMDLINE_MAX_SIZE - 4096;
/// Most virtio devices (disks, NICs, rng, vsock together): the MMIO slots with a GSI each.
pub const MAX_VIRTIO_DEVICES: usize = VIRTIO_SLOTS as usize;
/// Command line used when none is given: serial console, i8042 reboot (our VM exit), and a
/// panicking kernel reboots at once instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Where the control socket goes and who the VMM says it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// VM id.
    pub id: String,
    /// Launch token: proves to the agent that this process is the VMM it started.
    pub token: String,
}

fn yes() -> bool {
    true
}

/// Whether `s` can name a network interface: the kernel's rules (at most IFNAMSIZ - 1 = 15
/// bytes, no '/', ':' or whitespace, not `.` or `..`), narrowed to printable ASCII so a name
/// means the same to every tool.
pub fn tap_name_ok(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Whether a kernel command line has only the characters the boot code writes: printable
/// ASCII, space to `~` (linux-loader refuses anything else, tabs and newlines included). The
/// agent checks a spec with this at create, so a VM that could never start is never made.
pub fn cmdline_chars_ok(s: &str) -> bool {
    s.bytes().all(|b| (b' '..=b'~').contains(&b))
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_false(b: &bool) -> bool {
    !b
}

/// Everything needed to build one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image (ELF or bzImage).
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line as given by the caller.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// CPU template.
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    /// Add the platform's kernel parameters (PVM) to the command line.
    #[serde(default = "yes")]
    pub platform_params: bool,
    /// Give the guest an i8254 PIT (old guests without a LAPIC timer or kvm-clock need one).
    #[serde(default, skip_serializing_if = "is_false")]
    pub legacy_pit: bool,
    /// Console destination.
    pub console: ConsoleConfig,
    /// Whether stdin feeds the console (stdio console only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin: bool,
    /// virtio-blk disks, in slot order (the first is /dev/vda).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs on TAP devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicConfig>,
    /// Attach a virtio-rng.
    #[serde(default, skip_serializing_if = "is_false")]
    pub rng: bool,
    /// Attach a virtio-vsock bridged to Unix sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Serve a control socket (pause, resume, shutdown, info) while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlConfig>,
    /// What the SMBIOS tables say of the VM (serial number, UUID, asset tag).
    #[serde(default, skip_serializing_if = "is_default")]
    pub smbios: SmbiosIdentity,
}

/// A refused field of a [`VmConfig`]: its path (`disks[0].path`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn check_file(field: &str, p: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::new(
            field,
            format!("{} is not a regular file", p.display()),
        )),
        Err(e) => Err(ConfigError::new(field, format!("{}: {e}", p.display()))),
    }
}

impl VmConfig {
    /// A config with the defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            vcpus: 1,
            memory_mib: 128,
            cpu_template: CpuTemplate::Host,
            platform_params: true,
            legacy_pit: false,
            console: ConsoleConfig::Stdio,
            stdin: false,
            disks: Vec::new(),
            nics: Vec::new(),
            rng: false,
            vsock: None,
            control: None,
            smbios: SmbiosIdentity::default(),
        }
    }

    /// Checks every bound and that the files exist; the first problem found is returned,
    /// naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(true)
    }

    /// [`Self::validate`] for a VM restored from a snapshot, which reads no kernel or initrd.
    pub fn validate_restored(&self) -> Result<(), ConfigError> {
        self.check(false)
    }

    /// Checks that each local disk of `disks` is a regular file, naming the field: what a
    /// restore does before it opens them (and its jail, after which it cannot look again).
    pub fn check_disk_files(disks: &[DiskConfig]) -> Result<(), ConfigError> {
        for (i, d) in disks.iter().enumerate() {
            if !d.is_remote() {
                check_file(&format!("disks[{i}].path"), &d.path)?;
            }
        }
        Ok(())
    }

    fn check(&self, boot: bool) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::new(
                "vcpus",
                format!("{} is out of range 1-{MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::new(
                "memory_mib",
                format!(
                    "{} MiB is out of range {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if self.cmdline.len() > MAX_CMDLINE || !cmdline_chars_ok(&self.cmdline) {
            return Err(ConfigError::new(
                "cmdline",
                format!("must be at most {MAX_CMDLINE} printable ASCII characters (space to '~')"),
            ));
        }
        if boot {
            check_file("kernel", &self.kernel)?;
            if let Some(p) = &self.initrd {
                check_file("initrd", p)?;
            }
        }
        let devices = self.disks.len()
            + self.nics.len()
            + usize::from(self.rng)
            + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::new(
                "disks",
                format!("{devices} virtio devices requested; at most {MAX_VIRTIO_DEVICES} fit"),
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            d.check()
                .map_err(|(f, m)| ConfigError::new(format!("disks[{i}].{f}"), m))?;
            // A restore's disks were checked as they were opened (before its jail).
            if boot && !d.is_remote() {
                check_file(&format!("disks[{i}].path"), &d.path)?;
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            if !tap_name_ok(&n.tap) {
                return Err(ConfigError::new(
                    format!("nics[{i}].tap"),
                    "must be an interface name: 1-15 bytes of printable ASCII without space, '/' or ':', not '.' or '..'",
                ));
            }
            if n.mac[0] & 1 != 0 {
                return Err(ConfigError::new(
                    format!("nics[{i}].mac"),
                    "must be a unicast address",
                ));
            }
            for (name, l) in [
                ("rx_rate_limit", &n.rx_rate_limit),
                ("tx_rate_limit", &n.tx_rate_limit),
            ] {
                if let Some(l) = l {
                    l.check()
                        .map_err(|(f, m)| ConfigError::new(format!("nics[{i}].{name}.{f}"), m))?;
                }
            }
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid == u32::MAX {
                return Err(ConfigError::new("vsock.cid", "must be 3 or more"));
            }
            if v.uds.as_os_str().is_empty() {
                return Err(ConfigError::new("vsock.uds", "must be a socket path"));
            }
        }
        for (field, s) in [
            ("smbios.serial", &self.smbios.serial),
            ("smbios.asset_tag", &self.smbios.asset_tag),
        ] {
            if s.as_deref().is_some_and(|s| !smbios::valid_string(s)) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "must be 1-{} printable ASCII characters",
                        smbios::MAX_STRING
                    ),
                ));
            }
        }
        if let Some(c) = &self.control {
            if c.id.is_empty() || c.token.is_empty() {
                return Err(ConfigError::new(
                    "control",
                    "needs a VM id and a launch token",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig::new("/proc/self/exe")
    }

    #[test]
    fn defaults_validate_and_every_bound_names_its_field() {
        config().validate().unwrap();
        let field = |f: fn(&mut VmConfig)| {
            let mut c = config();
            f(&mut c);
            c.validate().unwrap_err().field
        };
        assert_eq!(field(|c| c.vcpus = 0), "vcpus");
        assert_eq!(field(|c| c.vcpus = MAX_VCPUS + 1), "vcpus");
        assert_eq!(field(|c| c.memory_mib = 15), "memory_mib");
        assert_eq!(field(|c| c.memory_mib = MAX_MEMORY_MIB + 1), "memory_mib");
        assert_eq!(field(|c| c.cmdline = "a\0b".into()), "cmdline");
        assert_eq!(field(|c| c.kernel = "/nonexistent".into()), "kernel");
        assert_eq!(field(|c| c.initrd = Some("/".into())), "initrd");
        assert_eq!(
            field(|c| c.disks = vec![DiskConfig::default(); MAX_VIRTIO_DEVICES + 1]),
            "disks"
        );
        assert_eq!(
            field(|c| c.disks = vec!["/nonexistent".parse().unwrap()]),
            "disks[0].path"
        );
        assert_eq!(
            field(|c| c.nics = vec!["tap=a-very-long-tap-name".parse().unwrap()]),
            "nics[0].tap"
        );
        assert_eq!(
            field(|c| {
                c.vsock = Some(VsockConfig {
                    cid: 2,
                    uds: "/x".into(),
                })
            }),
            "vsock.cid"
        );
    }

    #[test]
    fn the_launch_form_round_trips_and_refuses_unknown_fields() {
        let mut c = config();
        c.disks.push("/dev/null,ro,serial=x".parse().unwrap());
        c.nics.push("tap=t0,mac=02:00:00:00:00:01".parse().unwrap());
        c.vsock = Some("cid=9,uds=/run/v.sock".parse().unwrap());
        c.console = ConsoleConfig::SocketWithLog {
            socket: "/s".into(),
            log: "/l".into(),
        };
        c.cpu_template = CpuTemplate::X86_64V2;
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), c);
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["colour"] = "red".into();
        assert!(serde_json::from_value::<VmConfig>(v).is_err());
        // The smallest document: defaults fill in the rest.
        let min: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","cmdline":"","vcpus":1,"memory_mib":64,"console":{"kind":"none"}}"#,
        )
        .unwrap();
        assert!(min.platform_params);
        assert_eq!(min.cpu_template, CpuTemplate::Host);
    }
}
