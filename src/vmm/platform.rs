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

/// Kernel parameters that keep a Linux guest on what PVM can run: no XSAVE (the emulator cannot
/// run `xrstor`), none of the instructions it refuses (POPCNT, SMAP's clac/stac), no features
/// whose absence it cannot hide (CPUID masks have no effect on PVM), no page-table isolation,
/// no speculation mitigations, no KASLR, and the kvm-clock PTP driver disabled (it never returns).
pub const PVM_LINUX_PARAMS: &str = "noxsave nopti mitigations=off nokaslr \
clearcpuid=xsave,xsaveopt,xsavec,xsaves,avx,avx2,avx512f,avx512dq,avx512cd,avx512bw,avx512vl,\
avx512ifma,avx512vbmi,popcnt,bmi1,bmi2,smap,smep,pcid,fsgsbase,rdrand,rdseed,fma,f16c,movbe,\
aes,pclmulqdq,sha_ni,erms,fsrm,invpcid,umip,pku,ospke,la57,rtm,hle,mpx,adx";

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
}
