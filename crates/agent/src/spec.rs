//! The VM spec (what the scheduler asks for) and the VM record (spec + observed status) the
//! agent persists. Validation lives here too: every check names the field it refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::segment::NicState;
use super::store::layout;
use crate::wire::wire_enum;
use bexar_devices::block::{DiskConfig, DiskFormat};
use bexar_devices::rate_limiter::RateLimitConfig;
use bexar_devices::virtio::net::{parse_mac, NicConfig};
use bexar_devices::virtio::vsock::VsockConfig;
use bexar_vmm::boot::smbios::SmbiosIdentity;
use bexar_vmm::config::{ConfigError, ConsoleConfig, ControlConfig};
use bexar_vmm::cpuid::CpuTemplate;
use bexar_vmm::VmConfig;

/// A virtio-blk disk: a host file (`path`, raw or qcow2, probed unless `format` says), or a
/// copy-on-write overlay the agent makes for this VM on a registered image (`image`). The
/// options are the VMM's own (`bexar run --disk` takes the same).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Image file (absolute path). Exactly one of `path`, `image`, `nbd` and `iscsi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A registered image (`/v1/images`): the VM gets its own qcow2 overlay on it, made at
    /// create and removed at delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A disk on an NBD server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<bexar_devices::block::nbd::NbdTarget>,
    /// A disk on an iSCSI target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<bexar_devices::block::iscsi::IscsiTarget>,
    /// Size of the overlay in MiB (default: the image's size; never smaller). Only with
    /// `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// Format of the file at `path`: `raw` or `qcow2` (default: probed once, at create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: bool,
    /// Serial reported to the guest, at most 20 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Rate limit (bytes and requests); changeable while the VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;
    /// `PATH[,OPTIONS]` as `bexar run --disk` takes it, or `image=ID[,size=MIB][,OPTIONS]`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("image=") {
            let mut parts = rest.split(',');
            let image = parts
                .next()
                .filter(|i| !i.is_empty())
                .ok_or("empty image id")?;
            let mut spec = DiskSpec {
                image: Some(image.to_owned()),
                ..Default::default()
            };
            let mut vmm_opts = Vec::new();
            for opt in parts {
                match opt.split_once('=') {
                    Some(("size", v)) => {
                        spec.size_mib = Some(
                            v.parse()
                                .map_err(|_| format!("size={v}: not a number of MiB"))?,
                        )
                    }
                    Some(("format", _)) => {
                        return Err(
                            "format is the image's own; give it when registering the image".into(),
                        )
                    }
                    _ => vmm_opts.push(opt),
                }
            }
            // The other options are the VMM's; parse them on a stand-in path.
            let c: DiskConfig = std::iter::once("/")
                .chain(vmm_opts)
                .collect::<Vec<_>>()
                .join(",")
                .parse()?;
            spec.read_only = c.read_only;
            spec.direct = c.direct;
            spec.serial = c.serial;
            spec.rate_limit = c.rate_limit;
            return Ok(spec);
        }
        let c: DiskConfig = s.parse()?;
        Ok(DiskSpec {
            path: (!c.is_remote()).then_some(c.path),
            nbd: c.nbd,
            iscsi: c.iscsi,
            format: c.format,
            read_only: c.read_only,
            direct: c.direct,
            serial: c.serial,
            rate_limit: c.rate_limit,
            ..Default::default()
        })
    }
}

impl DiskSpec {
    /// Whether the disk is on a network server (NBD or iSCSI).
    pub fn is_remote(&self) -> bool {
        self.nbd.is_some() || self.iscsi.is_some()
    }

    /// The remote target's URL (no credentials), or `None` for a local disk.
    pub fn remote_url(&self) -> Option<String> {
        match (&self.nbd, &self.iscsi) {
            (Some(t), _) => Some(t.url()),
            (_, Some(t)) => Some(t.url()),
            _ => None,
        }
    }

    /// The VMM's description of this disk, on the file `path` in `format`, limited by
    /// `rate_limit`.
    pub fn config(
        &self,
        path: PathBuf,
        format: Option<DiskFormat>,
        rate_limit: Option<RateLimitConfig>,
    ) -> DiskConfig {
        DiskConfig {
            path,
            nbd: self.nbd.clone(),
            iscsi: self.iscsi.clone(),
            format,
            read_only: self.read_only,
            direct: self.direct,
            serial: self.serial.clone(),
            rate_limit,
            backing: None,
        }
    }
}

/// A disk as the agent resolved it at create: the file the VMM opens and its format (probed
/// once, so that a guest writing a qcow2 header into its raw disk changes nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// The file: the spec's `path`, or the VM's overlay (empty for a remote disk).
    #[serde(default)]
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Its size in bytes, as the guest sees it.
    pub size: u64,
    /// Its rate limit now (the spec's, or as changed since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// For a remote disk of a running VM: its connection as last seen, `up`, `reconnecting`
    /// or `failing` (the guest's requests fail with I/O errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// For a writable qcow2 disk: what it was made over (an image's blob, or what the spec's
    /// image named, or none). Every VMM refuses the disk if its header says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<bexar_devices::block::BackingPin>,
}

/// The overlay file of disk `index` of a VM, in the VM's directory.
pub fn overlay_name(index: usize) -> String {
    format!("disk{index}.qcow2")
}

/// A refused field: its path in the request body and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Dotted path of the field (`disks[0].path`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// How the guest is booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// Kernel image on the host (absolute path): ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initramfs (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the default is a serial console and reboot-on-panic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// A virtio-net NIC: on a segment (the agent creates, wires and filters its TAP) or on an
/// existing caller-managed TAP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Segment to connect to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    /// Existing TAP interface to attach to instead of a segment (no filtering, no addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// MAC address (default: derived from the VM id, or from the TAP name for `tap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// IPv4 address on the segment (default: allocated from its subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// IPv6 address on the segment (default: the SLAAC address of the MAC in its prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// Rate limit on frames to the guest (bytes and frames); changeable while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limit: Option<RateLimitConfig>,
    /// Rate limit on frames from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limit: Option<RateLimitConfig>,
}

/// A virtio-vsock device; its host side is the `vsock.sock` socket in the VM's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// Guest context id (3 or more).
    pub cid: u32,
}

wire_enum! {
    /// Whether the metadata service's EC2 tree needs an IMDSv2 session token (EC2's
    /// `HttpTokens`).
    #[derive(Default)]
    pub enum TokenPolicy {
        /// Requests with a valid token and requests with none are answered (IMDSv1 and v2);
        /// a request with an invalid or expired token is refused. The default: cloud-init
        /// asks for a token only on guests it identifies as AWS, so stock images need this.
        #[default]
        Optional = "optional",
        /// Every EC2 request needs a valid token (IMDSv2 only).
        Required = "required",
    }
}

wire_enum! {
    /// What happens when a VM's guest or VMM ends without being asked to.
    #[derive(Default)]
    pub enum RestartPolicy {
        /// Leave it stopped or failed.
        #[default]
        No = "no",
        /// Restart it if it failed (VMM died, guest crashed, triple fault...), with back-off.
        OnFailure = "on-failure",
        /// Restart it whenever it ends, with back-off.
        Always = "always",
    }
}

/// Everything the scheduler says about a VM. Immutable once created: a create with the same id
/// and an equal spec is a no-op, a different one is a conflict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Caller-chosen id: 1-63 of `[a-z0-9_.-]`, starting with a letter or digit.
    pub id: String,
    /// vCPUs (1-32).
    pub vcpus: u8,
    /// Guest memory in MiB (16-1048576).
    pub memory_mib: u64,
    /// CPU template: `host` or `x86-64-v2` (alias `baseline`).
    #[serde(default = "default_template")]
    pub cpu_template: String,
    /// Kernel, initramfs and command line.
    pub boot: BootSpec,
    /// Disks, in order (the first is /dev/vda).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// NICs.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Attach a virtio-rng.
    #[serde(default)]
    pub rng: bool,
    /// Attach a virtio-vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSpec>,
    /// Free-form labels for selection (`bexar vm ls -l key=value`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Restart policy.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// The VM's UUID, as the guest reads it from SMBIOS (a scheduler passes its own instance
    /// UUID here). Default: a random one chosen at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
    /// Start from a snapshot instead of booting: the first start restores it (later starts
    /// boot the kernel). The snapshot's vCPUs, memory and devices must match this spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
}

/// Where a VM's snapshot comes from: a snapshot of a VM on this host (`vm` and `snapshot`), or
/// a snapshot directory copied from elsewhere (`path`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    /// The VM whose snapshot it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The snapshot's name under that VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// An absolute path to a snapshot directory (`vm.state` and `memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

impl RestoreSpec {
    /// Checks that it names a snapshot one way: `vm` with `snapshot`, or `path`.
    pub fn validate(&self) -> Result<(), FieldError> {
        match (&self.vm, &self.snapshot, &self.path) {
            (Some(vm), Some(name), None) => {
                if !valid_id(vm) {
                    return Err(FieldError::new("restore.vm", "is not a valid VM id"));
                }
                if !valid_id(name) {
                    return Err(FieldError::new(
                        "restore.snapshot",
                        "is not a valid snapshot name",
                    ));
                }
                Ok(())
            }
            (None, None, Some(p)) => {
                if p.is_absolute() {
                    Ok(())
                } else {
                    Err(FieldError::new("restore.path", "must be an absolute path"))
                }
            }
            _ => Err(FieldError::new(
                "restore",
                "give either vm and snapshot, or path",
            )),
        }
    }
}

/// The CPU template a spec gets when it names none.
pub fn default_template() -> String {
    "host".into()
}

/// Most labels per VM.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 253;
/// Most disks or NICs per VM (the virtio slots hold 19 devices in all).
pub const MAX_DEVICES: usize = 16;
/// Largest overlay a disk spec may ask for (64 TiB, qcow2's practical limit with 64 KiB
/// clusters is far beyond; this bounds a typo).
pub const MAX_DISK_MIB: u64 = 64 << 20;
/// Longest command line accepted.
pub const MAX_CMDLINE: usize = 2048;

/// Whether `id` is a valid VM id (also used for path segments, so it must stay this strict).
pub fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        })
}

/// The agent launches VMMs from their own directory: a relative path would mean nothing.
fn absolute(field: &str, p: &Path) -> Result<(), FieldError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(FieldError::new(field, "must be an absolute path"))
    }
}

impl VmSpec {
    /// Checks every field; the first problem found is returned, naming its field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if !valid_id(&self.id) {
            return Err(FieldError::new(
                "id",
                "must be 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit",
            ));
        }
        CpuTemplate::from_name(&self.cpu_template)
            .map_err(|e| FieldError::new("cpu_template", e.to_string()))?;
        if let Some(r) = &self.restore {
            r.validate()?;
            // The snapshot's memory remembers its disks as they were; an overlay made now on
            // the image would not be that disk (snapshots do not copy overlays yet).
            if self.disks.iter().any(|d| d.image.is_some()) {
                return Err(FieldError::new(
                    "restore",
                    "a VM whose disks are made from images cannot start from a snapshot yet: snapshots do not copy the overlays, and a new overlay would not be the disk the snapshot's memory remembers",
                ));
            }
        }
        absolute("boot.kernel", &self.boot.kernel)?;
        if let Some(p) = &self.boot.initrd {
            absolute("boot.initrd", p)?;
        }
        if let Some(c) = &self.boot.cmdline {
            if c.len() > MAX_CMDLINE || !bexar_vmm::config::cmdline_chars_ok(c) {
                return Err(FieldError::new(
                    "boot.cmdline",
                    format!(
                        "must be at most {MAX_CMDLINE} printable ASCII characters (space to '~')"
                    ),
                ));
            }
        }
        if self.disks.len() > MAX_DEVICES {
            return Err(FieldError::new(
                "disks",
                format!("at most {MAX_DEVICES} disks"),
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            let given = [
                d.path.is_some(),
                d.image.is_some(),
                d.nbd.is_some(),
                d.iscsi.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(FieldError::new(
                    format!("disks[{i}].path"),
                    "give exactly one of path, image, nbd and iscsi",
                ));
            }
            if d.size_mib.is_some() && d.image.is_none() {
                return Err(FieldError::new(
                    format!("disks[{i}].size_mib"),
                    "only a disk made from an image has a size to choose",
                ));
            }
            if let Some(p) = &d.path {
                absolute(&format!("disks[{i}].path"), p)?;
            }
            if let Some(img) = &d.image {
                if !valid_id(img) {
                    return Err(FieldError::new(
                        format!("disks[{i}].image"),
                        format!("{img:?} is not a valid image id"),
                    ));
                }
                if d.format.is_some() {
                    return Err(FieldError::new(
                        format!("disks[{i}].format"),
                        "a disk made from an image is a qcow2 overlay; the format is not chosen",
                    ));
                }
                if d.size_mib == Some(0) || d.size_mib.is_some_and(|m| m > MAX_DISK_MIB) {
                    return Err(FieldError::new(
                        format!("disks[{i}].size_mib"),
                        format!("must be 1-{MAX_DISK_MIB}"),
                    ));
                }
            }
        }
        if self.nics.len() > MAX_DEVICES {
            return Err(FieldError::new(
                "nics",
                format!("at most {MAX_DEVICES} NICs"),
            ));
        }
        for (i, n) in self.nics.iter().enumerate() {
            match (&n.segment, &n.tap) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(FieldError::new(
                        format!("nics[{i}].segment"),
                        "give exactly one of segment and tap",
                    ))
                }
                (Some(s), None) if !valid_id(s) => {
                    return Err(FieldError::new(
                        format!("nics[{i}].segment"),
                        format!("{s:?} is not a valid segment id"),
                    ))
                }
                (None, Some(_)) if n.ipv4.is_some() || n.ipv6.is_some() => {
                    return Err(FieldError::new(
                        format!("nics[{i}].ipv4"),
                        "addresses are managed only for NICs on a segment",
                    ))
                }
                _ => {}
            }
            if let Some(m) = &n.mac {
                if parse_mac(m).is_none() {
                    return Err(FieldError::new(
                        format!("nics[{i}].mac"),
                        format!("{m:?} is not a unicast MAC address aa:bb:cc:dd:ee:ff"),
                    ));
                }
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(FieldError::new(
                "labels",
                format!("at most {MAX_LABELS} labels"),
            ));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
                return Err(FieldError::new(
                    format!("labels.{k}"),
                    format!(
                        "keys must be 1-{MAX_LABEL_LEN} bytes and values at most {MAX_LABEL_LEN}"
                    ),
                ));
            }
            if k.contains(['=', ',']) {
                return Err(FieldError::new(
                    format!("labels.{k}"),
                    "keys may not contain '=' or ','",
                ));
            }
        }
        // Everything the VMM bounds (vCPUs, memory, files, disks, device slots, tap names,
        // vsock CID), by the VMM's own rules: NICs on segments stand in with a placeholder
        // until the agent resolves them.
        let nics = self
            .nics
            .iter()
            .map(|n| NicConfig {
                tap: n.tap.clone().unwrap_or_else(|| "bxt-unresolved".into()),
                mac: n
                    .mac
                    .as_deref()
                    .and_then(parse_mac)
                    .unwrap_or([2, 0, 0, 0, 0, 1]),
                rx_rate_limit: n.rx_rate_limit,
                tx_rate_limit: n.tx_rate_limit,
                addresses: Vec::new(),
            })
            .collect();
        // Disks made from images have no file until the agent makes their overlays: this
        // program's own file (always a regular file) stands in, so that the VMM's rules check
        // the rest of the disk (serial, slot count) now.
        let stand_in = std::env::current_exe().unwrap_or_else(|_| self.boot.kernel.clone());
        let disks = self
            .disks
            .iter()
            .map(|d| match &d.path {
                Some(p) => d.config(p.clone(), d.format, d.rate_limit),
                None if d.is_remote() => d.config(PathBuf::new(), d.format, d.rate_limit),
                None => d.config(stand_in.clone(), Some(DiskFormat::Raw), d.rate_limit),
            })
            .collect();
        self.config_with(
            Path::new("/"),
            "unlaunched",
            disks,
            nics,
            None,
            SmbiosIdentity::default(),
        )
        .map(drop)
    }

    /// The VMM configuration for this spec, with the VM's files under `dir`, its NICs as
    /// resolved by the agent and `cmdline_extra` appended to the command line. Checked by the
    /// VMM's own rules; a refusal names the spec's field.
    pub fn vm_config(
        &self,
        dir: &Path,
        token: &str,
        disks: &[DiskState],
        nics: &[NicState],
        cmdline_extra: Option<&str>,
        smbios: SmbiosIdentity,
    ) -> Result<VmConfig, FieldError> {
        // Records from before disks were resolved at create have none: their paths, probed.
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| match disks.get(i) {
                Some(s) if d.is_remote() => d.config(PathBuf::new(), None, s.rate_limit),
                Some(s) => DiskConfig {
                    backing: s.backing.clone(),
                    ..d.config(s.path.clone(), Some(s.format), s.rate_limit)
                },
                None if d.is_remote() => d.config(PathBuf::new(), None, d.rate_limit),
                None => d.config(
                    d.path.clone().unwrap_or_else(|| dir.join(overlay_name(i))),
                    d.format,
                    d.rate_limit,
                ),
            })
            .collect();
        let nics = nics
            .iter()
            .map(|n| NicConfig {
                tap: n.tap.clone(),
                mac: n.mac_bytes(),
                rx_rate_limit: n.rx_rate_limit,
                tx_rate_limit: n.tx_rate_limit,
                // Announced after a migration (the VMM's state carries them along).
                addresses: n
                    .ipv4
                    .map(std::net::IpAddr::V4)
                    .into_iter()
                    .chain(n.ipv6.map(std::net::IpAddr::V6))
                    .collect(),
            })
            .collect();
        self.config_with(dir, token, disks, nics, cmdline_extra, smbios)
    }

    fn config_with(
        &self,
        dir: &Path,
        token: &str,
        disks: Vec<DiskConfig>,
        nics: Vec<NicConfig>,
        cmdline_extra: Option<&str>,
        smbios: SmbiosIdentity,
    ) -> Result<VmConfig, FieldError> {
        let cpu_template = CpuTemplate::from_name(&self.cpu_template)
            .map_err(|e| FieldError::new("cpu_template", e.to_string()))?;
        let base = self
            .boot
            .cmdline
            .clone()
            .unwrap_or_else(|| bexar_vmm::DEFAULT_CMDLINE.to_owned());
        let config = VmConfig {
            kernel: self.boot.kernel.clone(),
            initrd: self.boot.initrd.clone(),
            cmdline: match cmdline_extra {
                Some(x) => format!("{base} {x}"),
                None => base,
            },
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            cpu_template,
            platform_params: true,
            legacy_pit: false,
            console: ConsoleConfig::SocketWithLog {
                socket: dir.join(layout::CONSOLE_SOCKET),
                log: dir.join(layout::CONSOLE_LOG),
            },
            stdin: false,
            disks,
            nics,
            rng: self.rng,
            vsock: self.vsock.as_ref().map(|v| VsockConfig {
                cid: v.cid,
                uds: dir.join(layout::VSOCK_SOCKET),
            }),
            control: Some(ControlConfig {
                socket: dir.join(layout::CONTROL_SOCKET),
                id: self.id.clone(),
                token: token.to_owned(),
            }),
            smbios,
        };
        config.validate().map_err(spec_field)?;
        Ok(config)
    }

    /// Whether every `key=value` in `selector` (comma-separated; `key` alone tests presence)
    /// matches this VM's labels.
    pub fn matches(&self, selector: &str) -> bool {
        selector
            .split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => self.labels.get(k).map(String::as_str) == Some(v),
                None => self.labels.contains_key(term),
            })
    }
}

/// A refusal of the VMM's rules, named by the spec's field.
fn spec_field(e: ConfigError) -> FieldError {
    let field = match e.field.as_str() {
        "kernel" => "boot.kernel".to_owned(),
        "initrd" => "boot.initrd".to_owned(),
        "cmdline" => "boot.cmdline".to_owned(),
        f => f.to_owned(),
    };
    FieldError::new(field, e.message)
}

wire_enum! {
    /// Lifecycle phase of a VM, as the agent observes it.
    pub enum Phase {
        /// Being defined (only seen if the agent died mid-create).
        Creating = "creating",
        /// Defined, not running.
        Stopped = "stopped",
        /// Its VMM runs the guest.
        Running = "running",
        /// Its VMM runs, vCPUs parked.
        Paused = "paused",
        /// It ended unexpectedly (see `exit_reason`).
        Failed = "failed",
        /// Being deleted.
        Deleting = "deleting",
    }
}

impl Phase {
    /// Whether a VMM process is expected to exist.
    pub fn has_vmm(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// What the agent has seen of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VmStatus {
    /// VMM process id while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The VMM's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid,
    /// identifies the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start_ticks: Option<u64>,
    /// Token of the current (or last) VMM launch.
    #[serde(default)]
    pub token: String,
    /// While a live upgrade is under way: the token of the VMM handing the VM over (after an
    /// agent crash, whichever of the two VMMs holds the VM is adopted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<String>,
    /// Why it last ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
    /// Restarts done by the restart policy since the VM was last started by request.
    #[serde(default)]
    pub restarts: u32,
    /// Unix time (ms) of creation, last start, last stop and last change.
    pub created_ms: u64,
    /// Last start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Last end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_ms: Option<u64>,
    /// Last change of any kind.
    pub updated_ms: u64,
}

wire_enum! {
    /// What an operation does.
    pub enum OperationKind {
        /// Start on request.
        Start = "start",
        /// Stop.
        Stop = "stop",
        /// Stop, then start.
        Reboot = "reboot",
        /// Pause.
        Pause = "pause",
        /// Resume.
        Resume = "resume",
        /// Delete.
        Delete = "delete",
        /// Start again by the restart policy.
        Restart = "restart",
        /// A new agent adopted the VM's VMM and is settling its state with it (the VMM has not
        /// answered yet, or what was asked of it before the agent restarted is being finished).
        Recover = "recover",
        /// Snapshot.
        Snapshot = "snapshot",
        /// Hand the VM to a new VMM process (live upgrade).
        Upgrade = "upgrade",
        /// Move the VM to another host (live migration; this host sends it).
        Migrate = "migrate",
        /// Take a VM another host is migrating here (this host receives it).
        Incoming = "incoming",
    }
}

/// An operation the agent was carrying out on a VM when the record was written. After a crash,
/// the agent finishes or rolls back what it finds here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// What it does.
    pub kind: OperationKind,
    /// Unix time (ms) it began.
    pub started_ms: u64,
    /// A `migrate` operation's last progress report (round, bytes, rates, expected pause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<bexar_vmm::migration::MigrationProgress>,
    /// A `migrate` operation's destination (`HOST:PORT`): who to ask, after a crash or an
    /// answer that never came, whether the VM runs there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// A `stop` or `reboot` operation's grace (ms) before the VMM is killed, as the caller
    /// asked (0: forced): an agent that finishes the operation after a crash keeps to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Desired power state, from the last action the caller asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Desired {
    /// Keep it stopped.
    #[default]
    Stopped,
    /// Keep it running.
    Running,
    /// Keep it paused.
    Paused,
}

/// A VM as persisted (one file per VM) and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM id (same as `spec.id`).
    pub id: String,
    /// Current phase (the API's `state`).
    pub state: Phase,
    /// The spec as created.
    pub spec: VmSpec,
    /// Bumped on every change of the desired state.
    pub generation: u64,
    /// Desired power state.
    pub desired: Desired,
    /// Observed status.
    pub status: VmStatus,
    /// Operation in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    /// The NICs as wired: MACs, addresses and TAPs chosen at create time.
    #[serde(default)]
    pub nics: Vec<NicState>,
    /// The disks as resolved at create (files and formats), in spec order.
    #[serde(default)]
    pub disks: Vec<DiskState>,
    /// What the metadata service tells the guest (`PUT /v1/vms/{id}/metadata`).
    #[serde(default)]
    pub metadata: VmMetadata,
    /// The VM's UUID (`spec.uuid`, or chosen at create): its SMBIOS system UUID. Records
    /// from before it existed get one when loaded.
    #[serde(default = "uuid::Uuid::new_v4")]
    pub uuid: uuid::Uuid,
    /// The VM was created from a snapshot that its next start restores (cleared once a
    /// restore has run).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore_pending: bool,
}

/// Metadata a guest reads from the instance metadata service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmMetadata {
    /// Host name (default: the VM id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// User data (cloud-init's `#cloud-config`, a script...), at most 32 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Vendor data for cloud-init, at most 32 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<String>,
    /// SSH public keys (OpenSSH one-line format).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_keys: Vec<String>,
    /// Free-form key/value facts, served under `meta-data/tags/instance/`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Whether the EC2 tree needs a session token.
    #[serde(default, skip_serializing_if = "is_default")]
    pub http_tokens: TokenPolicy,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Largest user or vendor data.
pub const MAX_USER_DATA: usize = 32 << 10;

impl VmMetadata {
    /// Checks sizes and characters; names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 63
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !h.starts_with('-');
            if !ok {
                return Err(FieldError::new(
                    "hostname",
                    "must be 1-63 letters, digits or '-', not starting with '-'",
                ));
            }
        }
        for (f, v) in [
            ("user_data", &self.user_data),
            ("vendor_data", &self.vendor_data),
        ] {
            if v.as_ref().is_some_and(|d| d.len() > MAX_USER_DATA) {
                return Err(FieldError::new(f, format!("at most {MAX_USER_DATA} bytes")));
            }
        }
        if self.public_keys.len() > 64 {
            return Err(FieldError::new("public_keys", "at most 64 keys"));
        }
        for (i, k) in self.public_keys.iter().enumerate() {
            if k.is_empty() || k.len() > 16384 || k.contains(['\n', '\r', '\0']) {
                return Err(FieldError::new(
                    format!("public_keys[{i}]"),
                    "must be one line of at most 16 KiB",
                ));
            }
        }
        if self.tags.len() > MAX_LABELS {
            return Err(FieldError::new(
                "tags",
                format!("at most {MAX_LABELS} tags"),
            ));
        }
        for (k, v) in &self.tags {
            let ok = !k.is_empty()
                && k.len() <= MAX_LABEL_LEN
                && v.len() <= MAX_LABEL_LEN
                && !k.contains(['/', '\n', '\0'])
                && !v.contains(['\n', '\0']);
            if !ok {
                return Err(FieldError::new(
                    format!("tags.{k}"),
                    "keys are 1-253 bytes without '/', values at most 253 bytes, one line each",
                ));
            }
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "id": "vm-1", "vcpus": 1, "memory_mib": 64,
            "boot": {"kernel": "/proc/self/exe"}
        }))
        .unwrap()
    }

    #[test]
    fn ids_are_strict() {
        for ok in ["a", "vm-1", "x.y_z", "0abc"] {
            assert!(valid_id(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "-a", "A", "a/b", "..", ".a", "a b", long.as_str()] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(s.validate().unwrap_err().field, "vcpus");
        let mut s = spec();
        s.boot.kernel = "relative".into();
        assert_eq!(s.validate().unwrap_err().field, "boot.kernel");
        let mut s = spec();
        s.nics.push(NicSpec {
            tap: Some("tap0".into()),
            mac: Some("zz".into()),
            ..Default::default()
        });
        assert_eq!(s.validate().unwrap_err().field, "nics[0].mac");
        let mut s = spec();
        s.nics.push(NicSpec {
            tap: Some("tap0".into()),
            segment: Some("a".into()),
            ..Default::default()
        });
        assert_eq!(s.validate().unwrap_err().field, "nics[0].segment");
        let mut s = spec();
        s.cpu_template = "pentium".into();
        assert_eq!(s.validate().unwrap_err().field, "cpu_template");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_value::<VmSpec>(serde_json::json!({
            "id": "a", "vcpus": 1, "memory_mib": 64, "boot": {"kernel": "/k"}, "colour": "red"
        }))
        .unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn label_selectors() {
        let mut s = spec();
        s.labels.insert("team".into(), "a".into());
        s.labels.insert("tier".into(), "web".into());
        assert!(s.matches("team=a"));
        assert!(s.matches("team=a,tier"));
        assert!(s.matches(""));
        assert!(!s.matches("team=b"));
        assert!(!s.matches("zone"));
    }
}
