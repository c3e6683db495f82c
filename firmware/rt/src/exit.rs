//! Ending the VM: the exit port (0xf4) and the i8042 reset line.
use crate::arch::{outb, outl};

/// The VMM's exit port: a 32-bit `out` of a status ends the VM.
pub const EXIT_PORT: u16 = 0xf4;
/// Status codes used by the runtime itself (programs define the rest).
pub const EXIT_PASS: u32 = 0;
pub const EXIT_PANIC: u32 = 2;

/// Report `code` on the exit port (0 = pass). If the VMM goes on running
/// this CPU, it is halted.
pub fn exit(code: u32) -> ! {
    outl(EXIT_PORT, code);
    crate::boot::halt()
}

/// Pulse the reset line through the i8042 controller (port 0x64 <- 0xFE).
/// Returns only if the VMM did not act on it.
pub fn reset() {
    outb(0x64, 0xfe);
}
