//! `idle`: a guest that costs the host no CPU while nothing happens. It
//! routes COM1 (IRQ 4) and the i8042 keyboard (IRQ 1) through the IOAPIC,
//! prints `idle: ready` and sleeps in a ring-0 `hlt` between interrupts
//! (`rt::irq`). COM1 input is echoed back byte for byte; Ctrl+Alt+Del from
//! the keyboard (the VMM's graceful stop) ends the test with PASS.
use crate::{TestResult, P};
use rt::arch::{inb, outb};
use rt::bootparams::BootParams;
use rt::mptable::MpTable;
use rt::{irq, println, uart};

const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;
const I8042_CMD: u16 = 0x64;
const STS_OBF: u8 = 0x01;
const STS_AUXDATA: u8 = 0x20;
const CTL_KBD_INT: u8 = 0x01;
const CTL_KBD_DISABLE: u8 = 0x10;

/// Set-1 scancodes.
const SC_EXTENDED: u8 = 0xe0;
const SC_BREAK: u8 = 0x80;
const SC_CTRL: u8 = 0x1d;
const SC_ALT: u8 = 0x38;
const SC_DEL: u8 = 0x53;

/// Modifier state from the set-1 scancode stream (left and right keys alike).
#[derive(Default)]
pub(crate) struct Keys {
    extended: bool,
    ctrl: bool,
    alt: bool,
}

impl Keys {
    /// Feed one scancode; true when Del (either one) goes down with Ctrl and Alt held.
    fn feed(&mut self, sc: u8) -> bool {
        if sc == SC_EXTENDED {
            self.extended = true;
            return false;
        }
        self.extended = false;
        let down = sc & SC_BREAK == 0;
        match sc & !SC_BREAK {
            SC_CTRL => self.ctrl = down,
            SC_ALT => self.alt = down,
            SC_DEL => return down && self.ctrl && self.alt,
            _ => {}
        }
        false
    }
}

/// Waits a bounded time for the i8042 output buffer, then reads it.
fn i8042_read() -> Option<u8> {
    for _ in 0..1000 {
        if inb(I8042_STATUS) & STS_OBF != 0 {
            return Some(inb(I8042_DATA));
        }
    }
    None
}

/// The first IOAPIC of the MP table (the usual address without one).
pub(crate) fn ioapic_addr() -> usize {
    match MpTable::find() {
        Ok(mp) => mp.ioapics().first().map(|io| io.addr as usize).unwrap_or(irq::IOAPIC_DEFAULT),
        Err(_) => irq::IOAPIC_DEFAULT,
    }
}

/// The keyboard interrupt on and the keyboard enabled in the i8042 control byte. The answer to
/// 0x20 may raise IRQ 1: call this before the pin is routed, so that edge is not kept.
pub(crate) fn keyboard_irq_on() {
    outb(I8042_CMD, 0x20);
    let ctl = i8042_read().unwrap_or(0);
    outb(I8042_CMD, 0x60);
    outb(I8042_DATA, (ctl | CTL_KBD_INT) & !CTL_KBD_DISABLE);
}

/// Read every waiting keyboard byte; true once Ctrl+Alt+Del went down.
pub(crate) fn keyboard_ctrl_alt_del(keys: &mut Keys) -> bool {
    loop {
        let status = inb(I8042_STATUS);
        if status & STS_OBF == 0 {
            return false;
        }
        let sc = inb(I8042_DATA);
        if status & STS_AUXDATA == 0 && keys.feed(sc) {
            return true;
        }
    }
}

pub fn test_idle(_: &BootParams) -> TestResult {
    let ioapic = ioapic_addr();
    irq::lapic_enable();
    keyboard_irq_on();
    irq::route_isa_irq(ioapic, irq::IRQ_KEYBOARD);
    irq::route_isa_irq(ioapic, irq::IRQ_COM1);
    uart::enable_rx_interrupt();
    println!(
        "{P}: idle: ready (ioapic {ioapic:#x}, vectors {:#x} keyboard, {:#x} com1)",
        irq::VECTOR_BASE + irq::IRQ_KEYBOARD,
        irq::VECTOR_BASE + irq::IRQ_COM1
    );

    let mut keys = Keys::default();
    let (mut wakeups, mut echoed) = (0u64, 0u64);
    // Both devices are looked at once before the first sleep: input that arrived before the
    // interrupts were on raised none.
    let mut pending = (1 << irq::IRQ_COM1) | (1 << irq::IRQ_KEYBOARD);
    loop {
        if pending & (1 << irq::IRQ_COM1) != 0 {
            while let Some(b) = uart::try_getb() {
                uart::putb(b);
                echoed += 1;
            }
        }
        if pending & (1 << irq::IRQ_KEYBOARD) != 0 && keyboard_ctrl_alt_del(&mut keys) {
            println!("{P}: idle: {wakeups} wakeups, {echoed} bytes echoed");
            println!("{P}: idle: ctrl-alt-del, shutting down");
            irq::mask_isa_irq(ioapic, irq::IRQ_KEYBOARD);
            irq::mask_isa_irq(ioapic, irq::IRQ_COM1);
            return Ok(());
        }
        pending = irq::wait();
        wakeups += 1;
    }
}
