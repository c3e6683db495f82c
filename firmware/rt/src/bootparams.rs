//! Reader for the Linux `boot_params` "zero page" the VMM passes in RSI.
use core::ptr::read_unaligned;

const OFF_EXT_CMD_LINE_PTR: usize = 0x0c8;
const OFF_E820_ENTRIES: usize = 0x1e8;
const OFF_RAMDISK_IMAGE: usize = 0x218;
const OFF_RAMDISK_SIZE: usize = 0x21c;
const OFF_CMD_LINE_PTR: usize = 0x228;
const OFF_CMDLINE_SIZE: usize = 0x238;
const OFF_E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;

pub const E820_RAM: u32 = 1;

/// The zero page at a physical (= virtual) address.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct BootParams {
    addr: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl BootParams {
    pub fn from_addr(addr: usize) -> Self {
        BootParams { addr }
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    fn read<T: Copy>(&self, off: usize) -> T {
        unsafe { read_unaligned((self.addr + off) as *const T) }
    }

    /// Physical address of the command line (0 if none).
    pub fn cmdline_addr(&self) -> u64 {
        let lo: u32 = self.read(OFF_CMD_LINE_PTR);
        let hi: u32 = self.read(OFF_EXT_CMD_LINE_PTR);
        ((hi as u64) << 32) | lo as u64
    }

    /// The NUL-terminated command line, as bytes (empty if none).
    pub fn cmdline_bytes(&self) -> &'static [u8] {
        let addr = self.cmdline_addr();
        if addr == 0 || addr >= 1 << 32 {
            return &[];
        }
        let size: u32 = self.read(OFF_CMDLINE_SIZE);
        let max = if size == 0 || size > 65536 { 65536 } else { size as usize + 1 };
        let p = addr as *const u8;
        let mut n = 0;
        while n < max && unsafe { p.add(n).read_volatile() } != 0 {
            n += 1;
        }
        unsafe { core::slice::from_raw_parts(p, n) }
    }

    /// The command line as text (`"<non-UTF-8 command line>"` if it is not).
    pub fn cmdline(&self) -> &'static str {
        core::str::from_utf8(self.cmdline_bytes()).unwrap_or("<non-UTF-8 command line>")
    }

    /// The initrd as (physical address, size), if the VMM loaded one.
    pub fn ramdisk(&self) -> Option<(u64, u64)> {
        let addr: u32 = self.read(OFF_RAMDISK_IMAGE);
        let size: u32 = self.read(OFF_RAMDISK_SIZE);
        (addr != 0 && size != 0).then_some((addr as u64, size as u64))
    }

    pub fn e820_count(&self) -> usize {
        let n: u8 = self.read(OFF_E820_ENTRIES);
        (n as usize).min(E820_MAX)
    }

    pub fn e820(&self, i: usize) -> E820Entry {
        let off = OFF_E820_TABLE + i * 20;
        E820Entry { addr: self.read(off), size: self.read(off + 8), kind: self.read(off + 16) }
    }

    pub fn e820_iter(&self) -> impl Iterator<Item = E820Entry> + '_ {
        (0..self.e820_count()).map(move |i| self.e820(i))
    }

    /// Total bytes of usable RAM (type 1) in the e820 map.
    pub fn ram_bytes(&self) -> u64 {
        self.e820_iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum()
    }

    /// End address of the highest RAM range.
    pub fn ram_top(&self) -> u64 {
        self.e820_iter().filter(|e| e.kind == E820_RAM).map(|e| e.addr + e.size).max().unwrap_or(0)
    }
}

/// Value of the first `key=value` token of `cmdline` (whitespace separated).
pub fn cmdline_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_ascii_whitespace().find_map(|tok| {
        let (k, v) = tok.split_once('=')?;
        (k == key).then_some(v)
    })
}
