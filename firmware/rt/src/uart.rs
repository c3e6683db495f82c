//! Polled 16550 UART on COM1 (0x3f8), used from ring 3 (IOPL=3); it can
//! also interrupt on received data (IRQ 4, see [`crate::irq`]).
use crate::arch::{inb, outb};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub const COM1: u16 = 0x3f8;
const THR: u16 = 0; // transmit holding (write) / receive buffer (read)
const IER: u16 = 1;
const IIR_FCR: u16 = 2; // interrupt identification (read) / FIFO control (write)
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_DATA_READY: u8 = 0x01;
const IER_RX_DATA: u8 = 0x01;
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT2: u8 = 0x08;
const LSR_THR_EMPTY: u8 = 0x20;

static LOCK: AtomicBool = AtomicBool::new(false);
/// Whether [`init`] ran: done on first use, so a guest that never prints pays no port I/O.
static READY: AtomicBool = AtomicBool::new(false);
/// Bytes that may be written after LSR.THRE reads 1 (16 with a 16550 FIFO).
static TX_BURST: AtomicUsize = AtomicUsize::new(1);
/// Bytes written since LSR.THRE was last seen set.
static TX_PENDING: AtomicUsize = AtomicUsize::new(usize::MAX);

/// No interrupts, 8N1, DTR|RTS (OUT2 off: no IRQ), FIFOs on. The baud
/// divisor is left alone (meaningless for a virtual UART). Port I/O may trap
/// to ring 0 (see `boot`), so the transmitter uses the FIFO: one LSR read
/// per 16 bytes when IIR reports the FIFOs enabled.
pub fn init() {
    READY.store(true, Ordering::Relaxed);
    outb(COM1 + IER, 0);
    outb(COM1 + LCR, 0x03);
    outb(COM1 + MCR, MCR_DTR | MCR_RTS);
    outb(COM1 + IIR_FCR, 0x07); // enable + clear both FIFOs
    let burst = if inb(COM1 + IIR_FCR) & 0xc0 == 0xc0 { 16 } else { 1 };
    TX_BURST.store(burst, Ordering::Relaxed);
    TX_PENDING.store(usize::MAX, Ordering::Relaxed);
}

/// Send one byte (waits a bounded time for room in the transmitter).
pub fn putb(b: u8) {
    ensure_init();
    let pending = TX_PENDING.load(Ordering::Relaxed);
    if pending >= TX_BURST.load(Ordering::Relaxed) {
        let mut n = 0u32;
        while inb(COM1 + LSR) & LSR_THR_EMPTY == 0 && n < 1_000_000 {
            core::hint::spin_loop();
            n += 1;
        }
        TX_PENDING.store(0, Ordering::Relaxed);
    }
    outb(COM1 + THR, b);
    TX_PENDING.store(TX_PENDING.load(Ordering::Relaxed).saturating_add(1), Ordering::Relaxed);
}

fn ensure_init() {
    if !READY.load(Ordering::Relaxed) {
        init();
    }
}

/// Writes `s` to THR as is: no initialisation, no LSR polling, no CR before LF. Only for the
/// start-up benchmark's trivial guest, on the VMM's UART (whose transmitter is always ready):
/// every port access is an exit, ~0.1 ms each on PVM.
pub fn write_raw(s: &[u8]) {
    for &b in s {
        outb(COM1 + THR, b);
    }
}

/// Is a received byte waiting?
pub fn rx_ready() -> bool {
    ensure_init();
    inb(COM1 + LSR) & LSR_DATA_READY != 0
}

/// The next received byte, if one is waiting.
pub fn try_getb() -> Option<u8> {
    if rx_ready() {
        Some(inb(COM1 + THR))
    } else {
        None
    }
}

/// Interrupt on received data (IER bit 0) and open the IRQ line (MCR.OUT2,
/// which gates it on a PC). The UART raises COM1's IRQ 4 whenever bytes
/// arrive; reading RBR acknowledges. See [`crate::irq`] for the routing.
pub fn enable_rx_interrupt() {
    ensure_init();
    outb(COM1 + IER, IER_RX_DATA);
    outb(COM1 + MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
}

/// Wait for and return one received byte.
pub fn getb() -> u8 {
    while !rx_ready() {
        core::hint::spin_loop();
    }
    inb(COM1 + THR)
}

pub fn write_bytes(s: &[u8]) {
    for &b in s {
        if b == b'\n' {
            putb(b'\r');
        }
        putb(b);
    }
}

/// Serialises console output between CPUs.
pub struct Console;

impl Console {
    pub fn lock() -> ConsoleGuard {
        let mut spins = 0u64;
        while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
            spins += 1;
            if spins > 2_000_000_000 {
                break; // a CPU died holding it: print anyway
            }
        }
        ConsoleGuard(())
    }
}

pub struct ConsoleGuard(());

impl Drop for ConsoleGuard {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

impl fmt::Write for ConsoleGuard {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Used by the panic handler: the panicking code may hold the lock.
pub fn force_unlock() {
    LOCK.store(false, Ordering::Release);
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    use fmt::Write;
    let mut g = Console::lock();
    let _ = g.write_fmt(args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::uart::_print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::uart::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::uart::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
