//! What the host is and what it can still take: the facts a scheduler places VMs from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::spec::{DiskState, VmSpec};
use bexar_vmm::platform::Platform;

/// How much of the host the agent may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CapacityConfig {
    /// Host CPUs kept for the host itself.
    pub reserved_vcpus: u32,
    /// vCPUs per host CPU.
    pub cpu_allocation_ratio: f64,
    /// Memory kept for the host itself (MiB).
    pub reserved_memory_mib: u64,
    /// Guest memory per MiB of host memory.
    pub memory_allocation_ratio: f64,
    /// Disk space of the state directory's file system kept for the host (MiB).
    #[serde(default)]
    pub reserved_disk_mib: u64,
    /// Disk MiB that may be provisioned per MiB of that file system (overlays are thin: they
    /// grow as guests write, up to their size).
    #[serde(default = "one")]
    pub disk_allocation_ratio: f64,
    /// Host memory each VM costs beyond its guest memory (its VMM, the kernel's page tables and
    /// KVM state), MiB, counted in memory allocation.
    #[serde(default = "vm_overhead")]
    pub vm_overhead_mib: u64,
}

/// What an idle VM costs the host beyond the guest memory it touches, measured by the scale
/// benchmark on this machine: 1.1 MiB (VMM 0.3, slab 0.3, page tables 0.08, the rest kernel
/// state), rounded up for a guest that touches all its memory (page tables grow with it).
pub const VM_OVERHEAD_MIB: u64 = 2;

fn vm_overhead() -> u64 {
    VM_OVERHEAD_MIB
}

fn one() -> f64 {
    1.0
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            reserved_vcpus: 0,
            cpu_allocation_ratio: 16.0,
            reserved_memory_mib: 512,
            memory_allocation_ratio: 1.0,
            reserved_disk_mib: 0,
            disk_allocation_ratio: 1.0,
            vm_overhead_mib: VM_OVERHEAD_MIB,
        }
    }
}

/// Static facts about the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name.
    pub hostname: String,
    /// Bexar's version.
    pub version: String,
    /// Host kernel release.
    pub kernel: String,
    /// CPU model name.
    pub cpu_model: String,
    /// KVM: `hardware` (VT-x/AMD-V) or `pvm`, and its API version.
    pub kvm: KvmInfo,
    /// What this agent can do for a VM.
    pub capabilities: Vec<String>,
    /// CPU templates accepted in `cpu_template`.
    pub cpu_templates: Vec<String>,
    /// Where this agent takes live migrations from other hosts (`--migration-listen`), as
    /// `HOST:PORT`; `None` when it takes none. A scheduler hands it to the source host's
    /// agent as the migration's `destination` (with a wildcard address replaced by one the
    /// host's certificate names).
    pub migration_listen: Option<String>,
}

/// The KVM under /dev/kvm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmInfo {
    /// Whether /dev/kvm could be opened.
    pub available: bool,
    /// `hardware` or `pvm`.
    pub flavour: String,
    /// KVM_GET_API_VERSION.
    pub api_version: Option<i32>,
}

/// One resource's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    /// What the host has.
    pub total: u64,
    /// Kept for the host.
    pub reserved: u64,
    /// Over-commit ratio.
    pub allocation_ratio: f64,
    /// What may be allocated: (total - reserved) * ratio.
    pub capacity: u64,
    /// Allocated to defined VMs.
    pub allocated: u64,
    /// capacity - allocated.
    pub free: u64,
    /// Counted for each VM on top of what it asks (memory: its VMM's own; vCPUs: none).
    pub per_vm: u64,
}

impl Resource {
    fn new(total: u64, reserved: u64, ratio: f64, allocated: u64, per_vm: u64) -> Self {
        let capacity = (total.saturating_sub(reserved) as f64 * ratio).floor() as u64;
        Self {
            total,
            reserved,
            allocation_ratio: ratio,
            capacity,
            allocated,
            free: capacity.saturating_sub(allocated),
            per_vm,
        }
    }
}

/// Disk space of the state directory's file system, where images and overlays live.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiskSpace {
    /// Size of the file system, MiB.
    pub total_mib: u64,
    /// Space available now, MiB.
    pub available_mib: u64,
    /// Kept for the host, MiB.
    pub reserved_mib: u64,
    /// Over-commit ratio.
    pub allocation_ratio: f64,
    /// What may be provisioned: (total - reserved) * ratio.
    pub capacity_mib: u64,
    /// Provisioned: registered images, the full size of every overlay, and the files of disks
    /// given by path, MiB.
    pub allocated_mib: u64,
    /// capacity - allocated.
    pub free_mib: u64,
    /// Registered images, MiB (part of allocated).
    pub images_mib: u64,
    /// What the overlays hold now, MiB (they grow up to their size).
    pub overlays_used_mib: u64,
}

/// Descriptors the agent holds for each running VM: the VMM process's pidfd, a copy of it
/// that waits for the process's exit, and, from a jailed VMM, the VM's own descriptor (so that
/// KVM's teardown is not in the VMM's exit) and the socket it came on (open while the agent
/// holds the VM: `bexar_vmm::teardown`). Checked by tests/agent.rs
/// (`a_low_open_file_limit_is_raised_then_refuses_cleanly`).
pub const FDS_PER_VM: u64 = 4;
/// Descriptors kept free for what comes and goes: API and VMM control connections, event
/// streams, the files a create writes.
pub const FDS_RESERVED: u64 = 64;

/// The agent's open files against its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFiles {
    /// The agent's open-file limit (its soft `RLIMIT_NOFILE`, raised to the hard limit at
    /// start).
    pub limit: u64,
    /// Open now.
    pub open: u64,
    /// Held per running VM.
    pub per_vm: u64,
    /// Kept free for connections and creates.
    pub reserved: u64,
    /// VMs that can still be created and run: (limit - open - reserved) / per_vm.
    pub vms_more: u64,
}

/// The agent's open files now.
pub fn open_files() -> OpenFiles {
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    OpenFiles {
        limit,
        open,
        per_vm: FDS_PER_VM,
        reserved: FDS_RESERVED,
        vms_more: limit.saturating_sub(open + FDS_RESERVED) / FDS_PER_VM,
    }
}

/// Raises the soft open-file limit to the hard one (a unit file's `LimitNOFILE`, or what the
/// shell that started the agent allows); returns the limit before and after.
pub fn raise_open_files() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok((soft, hard.max(soft)))
}

/// The host's inventory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// vCPUs.
    pub vcpus: Resource,
    /// Memory, MiB.
    pub memory_mib: Resource,
    /// Disk.
    pub disk: DiskSpace,
    /// The agent's open files.
    pub files: OpenFiles,
}

/// Gathers the static facts once.
pub fn host_info() -> HostInfo {
    let kvm = kvm_ioctls::Kvm::new().ok();
    HostInfo {
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        cpu_model: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default(),
        kvm: KvmInfo {
            available: kvm.is_some(),
            flavour: match Platform::detect() {
                Platform::Pvm => "pvm",
                Platform::Hardware => "hardware",
            }
            .into(),
            api_version: kvm.as_ref().map(|k| k.get_api_version()),
        },
        capabilities: [
            "virtio-blk",
            "virtio-net",
            "virtio-rng",
            "virtio-vsock",
            "pause",
            "graceful-stop",
            "console-log",
            "console-attach",
            "restart-policy",
            "events",
            "metrics",
            "qcow2",
            "images",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        cpu_templates: vec!["host".into(), "x86-64-v2".into()],
        migration_listen: None,
    }
}

/// Host CPUs online.
pub fn host_cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// Host memory in MiB (MemTotal).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// Space on the file system holding `dir`.
pub fn fs_space(dir: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs fills the zeroed struct we pass; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return (0, 0);
    }
    let mib = |blocks: u64| blocks.saturating_mul(s.f_frsize) >> 20;
    (mib(s.f_blocks), mib(s.f_bavail))
}

/// MiB, rounded up.
fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// The inventory given every defined VM (its spec and its disks as resolved) and the bytes of
/// the registered images.
pub fn inventory<'a>(
    cap: &CapacityConfig,
    state_dir: &Path,
    vms: impl Iterator<Item = (&'a VmSpec, &'a [DiskState])>,
    images_bytes: u64,
) -> Inventory {
    let (mut vcpus, mut mem, mut disk, mut used) = (0u64, 0u64, mib_up(images_bytes), 0u64);
    for (s, disks) in vms {
        vcpus += u64::from(s.vcpus);
        mem += s.memory_mib + cap.vm_overhead_mib;
        for (i, d) in s.disks.iter().enumerate() {
            match (&d.image, disks.get(i)) {
                // An overlay may grow to its full size.
                (Some(_), Some(st)) => {
                    disk += mib_up(st.size);
                    used += std::fs::metadata(&st.path).map_or(0, |m| mib_up(m.len()));
                }
                _ => {
                    disk += d
                        .path
                        .as_ref()
                        .and_then(|p| std::fs::metadata(p).ok())
                        .map_or(0, |m| mib_up(m.len()))
                }
            }
        }
    }
    let (total_mib, available_mib) = fs_space(state_dir);
    let capacity_mib = (total_mib.saturating_sub(cap.reserved_disk_mib) as f64
        * cap.disk_allocation_ratio)
        .floor() as u64;
    Inventory {
        vcpus: Resource::new(
            host_cpus(),
            u64::from(cap.reserved_vcpus),
            cap.cpu_allocation_ratio,
            vcpus,
            0,
        ),
        memory_mib: Resource::new(
            host_memory_mib(),
            cap.reserved_memory_mib,
            cap.memory_allocation_ratio,
            mem,
            cap.vm_overhead_mib,
        ),
        disk: DiskSpace {
            total_mib,
            available_mib,
            reserved_mib: cap.reserved_disk_mib,
            allocation_ratio: cap.disk_allocation_ratio,
            capacity_mib,
            allocated_mib: disk,
            free_mib: capacity_mib.saturating_sub(disk),
            images_mib: mib_up(images_bytes),
            overlays_used_mib: used,
        },
        files: open_files(),
    }
}

/// Why `spec` does not fit, if it does not; `new_disk_mib` is what its overlays may grow to.
pub fn admit(inv: &Inventory, spec: &VmSpec, new_disk_mib: u64) -> Result<(), String> {
    let f = &inv.files;
    if f.vms_more == 0 {
        return Err(format!(
            "not enough open files: the agent has {} of {} open, keeps {} free and needs {} per VM (raise LimitNOFILE)",
            f.open, f.limit, f.reserved, f.per_vm
        ));
    }
    if new_disk_mib > inv.disk.free_mib {
        return Err(format!(
            "not enough disk: {new_disk_mib} MiB of overlays requested, {} MiB free of {} (allocated {})",
            inv.disk.free_mib, inv.disk.capacity_mib, inv.disk.allocated_mib
        ));
    }
    if u64::from(spec.vcpus) > inv.vcpus.free {
        return Err(format!(
            "not enough vCPUs: {} requested, {} free of {} (allocated {})",
            spec.vcpus, inv.vcpus.free, inv.vcpus.capacity, inv.vcpus.allocated
        ));
    }
    let m = &inv.memory_mib;
    if spec.memory_mib + m.per_vm > m.free {
        return Err(format!(
            "not enough memory: {} MiB requested and {} for its VMM, {} MiB free of {} (allocated {})",
            spec.memory_mib, m.per_vm, m.free, m.capacity, m.allocated
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_applies_reservation_then_ratio() {
        let r = Resource::new(8, 2, 4.0, 20, 0);
        assert_eq!(r.capacity, 24);
        assert_eq!(r.free, 4);
        let r = Resource::new(1, 2, 4.0, 0, 0);
        assert_eq!(r.capacity, 0);
    }
}
