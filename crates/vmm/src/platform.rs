//! What kind of KVM we run on. On a PVM host (a software-assisted nested KVM, `kvm_pvm`), guest
//! ring-0 code is emulated and CPUID masks have no effect, so the VMM keeps a Linux guest off the
//! features the emulator cannot run by adding kernel parameters itself.

use std::path::Path;

/// The virtualisation platform under /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Hardware virtualisation (Intel VT-x, AMD-V).
    Hardware,
    /// PVM: guest kernel code emulated, user code native.
    Pvm,
}

/// Kernel parameters that keep a Linux guest on what PVM can run (guest-images/README.md has the
/// measurements behind each): no XSAVE (the emulator cannot run `xrstor`; clearing XSAVE also
/// clears AVX, AVX-512 and friends), none of the instructions it refuses in ring 0 (POPCNT,
/// CMPXCHG16B, SMAP's clac/stac), no `rep movsb` fast paths (ERMS, FSRM: the emulator runs them
/// slowly), defensive removal of features PVM may not emulate, no page-table isolation or
/// speculation mitigations, no KASLR, and page-granular per-CPU areas (faster set-up).
///
/// `clearcpuid=` lists X86_FEATURE bit numbers (word * 32 + bit, from the kernel's
/// cpufeatures.h): POPCNT, CX16, SMAP, SMEP, PCID, INVPCID, FSGSBASE, RDRAND, RDSEED, RDPID,
/// SERIALIZE, TSC_ADJUST, ARCH_CAPABILITIES, ERMS, FSRM. Linux 6.1 copies the option into a
/// 128-byte buffer and silently drops the rest, so the list must stay short.
///
/// The KVM paravirtual features PVM does not honour are hidden through CPUID instead (see
/// [`crate::cpuid::PVM_HIDDEN_KVM_FEATURES`]): leaf 0x4000_0001 is one leaf PVM does take
/// from the VMM.
pub const PVM_LINUX_PARAMS: &str = "noxsave nopti mitigations=off nokaslr percpu_alloc=page \
clearcpuid=151,141,308,295,145,298,288,158,306,534,590,289,605,297,580";

/// Longest value Linux reads for `clearcpuid=` (its buffer is 128 bytes with the NUL).
pub const CLEARCPUID_MAX: usize = 127;

impl Platform {
    /// Detects the platform from the loaded KVM modules.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Detection against a given sysfs module directory (for tests).
    pub fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            Self::Pvm
        } else {
            Self::Hardware
        }
    }

    /// Short name for logs and the host API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hardware => "hardware",
            Self::Pvm => "pvm",
        }
    }

    /// Extra kernel parameters this platform needs, if any.
    pub fn linux_params(self) -> Option<&'static str> {
        match self {
            Self::Hardware => None,
            Self::Pvm => Some(PVM_LINUX_PARAMS),
        }
    }
}

/// Appends the platform's parameters to a command line, unless the user already set them.
pub fn adjust_cmdline(platform: Platform, cmdline: &str) -> String {
    match platform.linux_params() {
        Some(extra) if !cmdline.contains("clearcpuid=") => {
            if cmdline.trim().is_empty() {
                extra.to_owned()
            } else {
                format!("{} {extra}", cmdline.trim_end())
            }
        }
        _ => cmdline.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_follows_the_module_directory() {
        let dir = std::env::temp_dir().join(format!("bexar-platform-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Platform::detect_in(&dir), Platform::Hardware);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(Platform::detect_in(&dir), Platform::Pvm);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn params_are_added_once_and_only_on_pvm() {
        assert_eq!(
            adjust_cmdline(Platform::Hardware, "console=ttyS0"),
            "console=ttyS0"
        );
        let a = adjust_cmdline(Platform::Pvm, "console=ttyS0");
        assert!(a.starts_with("console=ttyS0 noxsave"));
        assert_eq!(adjust_cmdline(Platform::Pvm, &a), a);
    }

    #[test]
    fn clearcpuid_fits_the_kernel_buffer() {
        let v = PVM_LINUX_PARAMS.split("clearcpuid=").nth(1).unwrap();
        let v = v.split_whitespace().next().unwrap();
        assert!(v.len() <= CLEARCPUID_MAX, "{} bytes", v.len());
        // POPCNT, CMPXCHG16B (SLUB's cmpxchg_double) and SMAP are refused by the PVM emulator.
        for needed in ["151", "141", "308"] {
            assert!(v.split(',').any(|b| b == needed), "{needed} missing");
        }
    }
}
