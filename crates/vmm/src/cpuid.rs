//! CPUID as each vCPU sees it: the host's supported set, filtered through a CPU template, then
//! normalised per vCPU (APIC ids and topology: one socket, one thread per core, N cores).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A named set of CPUID masks and MSR values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuTemplate {
    /// Everything KVM supports on this host.
    #[default]
    #[serde(rename = "host")]
    Host,
    /// A conservative x86-64-v2 baseline (SSE4.2, POPCNT, CX16; no AVX, no XSAVE, no TSX, no
    /// AVX-512): a fleet of different CPU generations can live-migrate guests across it.
    #[serde(rename = "x86-64-v2", alias = "baseline")]
    X86_64V2,
}

/// Error for an unknown template name.
#[derive(Debug, thiserror::Error)]
#[error("unknown CPU template {0:?}: known templates are {known}", known = CpuTemplate::NAMES.join(", "))]
pub struct UnknownTemplate(pub String);

impl CpuTemplate {
    /// Names accepted on the command line.
    pub const NAMES: &'static [&'static str] = &["host", "x86-64-v2", "baseline"];

    /// Parses a template name.
    pub fn from_name(name: &str) -> Result<Self, UnknownTemplate> {
        match name {
            "host" => Ok(Self::Host),
            "x86-64-v2" | "baseline" => Ok(Self::X86_64V2),
            other => Err(UnknownTemplate(other.to_owned())),
        }
    }

    /// Canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::X86_64V2 => "x86-64-v2",
        }
    }

    /// MSRs (index, value) the template sets on every vCPU at boot.
    pub fn msrs(self) -> &'static [(u32, u64)] {
        match self {
            Self::Host => &[],
            // IA32_ARCH_CAPABILITIES reads as zero: no claims about the host's mitigations.
            Self::X86_64V2 => &[(0x10a, 0)],
        }
    }

    /// Applies the template's masks to one CPUID entry.
    fn mask(self, e: &mut kvm_cpuid_entry2) {
        if self == Self::Host {
            return;
        }
        match (e.function, e.index) {
            (1, _) => {
                e.ecx &= bits(&[0, 1, 3, 9, 13, 17, 19, 20, 21, 22, 23, 24, 31]);
                e.edx &= bits(&[
                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26,
                    28,
                ]);
            }
            (7, 0) => {
                e.eax = 0;
                e.ebx &= bits(&[7]); // SMEP only: no BMI, AVX2, AVX-512, TSX, SHA
                e.ecx = 0;
                e.edx = 0;
            }
            (7, _) | (0xd, _) | (0x14, _) | (0x12, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0x8000_0001, _) => {
                e.ecx &= bits(&[0]);
                e.edx &= bits(&[11, 20, 29]);
            }
            _ => {}
        }
    }
}

/// KVM paravirtual features (CPUID 0x4000_0001 EAX) that PVM advertises but does not honour:
/// PV_UNHALT (7), PV_SEND_IPI (11) and PV_SCHED_YIELD (13). Their hypercalls never return there,
/// so a Linux guest with two or more vCPUs hung in its first paravirtual IPI.
pub const PVM_HIDDEN_KVM_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const TSC_DEADLINE_BIT: u32 = 24;

/// Host-level corrections to what KVM reports as supported, applied once before templates and
/// per-vCPU normalisation: advertise the TSC-deadline timer when KVM's LAPIC emulates it (KVM
/// does not list it in KVM_GET_SUPPORTED_CPUID, and only accepts the mode when the vCPU's CPUID
/// has it), and hide the KVM features in `hidden_kvm_features`.
pub fn adjust_supported(cpuid: &mut CpuId, tsc_deadline: bool, hidden_kvm_features: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 if tsc_deadline => e.ecx |= 1 << TSC_DEADLINE_BIT,
            KVM_CPUID_FEATURES => e.eax &= !hidden_kvm_features,
            _ => {}
        }
    }
}

fn bits(list: &[u32]) -> u32 {
    list.iter().fold(0, |acc, b| acc | (1 << b))
}

fn set_leaf_topology(e: &mut kvm_cpuid_entry2, apic_id: u32, vcpus: u32) {
    // Bits of the x2APIC id that select the core inside the package.
    let core_bits = 32 - (vcpus.max(1) - 1).leading_zeros();
    match e.index {
        0 => {
            // SMT level: one thread per core.
            e.eax = 0;
            e.ebx = 1;
            e.ecx = (1 << 8) | e.index;
        }
        1 => {
            // Core level: all vCPUs in one package.
            e.eax = core_bits;
            e.ebx = vcpus;
            e.ecx = (2 << 8) | e.index;
        }
        _ => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = e.index;
        }
    }
    e.edx = apic_id;
}

/// What KVM on this host supports, with this host's corrections ([`adjust_supported`]): the
/// CPUID every vCPU's is made from ([`for_vcpu`]).
pub fn supported(
    kvm: &kvm_ioctls::Kvm,
    platform: crate::platform::Platform,
) -> Result<CpuId, kvm_ioctls::Error> {
    let mut supported = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
    let hidden = match platform {
        crate::platform::Platform::Pvm => PVM_HIDDEN_KVM_FEATURES,
        crate::platform::Platform::Hardware => 0,
    };
    adjust_supported(
        &mut supported,
        kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        hidden,
    );
    Ok(supported)
}

/// The leaves (function, index) and registers that list CPU features a guest may use once it
/// saw them: what a live migration's destination must offer too.
const FEATURE_REGS: &[(u32, u32, &str, usize)] = &[
    (1, 0, "ecx", 2),
    (1, 0, "edx", 3),
    (7, 0, "ebx", 1),
    (7, 0, "ecx", 2),
    (7, 0, "edx", 3),
    (7, 1, "eax", 0),
    (0xd, 1, "eax", 0),
    (0x8000_0001, 0, "ecx", 2),
    (0x8000_0001, 0, "edx", 3),
    (KVM_CPUID_FEATURES, 0, "eax", 0),
];

/// The CPU a guest sees, as far as a move to another host is concerned: the vendor and the
/// feature registers ([`FEATURE_REGS`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuFeatures {
    /// The vendor string (leaf 0).
    pub vendor: String,
    /// (function, index, register name, value) of each feature register.
    pub regs: Vec<(u32, u32, String, u32)>,
}

impl CpuFeatures {
    /// What vCPU 0 of a VM with `template` and `vcpus` sees on a host supporting `supported`.
    pub fn of(supported: &CpuId, template: CpuTemplate, vcpus: u8) -> Self {
        let c = for_vcpu(supported, template, 0, vcpus);
        let find = |f: u32, i: u32| {
            c.as_slice()
                .iter()
                .find(|e| e.function == f && (e.index == i || (i == 0 && e.flags == 0)))
                .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        };
        let vendor = find(0, 0)
            .map(|r| {
                let b: Vec<u8> = [r[1], r[3], r[2]]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect();
                String::from_utf8_lossy(&b).into_owned()
            })
            .unwrap_or_default();
        let regs = FEATURE_REGS
            .iter()
            .map(|&(f, i, name, r)| (f, i, name.to_owned(), find(f, i).map_or(0, |v| v[r])))
            .collect();
        Self { vendor, regs }
    }

    /// What a guest that saw `self` would lose on a host offering `there`: each missing
    /// feature bit, named by its leaf, register and bit (empty: it loses nothing).
    pub fn missing_in(&self, there: &CpuFeatures) -> Vec<String> {
        let mut out = Vec::new();
        if self.vendor != there.vendor {
            out.push(format!(
                "vendor {:?} (there: {:?})",
                self.vendor, there.vendor
            ));
        }
        for (f, i, name, v) in &self.regs {
            let have = there
                .regs
                .iter()
                .find(|(g, j, n, _)| g == f && j == i && n == name)
                .map_or(0, |r| r.3);
            for bit in 0..32 {
                if v & (1 << bit) != 0 && have & (1 << bit) == 0 {
                    out.push(format!("CPUID {f:#x}.{i} {name} bit {bit}"));
                }
            }
        }
        out
    }
}

/// Produces the CPUID a given vCPU sees.
pub fn for_vcpu(supported: &CpuId, template: CpuTemplate, vcpu: u8, vcpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = u32::from(vcpu);
    let n = u32::from(vcpus);
    for e in cpuid.as_mut_slice() {
        template.mask(e);
        match e.function {
            1 => {
                e.ebx = (apic_id << 24) | (n.min(255) << 16) | (e.ebx & 0xffff);
                e.ecx |= 1 << 31; // running under a hypervisor
                e.ecx &= !(1 << 27); // OSXSAVE mirrors the guest's CR4; the guest sets it
                if n > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor per package
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // Deterministic cache parameters: cores per package and sharing.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | (sharing << 14) | ((n - 1) << 26);
            }
            6 => {
                e.ecx &= !(1 << 3); // no energy-performance bias MSR
            }
            0xb | 0x1f => set_leaf_topology(e, apic_id, n),
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xff) | (n - 1);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_must_offer_every_feature_the_guest_saw() {
        // On the host itself: nothing is missing from itself, and the baseline template shows
        // a subset of what the host template does.
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let sup = supported(&kvm, crate::platform::Platform::detect()).unwrap();
        let host = CpuFeatures::of(&sup, CpuTemplate::Host, 2);
        let base = CpuFeatures::of(&sup, CpuTemplate::X86_64V2, 2);
        assert!(host.vendor.len() == 12, "{host:?}");
        assert!(host.missing_in(&host).is_empty());
        assert!(base.missing_in(&host).is_empty());
        // A host without one of the guest's features, or of another vendor, is named.
        let mut less = host.clone();
        let (f, i, name, v) = less
            .regs
            .iter_mut()
            .find(|r| r.0 == 1 && r.2 == "ecx")
            .unwrap();
        assert!(*v != 0, "no feature in CPUID 1 ecx: {host:?}");
        let bit = v.trailing_zeros();
        *v &= !(1 << bit);
        let (f, i, name) = (*f, *i, name.clone());
        assert_eq!(
            host.missing_in(&less),
            vec![format!("CPUID {f:#x}.{i} {name} bit {bit}")]
        );
        assert!(less.missing_in(&host).is_empty());
        less.vendor = "AuthenticAMD".into();
        assert_eq!(host.missing_in(&less).len(), 2);
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0),
            entry(1, 0),
            entry(4, 0),
            entry(4, 3),
            entry(7, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0xd, 0),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn apic_ids_and_topology_per_vcpu() {
        let s = sample();
        for id in 0..4u8 {
            let c = for_vcpu(&s, CpuTemplate::Host, id, 4);
            let l1 = find(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_ne!(l1.ecx & (1 << 31), 0);
            assert_eq!(l1.ecx & (1 << 27), 0);
            assert_ne!(l1.edx & (1 << 28), 0);
            let b0 = find(&c, 0xb, 0);
            let b1 = find(&c, 0xb, 1);
            let b2 = find(&c, 0xb, 2);
            assert_eq!((b0.ebx, b0.ecx, b0.edx), (1, 0x100, u32::from(id)));
            assert_eq!((b1.eax, b1.ebx, b1.ecx), (2, 4, 0x201));
            assert_eq!((b2.ebx, b2.ecx & 0xff00), (0, 0));
            assert_eq!(find(&c, 4, 0).eax >> 26, 3);
            assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 0xfff & 3);
            assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 3);
        }
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = for_vcpu(&sample(), CpuTemplate::Host, 0, 1);
        assert_eq!(find(&c, 1, 0).edx & (1 << 28), 0);
        assert_eq!(find(&c, 0xb, 1).eax, 0);
    }

    #[test]
    fn baseline_template_hides_avx_xsave_and_avx512() {
        let c = for_vcpu(&sample(), CpuTemplate::X86_64V2, 0, 1);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ecx & (1 << 28), 0, "AVX");
        assert_eq!(l1.ecx & (1 << 26), 0, "XSAVE");
        assert_ne!(l1.ecx & (1 << 20), 0, "SSE4.2 stays");
        assert_ne!(l1.ecx & (1 << 23), 0, "POPCNT stays");
        let l7 = find(&c, 7, 0);
        assert_eq!(l7.ebx & (1 << 16), 0, "AVX-512F");
        assert_eq!(l7.ebx & (1 << 5), 0, "AVX2");
        assert_eq!(find(&c, 0xd, 0).eax, 0);
        assert_eq!(find(&c, 0x8000_0001, 0).edx, bits(&[11, 20, 29]));
    }

    #[test]
    fn tsc_deadline_and_hidden_kvm_features() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: KVM_CPUID_FEATURES,
                eax: 0xffff_ffff,
                ..Default::default()
            },
        ])
        .unwrap();
        adjust_supported(&mut c, true, PVM_HIDDEN_KVM_FEATURES);
        assert_ne!(find(&c, 1, 0).ecx & (1 << 24), 0);
        let kvm = find(&c, KVM_CPUID_FEATURES, 0).eax;
        assert_eq!(kvm & PVM_HIDDEN_KVM_FEATURES, 0);
        assert_ne!(kvm & 1, 0, "kvm-clock stays");
        // The per-vCPU step keeps both.
        let v = for_vcpu(&c, CpuTemplate::X86_64V2, 1, 2);
        assert_ne!(find(&v, 1, 0).ecx & (1 << 24), 0);
    }

    #[test]
    fn template_names() {
        assert_eq!(CpuTemplate::from_name("host").unwrap(), CpuTemplate::Host);
        assert_eq!(
            CpuTemplate::from_name("baseline").unwrap(),
            CpuTemplate::X86_64V2
        );
        let e = CpuTemplate::from_name("skylake").unwrap_err().to_string();
        assert!(e.contains("skylake") && e.contains("x86-64-v2"), "{e}");
    }
}
