//! AP bring-up from ring 3: the trampoline is copied to 0x10000, and the
//! local APIC's ICR (MMIO at 0xfee00300/0xfee00310, user-accessible through
//! the static page tables) sends INIT-SIPI-SIPI to each AP.
use crate::arch::{delay_us, mmio_read32, mmio_write32};
use crate::boot::{self, TRAMPOLINE_ADDR};
use crate::mptable::MpTable;
use core::sync::atomic::{AtomicUsize, Ordering};

pub const LAPIC_BASE: usize = 0xfee0_0000;
const LAPIC_ID: usize = 0x20;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_ICR_LO: usize = 0x300;
const LAPIC_ICR_HI: usize = 0x310;
const ICR_PENDING: u32 = 1 << 12;

/// The function APs run in ring 3 (0 = none yet).
static AP_ENTRY: AtomicUsize = AtomicUsize::new(0);

pub fn lapic_read(off: usize) -> u32 {
    mmio_read32(LAPIC_BASE + off)
}

pub fn lapic_write(off: usize, v: u32) {
    mmio_write32(LAPIC_BASE + off, v)
}

/// This CPU's local APIC id (xAPIC ID register).
pub fn lapic_id() -> u32 {
    lapic_read(LAPIC_ID) >> 24
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiError {
    /// The ICR delivery status stayed "send pending".
    Stuck,
}

fn wait_icr() -> Result<(), IpiError> {
    for _ in 0..1_000_000 {
        if lapic_read(LAPIC_ICR_LO) & ICR_PENDING == 0 {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(IpiError::Stuck)
}

fn send_ipi(apic_id: u8, lo: u32) -> Result<(), IpiError> {
    lapic_write(LAPIC_ICR_HI, (apic_id as u32) << 24);
    lapic_write(LAPIC_ICR_LO, lo);
    wait_icr()
}

/// Copy the AP trampoline to TRAMPOLINE_ADDR and software-enable the local APIC.
pub fn prepare() {
    let t = boot::trampoline();
    unsafe {
        core::ptr::copy_nonoverlapping(t.as_ptr(), TRAMPOLINE_ADDR as *mut u8, t.len());
    }
    let svr = lapic_read(LAPIC_SVR);
    lapic_write(LAPIC_SVR, svr | 0x100 | 0xff);
}

/// INIT, 10 ms, SIPI, 200 us, SIPI (Intel MP spec B.4) to one AP.
pub fn start_ap(apic_id: u8) -> Result<(), IpiError> {
    let vector = (TRAMPOLINE_ADDR >> 12) as u32;
    send_ipi(apic_id, 0x0000_4500)?; // INIT, level assert
    send_ipi(apic_id, 0x0000_8500)?; // INIT, level de-assert
    delay_us(10_000);
    send_ipi(apic_id, 0x0000_4600 | vector)?; // Start-up
    delay_us(200);
    send_ipi(apic_id, 0x0000_4600 | vector)?;
    Ok(())
}

/// Start every enabled AP of `mp` (every processor entry that is neither the
/// BSP nor this CPU). Each AP runs `entry(cpu_index)` in ring 3 (indices
/// 1, 2, ... in arrival order) and halts when it returns. The APs are
/// started together: INIT to each, 10 ms, SIPI to each, 200 us, SIPI to each.
/// Returns the number of APs sent INIT-SIPI-SIPI.
pub fn start_aps(mp: &MpTable, entry: fn(usize)) -> Result<usize, IpiError> {
    AP_ENTRY.store(entry as usize, Ordering::Release);
    prepare();
    let me = lapic_id() as u8;
    let aps = || mp.enabled_cpus().filter(move |c| !c.bsp && c.apic_id != me);
    let vector = (TRAMPOLINE_ADDR >> 12) as u32;
    let mut n = 0;
    for cpu in aps() {
        send_ipi(cpu.apic_id, 0x0000_4500)?; // INIT, level assert
        send_ipi(cpu.apic_id, 0x0000_8500)?; // INIT, level de-assert
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    delay_us(10_000);
    for _ in 0..2 {
        for cpu in aps() {
            send_ipi(cpu.apic_id, 0x0000_4600 | vector)?; // Start-up
        }
        delay_us(200);
    }
    Ok(n)
}

/// Number of APs that reached long mode (and took a CPU index).
pub fn aps_arrived() -> usize {
    boot::aps_arrived() as usize
}

pub(crate) fn ap_run(index: usize) -> ! {
    let f = AP_ENTRY.load(Ordering::Acquire);
    if f != 0 {
        let f: fn(usize) = unsafe { core::mem::transmute(f) };
        f(index);
    }
    boot::halt()
}
