//! SMBIOS 3.0 tables: who made the machine, what it is, its serial number and UUID.
//!
//! Guests read these to learn what they run on and who they are: Linux exposes them under
//! `/sys/class/dmi/id`, `dmidecode` decodes them, and cloud-init's platform detection and its
//! NoCloud datasource read them (NoCloud takes its seed URL from the system serial number when
//! that reads `ds=nocloud-net;s=URL`, so a stock cloud image needs no kernel parameter to find
//! the metadata service). Every cloud VMM provides them; without ACPI or EFI a guest finds the
//! entry point by scanning 0xF0000-0xFFFFF for the `_SM3_` anchor on a 16-byte boundary, which
//! is where it goes.
//!
//! Five structures: BIOS information (type 0, with the "this is a virtual machine" bit), system
//! information (type 1: manufacturer, product, version, serial number, UUID, family), chassis
//! (type 3: manufacturer, asset tag), OEM strings (type 11: the VM generation ID) and the
//! end-of-table marker (type 127). ~350 bytes.
//!
//! **The VM generation ID** is what a guest without ACPI (so without a vmgenid device) can read
//! to learn that it was restored from a snapshot, possibly twice (a clone): the OEM string
//! `bexar-vm-generation=` followed by 32 hex digits, random at boot and new at every restore
//! ([`new_generation`] writes it in place in guest memory). Linux serves the raw table from
//! memory at each read of `/sys/firmware/dmi/tables/DMI`, so `dmidecode -t 11` shows the
//! current one; software that keys secrets or identities on the VM instance can compare it.

use bexar_devices::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{SMBIOS_END, SMBIOS_START};

use super::BootError;

/// The identity a VM's SMBIOS tables carry (everything optional: absent strings are left out,
/// an absent UUID is written as all zeros, which SMBIOS defines as "not present").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmbiosIdentity {
    /// System serial number (type 1). The agent writes cloud-init's NoCloud seed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// System UUID (type 1): the VM's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<uuid::Uuid>,
    /// Chassis asset tag (type 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_tag: Option<String>,
}

impl std::str::FromStr for SmbiosIdentity {
    type Err = String;

    /// `serial=S,uuid=U,asset-tag=T`, each optional (a value may hold `=` and `;`, as a
    /// NoCloud seed does, but not `,`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut id = Self::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KEY=VALUE"))?;
            let checked = |v: &str| {
                if valid_string(v) {
                    Ok(v.to_owned())
                } else {
                    Err(format!(
                        "{k}: must be 1-{MAX_STRING} printable ASCII characters"
                    ))
                }
            };
            match k {
                "serial" => id.serial = Some(checked(v)?),
                "asset-tag" => id.asset_tag = Some(checked(v)?),
                "uuid" => id.uuid = Some(v.parse().map_err(|e| format!("uuid: {e}"))?),
                _ => return Err(format!("unknown key {k:?} (serial, uuid, asset-tag)")),
            }
        }
        Ok(id)
    }
}

/// Longest string the tables accept (SMBIOS sets no limit; 64 keeps every table small and is
/// longer than any serial or tag a cloud writes).
pub const MAX_STRING: usize = 64;

/// Whether `s` may be an SMBIOS string: 1-64 printable ASCII characters. Strings are
/// NUL-terminated in the table, and `dmidecode` and Linux print them as they are.
pub fn valid_string(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_STRING && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

const MANUFACTURER: &str = "Bexar";
const PRODUCT: &str = "Bexar microVM";
const FAMILY: &str = "Virtual Machine";
const BIOS_DATE: &str = "12/05/2026";

const TYPE_BIOS: u8 = 0;
const TYPE_SYSTEM: u8 = 1;
const TYPE_CHASSIS: u8 = 3;
const TYPE_OEM_STRINGS: u8 = 11;
const TYPE_END: u8 = 127;
/// The OEM string that carries the VM generation ID, before its 32 hex digits.
pub const GENERATION_MARK: &str = "bexar-vm-generation=";
/// BIOS characteristics bit 3: "BIOS characteristics are not supported" (there is no BIOS).
const BIOS_CHARACTERISTICS_NOT_SUPPORTED: u64 = 1 << 3;
/// BIOS characteristics extension byte 2, bit 4: the table describes a virtual machine.
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// System wake-up type: power switch.
const WAKEUP_POWER_SWITCH: u8 = 6;
/// Chassis type: other. State fields: safe; security status: none.
const CHASSIS_OTHER: u8 = 1;
const CHASSIS_STATE_SAFE: u8 = 3;
const CHASSIS_SECURITY_NONE: u8 = 3;

/// One structure: its formatted part and its strings (numbered from 1 in order of adding).
struct Structure {
    bytes: Vec<u8>,
    strings: Vec<u8>,
    count: u8,
}

impl Structure {
    fn new(kind: u8, handle: u16) -> Self {
        let mut bytes = vec![kind, 0];
        bytes.extend_from_slice(&handle.to_le_bytes());
        Self {
            bytes,
            strings: Vec::new(),
            count: 0,
        }
    }

    fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A string field: its number, or 0 (no string) for none.
    fn string(&mut self, s: Option<&str>) -> &mut Self {
        match s.filter(|s| valid_string(s)) {
            Some(s) => {
                self.count += 1;
                self.strings.extend_from_slice(s.as_bytes());
                self.strings.push(0);
                let n = self.count;
                self.u8(n)
            }
            None => self.u8(0),
        }
    }

    /// A string the structure counts in a field of its own (type 11), with no number field.
    fn counted_string(&mut self, s: &str) -> &mut Self {
        self.count += 1;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        self
    }

    fn finish(mut self, out: &mut Vec<u8>) {
        self.bytes[1] = self.bytes.len() as u8;
        out.extend_from_slice(&self.bytes);
        if self.strings.is_empty() {
            // No strings: the string set is two NULs.
            out.extend_from_slice(&[0, 0]);
        } else {
            out.extend_from_slice(&self.strings);
            out.push(0);
        }
    }
}

/// The structure table.
pub fn table(id: &SmbiosIdentity) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let mut bios = Structure::new(TYPE_BIOS, 0);
    bios.string(Some(MANUFACTURER))
        .string(Some(env!("CARGO_PKG_VERSION")))
        .u16(0) // starting address segment: none (no BIOS in ROM)
        .string(Some(BIOS_DATE))
        .u8(0) // ROM size
        .u64(BIOS_CHARACTERISTICS_NOT_SUPPORTED)
        .u8(0)
        .u8(BIOS_EXT2_VIRTUAL_MACHINE)
        .u8(0xff) // BIOS major/minor release, embedded controller major/minor: none
        .u8(0xff)
        .u8(0xff)
        .u8(0xff);
    bios.finish(&mut out);

    let mut system = Structure::new(TYPE_SYSTEM, 1);
    system
        .string(Some(MANUFACTURER))
        .string(Some(PRODUCT))
        .string(Some(env!("CARGO_PKG_VERSION")))
        .string(id.serial.as_deref());
    // SMBIOS 2.6+ stores the first three UUID fields little-endian.
    let u = id.uuid.map_or([0u8; 16], |u| u.to_bytes_le());
    system.bytes.extend_from_slice(&u);
    system
        .u8(WAKEUP_POWER_SWITCH)
        .string(None) // SKU
        .string(Some(FAMILY));
    system.finish(&mut out);

    let mut chassis = Structure::new(TYPE_CHASSIS, 3);
    chassis
        .string(Some(MANUFACTURER))
        .u8(CHASSIS_OTHER)
        .string(None) // version
        .string(None) // serial number
        .string(id.asset_tag.as_deref())
        .u8(CHASSIS_STATE_SAFE) // boot-up
        .u8(CHASSIS_STATE_SAFE) // power supply
        .u8(CHASSIS_STATE_SAFE) // thermal
        .u8(CHASSIS_SECURITY_NONE)
        .u32(0) // OEM-defined
        .u8(0) // height
        .u8(0) // power cords
        .u8(0) // contained elements
        .u8(0) // their record length
        .string(None); // SKU
    chassis.finish(&mut out);

    let mut oem = Structure::new(TYPE_OEM_STRINGS, 11);
    let generation = format!("{GENERATION_MARK}{}", "0".repeat(32));
    oem.u8(1).counted_string(&generation);
    oem.finish(&mut out);

    Structure::new(TYPE_END, 0x7f).finish(&mut out);
    out
}

/// Writes a new random VM generation ID into the SMBIOS table in `mem` (in place: the same
/// number of characters) and returns it, or `None` if the table has no generation string.
pub fn new_generation(mem: &GuestMemoryMmap) -> Result<Option<u128>, BootError> {
    // The table as the entry point places it (read from guest memory, so bounded here: a
    // guest may have written anything there).
    let mut ep = [0u8; 24];
    mem.read_slice(&mut ep, GuestAddress(SMBIOS_START))
        .map_err(|_| BootError::LowMemory(SMBIOS_START))?;
    let len = u32::from_le_bytes([ep[12], ep[13], ep[14], ep[15]]) as u64;
    let addr = u64::from_le_bytes([
        ep[16], ep[17], ep[18], ep[19], ep[20], ep[21], ep[22], ep[23],
    ]);
    if &ep[..5] != b"_SM3_" || addr < SMBIOS_START || len > 4096 || addr + len > SMBIOS_END {
        return Ok(None);
    }
    let mut table = vec![0u8; len as usize];
    mem.read_slice(&mut table, GuestAddress(addr))
        .map_err(|_| BootError::LowMemory(addr))?;
    let mark = GENERATION_MARK.as_bytes();
    let Some(at) = table.windows(mark.len()).position(|w| w == mark) else {
        return Ok(None);
    };
    let digits = at + mark.len();
    if digits + 32 > table.len() {
        return Ok(None);
    }
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(BootError::Params(format!(
            "getrandom for the VM generation ID: {}",
            std::io::Error::last_os_error()
        )));
    }
    let generation = u128::from_le_bytes(bytes);
    mem.write_slice(
        format!("{generation:032x}").as_bytes(),
        GuestAddress(addr + digits as u64),
    )
    .map_err(|_| BootError::LowMemory(addr))?;
    Ok(Some(generation))
}

/// The 24-byte SMBIOS 3.0 entry point for a table of `len` bytes at `table_addr`.
pub fn entry_point(table_addr: u64, len: u32) -> [u8; 24] {
    let mut e = [0u8; 24];
    e[..5].copy_from_slice(b"_SM3_");
    e[6] = 24; // entry point length
    e[7] = 3; // SMBIOS 3.0.0
    e[8] = 0;
    e[9] = 0;
    e[10] = 1; // entry point revision
    e[12..16].copy_from_slice(&len.to_le_bytes());
    e[16..24].copy_from_slice(&table_addr.to_le_bytes());
    e[5] = e.iter().fold(0u8, |a, b| a.wrapping_sub(*b));
    e
}

/// Writes the entry point at [`SMBIOS_START`] and the table 32 bytes after it.
pub fn setup(mem: &GuestMemoryMmap, id: &SmbiosIdentity) -> Result<(), BootError> {
    let table = table(id);
    let table_addr = SMBIOS_START + 32;
    if table_addr + table.len() as u64 > SMBIOS_END {
        return Err(BootError::Params("SMBIOS table too large".into()));
    }
    mem.write_slice(
        &entry_point(table_addr, table.len() as u32),
        GuestAddress(SMBIOS_START),
    )
    .map_err(|_| BootError::LowMemory(SMBIOS_START))?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(|_| BootError::LowMemory(table_addr))?;
    new_generation(mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> SmbiosIdentity {
        SmbiosIdentity {
            serial: Some("ds=nocloud-net;s=http://169.254.169.254/nocloud/".into()),
            uuid: Some("0e3f4b6c-2b1a-4c5d-9e8f-102132435465".parse().unwrap()),
            asset_tag: Some("vm-017".into()),
        }
    }

    /// Walks the table as a reader does: (type, length, strings) per structure.
    fn walk(t: &[u8]) -> Vec<(u8, u8, Vec<String>)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < t.len() {
            let (kind, len) = (t[i], t[i + 1]);
            let mut j = i + usize::from(len);
            let mut strings = Vec::new();
            loop {
                let end = j + t[j..].iter().position(|&b| b == 0).unwrap();
                if end == j {
                    j += 1;
                    if strings.is_empty() {
                        j += 1;
                    }
                    break;
                }
                strings.push(String::from_utf8(t[j..end].to_vec()).unwrap());
                j = end + 1;
            }
            out.push((kind, len, strings));
            i = j;
            if kind == TYPE_END {
                break;
            }
        }
        assert_eq!(i, t.len(), "trailing bytes after the end structure");
        out
    }

    #[test]
    fn structures_have_their_lengths_and_strings() {
        let t = table(&identity());
        let s = walk(&t);
        let kinds: Vec<(u8, u8)> = s.iter().map(|(k, l, _)| (*k, *l)).collect();
        assert_eq!(kinds, [(0, 0x18), (1, 0x1b), (3, 0x16), (11, 5), (127, 4)]);
        assert_eq!(
            s[1].2,
            [
                "Bexar",
                "Bexar microVM",
                env!("CARGO_PKG_VERSION"),
                "ds=nocloud-net;s=http://169.254.169.254/nocloud/",
                "Virtual Machine"
            ]
        );
        assert_eq!(s[2].2, ["Bexar", "vm-017"]);
    }

    #[test]
    fn entry_point_checksums_to_zero() {
        let e = entry_point(0xf0020, 300);
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(&e[..5], b"_SM3_");
    }

    /// The outside decoder: Debian's dmidecode reads the tables out of guest memory, dumped in
    /// its `--dump-bin` layout (the entry point at 0 naming the table at offset 32, which is
    /// where the table sits after the entry point in guest memory too).
    #[test]
    fn dmidecode_reads_the_tables_from_guest_memory() {
        let mem = crate::memory::create_guest_memory(4).unwrap().mem;
        setup(&mem, &identity()).unwrap();
        let mut ep = [0u8; 24];
        mem.read_slice(&mut ep, GuestAddress(SMBIOS_START)).unwrap();
        let len = u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize;
        let addr = u64::from_le_bytes(ep[16..24].try_into().unwrap());
        let mut dump = vec![0u8; 32 + len];
        mem.read_slice(&mut dump[32..], GuestAddress(addr)).unwrap();
        dump[..24].copy_from_slice(&entry_point(32, len as u32));
        let path = std::env::temp_dir().join(format!("bexar-smbios-{}.bin", std::process::id()));
        std::fs::write(&path, &dump).unwrap();
        let run = |args: &[&str]| {
            let o = std::process::Command::new("dmidecode")
                .arg("--from-dump")
                .arg(&path)
                .args(args)
                .output()
                .expect("run dmidecode (scripts/deps installs it)");
            assert!(o.status.success(), "{o:?}");
            String::from_utf8(o.stdout).unwrap()
        };
        let full = run(&[]);
        for needle in [
            "SMBIOS 3.0.0 present.",
            "Manufacturer: Bexar",
            "Product Name: Bexar microVM",
            "Serial Number: ds=nocloud-net;s=http://169.254.169.254/nocloud/",
            "UUID: 0e3f4b6c-2b1a-4c5d-9e8f-102132435465",
            "Family: Virtual Machine",
            "Asset Tag: vm-017",
            "System is a virtual machine",
            "Wake-up Type: Power Switch",
        ] {
            assert!(full.contains(needle), "dmidecode lacks {needle:?}:\n{full}");
        }
        assert!(!full.contains("Invalid"), "{full}");
        // The generation ID: 32 hex digits, new at each restore, in place.
        let generation = |text: &str| {
            text.split(GENERATION_MARK)
                .nth(1)
                .map(|s| s[..32].to_owned())
                .unwrap_or_default()
        };
        let first = generation(&full);
        assert!(
            first.len() == 32 && first.chars().all(|c| c.is_ascii_hexdigit()),
            "{full}"
        );
        assert_ne!(first, "0".repeat(32));
        let again = new_generation(&mem).unwrap().unwrap();
        let mut dump2 = dump.clone();
        mem.read_slice(&mut dump2[32..], GuestAddress(addr))
            .unwrap();
        std::fs::write(&path, &dump2).unwrap();
        let after = run(&["-t", "11"]);
        assert_eq!(generation(&after), format!("{again:032x}"), "{after}");
        assert_ne!(generation(&after), first);
        // The keywords cloud-init asks for.
        assert_eq!(
            run(&["-s", "system-uuid"]).trim(),
            "0e3f4b6c-2b1a-4c5d-9e8f-102132435465"
        );
        assert_eq!(run(&["-s", "chassis-asset-tag"]).trim(), "vm-017");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn the_flag_form_parses_and_refuses_what_it_cannot_hold() {
        let id: SmbiosIdentity =
            "serial=ds=nocloud-net;s=http://169.254.169.254/nocloud/,uuid=0e3f4b6c-2b1a-4c5d-9e8f-102132435465,asset-tag=vm-017"
                .parse()
                .unwrap();
        assert_eq!(id, identity());
        assert!("serial=".parse::<SmbiosIdentity>().is_err());
        assert!("uuid=nope".parse::<SmbiosIdentity>().is_err());
        assert!("colour=red".parse::<SmbiosIdentity>().is_err());
        assert!("serial".parse::<SmbiosIdentity>().is_err());
    }

    #[test]
    fn absent_and_invalid_strings_are_left_out() {
        let t = table(&SmbiosIdentity {
            serial: Some("tab\there".into()),
            uuid: None,
            asset_tag: None,
        });
        let s = walk(&t);
        assert_eq!(s[1].2.len(), 4, "{:?}", s[1].2);
        assert_eq!(s[2].2, ["Bexar"]);
    }
}
