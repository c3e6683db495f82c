//! Device interrupts through the IOAPIC and the local APIC, for programs that
//! sleep instead of polling (a halted vCPU costs the host nothing, a spinning
//! one a host core).
//!
//! All of the set-up runs in ring 3: the IDT gates are written directly (the
//! IDT, like every page, is user-writable), the LAPIC and IOAPIC are MMIO
//! (direct exits on PVM too). Ring 0 runs only the stubs in `boot` (record
//! the IRQ line in a pending mask, EOI: six instructions) and the `sti; hlt`
//! of [`wait`]. IRQ line n (IOAPIC pin n: the ISA IRQs 0-15 and the GSIs
//! 16-23, where virtio-mmio devices also sit) goes to vector
//! [`VECTOR_BASE`] + n, edge-triggered, fixed delivery to this CPU.
//!
//! No wakeup is lost between draining a device and sleeping: ring 3 runs with
//! IF=0, so an interrupt arriving meanwhile stays pending in the LAPIC and
//! wakes the `hlt` at once (where a platform delivers it to ring 3 anyway, the
//! stub records it and ring 0 skips the `hlt`). The pending mask is global:
//! one CPU takes interrupts.
use crate::arch::{mmio_write32, outb};
use crate::boot::{self, SEL_KCODE};
use crate::smp::{lapic_id, lapic_read, lapic_write};
use core::sync::atomic::Ordering;

/// Vector of IRQ line 0; line n uses `VECTOR_BASE + n`.
pub const VECTOR_BASE: u8 = 0x20;
/// IRQ lines with a stub (the pins of one IOAPIC).
pub const LINES: usize = 24;
/// The local APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Where the IOAPIC usually is (the MP table says for sure).
pub const IOAPIC_DEFAULT: usize = 0xfec0_0000;
/// ISA IRQ lines.
pub const IRQ_KEYBOARD: u8 = 1;
pub const IRQ_COM1: u8 = 4;

const LAPIC_SVR: usize = 0xf0;
const LAPIC_LVT_LINT0: usize = 0x350;
const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;
const IOAPIC_REGSEL: usize = 0x00;
const IOAPIC_WIN: usize = 0x10;
const IOAPIC_REDTBL: u32 = 0x10;
/// Type byte of a present 64-bit interrupt gate, DPL 0.
const GATE_INTERRUPT: u64 = 0x8e;

/// Point IDT entry `vector` at `handler` (ring 0, interrupt gate: IF=0 inside).
fn set_gate(vector: u8, handler: u64) {
    let lo = (handler & 0xffff) | (SEL_KCODE as u64) << 16 | GATE_INTERRUPT << 40 | ((handler >> 16) & 0xffff) << 48;
    let hi = handler >> 32;
    let i = 2 * vector as usize;
    unsafe {
        let idt = (&raw mut boot::bexar_idt).cast::<u64>();
        idt.add(i).write_volatile(lo);
        idt.add(i + 1).write_volatile(hi);
    }
}

/// Software-enable this CPU's local APIC with [`SPURIOUS_VECTOR`] (gate
/// included), and close the 8259 path: LINT0 masked (the VMM sets it to
/// ExtINT for Linux) and both PICs' lines masked (OCW1), so an ISA interrupt
/// arrives once, through the IOAPIC, and never as the PIC's vector 0x00 + n,
/// which is an exception gate until someone programs the PIC.
pub fn lapic_enable() {
    set_gate(SPURIOUS_VECTOR, (&raw const boot::bexar_irq_spurious) as u64);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    lapic_write(LAPIC_LVT_LINT0, lapic_read(LAPIC_LVT_LINT0) | LVT_MASKED);
    lapic_write(LAPIC_SVR, (lapic_read(LAPIC_SVR) & !0xff) | SVR_ENABLE | SPURIOUS_VECTOR as u32);
}

fn ioapic_write(ioapic: usize, reg: u32, v: u32) {
    mmio_write32(ioapic + IOAPIC_REGSEL, reg);
    mmio_write32(ioapic + IOAPIC_WIN, v);
}

/// Route IRQ `line` (pin `line` of the IOAPIC at `ioapic`: the identity
/// mapping of ISA IRQs and GSIs to pins) to this CPU at vector [`VECTOR_BASE`] + `line`:
/// edge-triggered, active high, fixed delivery, physical destination. The gate
/// is installed before the pin is unmasked. Lines from [`LINES`] on are ignored.
pub fn route_isa_irq(ioapic: usize, line: u8) {
    if line as usize >= LINES {
        return;
    }
    let stub = unsafe { (&raw const boot::bexar_irq_stubs).cast::<u64>().add(line as usize).read() };
    set_gate(VECTOR_BASE + line, stub);
    let reg = IOAPIC_REDTBL + 2 * line as u32;
    ioapic_write(ioapic, reg + 1, lapic_id() << 24);
    ioapic_write(ioapic, reg, (VECTOR_BASE + line) as u32);
}

const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b0011: the bus clock divided by 16.
const TIMER_DIVIDE_BY_16: u32 = 0x3;

/// Start this CPU's local APIC timer in periodic mode, every `count` ticks of the bus clock
/// divided by 16, on the vector of IRQ line `line` (which no IOAPIC pin then uses): [`wait`]
/// reports each expiry as bit `line`. KVM's APIC bus runs at 1 GHz, so 62 500 counts are 1 ms.
pub fn lapic_timer_periodic(line: u8, count: u32) {
    if line as usize >= LINES {
        return;
    }
    let stub = unsafe { (&raw const boot::bexar_irq_stubs).cast::<u64>().add(line as usize).read() };
    set_gate(VECTOR_BASE + line, stub);
    lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_16);
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | (VECTOR_BASE + line) as u32);
    lapic_write(LAPIC_TIMER_INITIAL, count);
}

/// Stop this CPU's local APIC timer.
pub fn lapic_timer_stop() {
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
}

/// Mask pin `line` of the IOAPIC at `ioapic` again.
pub fn mask_isa_irq(ioapic: usize, line: u8) {
    if (line as usize) < LINES {
        ioapic_write(ioapic, IOAPIC_REDTBL + 2 * line as u32, LVT_MASKED);
    }
}

/// The IRQ lines that interrupted since the last call (bit n = line n), cleared.
pub fn take_pending() -> u32 {
    unsafe { boot::bexar_irq_pending.swap(0, Ordering::AcqRel) }
}

/// Sleep (ring-0 `hlt`, no host CPU) until an interrupt arrives; at once if
/// one arrived since the last [`take_pending`]. Returns the lines that
/// interrupted (empty after a spurious wakeup).
pub fn wait() -> u32 {
    boot::ring0_call(boot::SYS_WAIT_IRQ);
    take_pending()
}
