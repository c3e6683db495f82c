//! The two small legacy port devices: the i8042 keyboard controller (its reset line ends the VM,
//! its keyboard lets the host send Ctrl+Alt+Del) and the exit port a test guest writes its status
//! code to. Like vm-superio's devices they know nothing of the VMM: the i8042 raises its
//! interrupt and its reset line through [`Trigger`]s, the exit port hands the status to a
//! callback.

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use super::bus::BusDevice;

/// Port of the i8042 data register; the command register is at +4.
pub const I8042_BASE: u64 = 0x60;
/// Length of the i8042 range (0x60..=0x64).
pub const I8042_LEN: u64 = 5;
/// The i8042's keyboard interrupt (ISA IRQ 1, GSI 1).
pub const I8042_KBD_IRQ: u32 = 1;
/// The exit port: a write of a 1, 2 or 4 byte status ends the VM.
pub const EXIT_PORT: u64 = 0xf4;
/// Width of the exit port.
pub const EXIT_PORT_LEN: u64 = 4;

/// Offsets in the i8042 range.
const DATA: u64 = 0;
const COMMAND: u64 = 4;

/// Status register bits (port 0x64, read).
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
/// The last write went to the command port.
const STS_CMD: u8 = 0x08;
/// Keyboard not inhibited by the key lock.
const STS_UNLOCKED: u8 = 0x10;
/// The byte in the output buffer came from the aux (mouse) side.
const STS_AUXDATA: u8 = 0x20;

/// Control byte bits (controller commands 0x20 / 0x60).
const CTL_KBD_INT: u8 = 0x01;
const CTL_SYS: u8 = 0x04;
const CTL_KBD_DISABLE: u8 = 0x10;
const CTL_AUX_DISABLE: u8 = 0x20;
const CTL_XLATE: u8 = 0x40;
/// After "firmware": keyboard interrupt on, POST passed, set-2 to set-1 translation on (what a PC
/// BIOS leaves behind, so Linux's atkbd expects set-1 scancodes), aux port disabled (absent).
const CTL_DEFAULT: u8 = CTL_KBD_INT | CTL_SYS | CTL_AUX_DISABLE | CTL_XLATE;

/// Output port bits (controller commands 0xd0 / 0xd1): bit 0 low holds the CPU in reset.
const OUTP_RESET_OFF: u8 = 0x01;
const OUTP_A20: u8 = 0x02;

/// Keyboard answers.
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;
/// A standard MF2 keyboard's identity (the answer to 0xf2 after the ACK).
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Bytes the controller can hold for the guest. A guest that never reads, or a host that keeps
/// sending, finds it full: further bytes are dropped, memory never grows.
pub const I8042_BUFFER: usize = 16;

/// Set-1 scancodes of Ctrl+Alt+Del pressed and released: Ctrl, Alt, Del (extended) down, then
/// the same keys up in reverse order.
const CTRL_ALT_DEL: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// The i8042 keyboard controller with a keyboard and no aux (mouse) port.
///
/// A small model of what guests use: the status and data registers, the controller commands
/// Linux's i8042 driver sends while probing, the keyboard commands atkbd sends, the CPU-reset line
/// (command 0xfe, or bit 0 cleared through the output port) and Ctrl+Alt+Del from the host.
/// Every access completes at once (the input buffer is never full). Bytes for the guest wait in a
/// bounded output buffer; IRQ 1 is raised through `irq` (an irqfd on GSI 1) whenever a keyboard
/// byte becomes readable while the control byte enables the keyboard interrupt. Aux is absent:
/// 0xa8 leaves the aux port disabled and the aux interface test (0xa9) reports a stuck clock, so
/// Linux decides there is no mouse without waiting for a timeout; 0xd3 (write the aux output
/// buffer) still loops its byte back as aux data, as every PS/2 controller does, without an IRQ 12.
pub struct I8042<I: Trigger, R: Trigger> {
    irq: I,
    reset: R,
    control: u8,
    output_port: u8,
    /// Controller command waiting for its data byte on port 0x60.
    pending_cmd: Option<u8>,
    /// Keyboard command waiting for its argument byte (0xed, 0xf0, 0xf3).
    pending_kbd: Option<u8>,
    /// Output buffer ring: bytes and, per slot, whether it is aux data.
    buf: [u8; I8042_BUFFER],
    aux: [bool; I8042_BUFFER],
    head: usize,
    len: usize,
    /// What the data register reads when the buffer is empty: the last byte read.
    last: u8,
    /// Status bit 3: the last write went to the command port.
    last_was_cmd: bool,
}

/// Everything an i8042 remembers, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The control byte.
    pub control: u8,
    /// The output port.
    pub output_port: u8,
    /// Controller command waiting for its data byte.
    pub pending_cmd: Option<u8>,
    /// Keyboard command waiting for its argument.
    pub pending_kbd: Option<u8>,
    /// Bytes waiting for the guest, oldest first, each with whether it is aux data.
    pub output: Vec<(u8, bool)>,
    /// What the data register reads when the buffer is empty.
    pub last: u8,
    /// Whether the last write went to the command port.
    pub last_was_cmd: bool,
}

/// A saved i8042 state that cannot be applied.
#[derive(Debug, thiserror::Error)]
#[error("invalid i8042 state: {0} bytes in a {I8042_BUFFER}-byte buffer")]
pub struct I8042StateError(usize);

impl<I: Trigger, R: Trigger> I8042<I, R> {
    /// The controller's state.
    pub fn state(&self) -> I8042State {
        I8042State {
            control: self.control,
            output_port: self.output_port,
            pending_cmd: self.pending_cmd,
            pending_kbd: self.pending_kbd,
            output: (0..self.len)
                .map(|i| {
                    let slot = (self.head + i) % I8042_BUFFER;
                    (self.buf[slot], self.aux[slot])
                })
                .collect(),
            last: self.last,
            last_was_cmd: self.last_was_cmd,
        }
    }

    /// Puts the controller in `state` (its lines stay). Refused, changing nothing, if the
    /// state holds more bytes than the buffer does. No interrupt is raised: one that was
    /// pending is part of the interrupt controller's state, not the i8042's.
    pub fn restore(&mut self, state: &I8042State) -> Result<(), I8042StateError> {
        if state.output.len() > I8042_BUFFER {
            return Err(I8042StateError(state.output.len()));
        }
        self.control = state.control | CTL_AUX_DISABLE;
        self.output_port = state.output_port;
        self.pending_cmd = state.pending_cmd;
        self.pending_kbd = state.pending_kbd;
        self.head = 0;
        self.len = state.output.len();
        for (i, &(b, aux)) in state.output.iter().enumerate() {
            self.buf[i] = b;
            self.aux[i] = aux;
        }
        self.last = state.last;
        self.last_was_cmd = state.last_was_cmd;
        Ok(())
    }

    /// A controller that raises IRQ 1 through `irq` (for a VMM, an irqfd on GSI
    /// [`I8042_KBD_IRQ`]) and pulls `reset` when the guest resets the CPU.
    pub fn new(irq: I, reset: R) -> Self {
        Self {
            irq,
            reset,
            control: CTL_DEFAULT,
            output_port: OUTP_RESET_OFF | OUTP_A20,
            pending_cmd: None,
            pending_kbd: None,
            buf: [0; I8042_BUFFER],
            aux: [false; I8042_BUFFER],
            head: 0,
            len: 0,
            last: 0,
            last_was_cmd: false,
        }
    }

    /// Queues Ctrl+Alt+Del (make and break codes, scancode set 1) for the guest and raises the
    /// keyboard interrupt (at once if the buffer was empty, else when the guest has read the
    /// bytes before them). False if the output buffer had no room for all of it (nothing is
    /// queued then). The keys are queued whatever the guest did to the keyboard (disabled
    /// scanning, masked interrupt): a guest that later reads the buffer still sees them.
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        self.push(&CTRL_ALT_DEL, false)
    }

    /// The status register.
    fn status(&self) -> u8 {
        let mut s = STS_SYS | STS_UNLOCKED;
        if self.len > 0 {
            s |= STS_OBF;
            if self.aux[self.head] {
                s |= STS_AUXDATA;
            }
        }
        if self.last_was_cmd {
            s |= STS_CMD;
        }
        s
    }

    /// Appends `bytes` to the output buffer, all or nothing, and raises IRQ 1 if they made a
    /// keyboard byte readable. False (nothing queued) if they do not fit.
    fn push(&mut self, bytes: &[u8], aux: bool) -> bool {
        if bytes.len() > I8042_BUFFER - self.len {
            return false;
        }
        let was_empty = self.len == 0;
        for &b in bytes {
            let slot = (self.head + self.len) % I8042_BUFFER;
            self.buf[slot] = b;
            self.aux[slot] = aux;
            self.len += 1;
        }
        if was_empty {
            self.head_interrupt();
        }
        true
    }

    /// Raises IRQ 1 if the byte at the head of the buffer is keyboard data and the keyboard
    /// interrupt is enabled (aux data would be IRQ 12, which is not wired).
    fn head_interrupt(&self) {
        if self.len > 0 && !self.aux[self.head] && self.control & CTL_KBD_INT != 0 {
            // A full eventfd counter (2^64 - 2 pending writes) cannot happen for an irqfd that
            // KVM drains; nothing useful to do with an error here anyway.
            let _ = self.irq.trigger();
        }
    }

    /// A data register read: the next byte, or the last one again if the buffer is empty. If
    /// more bytes wait, the interrupt is raised again for the next one.
    fn read_data(&mut self) -> u8 {
        if self.len > 0 {
            self.last = self.buf[self.head];
            self.head = (self.head + 1) % I8042_BUFFER;
            self.len -= 1;
            self.head_interrupt();
        }
        self.last
    }

    fn set_control(&mut self, v: u8) {
        let was_enabled = self.control & CTL_KBD_INT != 0;
        // Aux is absent: its port stays disabled whatever the guest writes.
        self.control = v | CTL_AUX_DISABLE;
        if !was_enabled {
            self.head_interrupt();
        }
    }

    fn pulse_reset(&self) {
        if let Err(e) = self.reset.trigger() {
            tracing::warn!("i8042: the reset line failed: {e:?}");
        }
    }

    /// A controller command (port 0x64).
    fn command(&mut self, cmd: u8) {
        self.pending_cmd = None;
        match cmd {
            // Read the control byte (RAM byte 0); other RAM bytes read as 0.
            0x20 => {
                self.push(&[self.control], false);
            }
            0x21..=0x3f => {
                self.push(&[0], false);
            }
            // Write the control byte / a RAM byte, or the output port; write the keyboard or
            // aux output buffer; send a byte to the aux device: the data byte follows.
            0x60..=0x7f | 0xd1..=0xd4 => self.pending_cmd = Some(cmd),
            0xa7 => self.control |= CTL_AUX_DISABLE,
            // Enable aux: there is none, so it stays disabled (that is how Linux tells).
            0xa8 => {}
            // Aux interface test: 0x01, clock line stuck low.
            0xa9 => {
                self.push(&[0x01], false);
            }
            // Controller self test passed.
            0xaa => {
                self.push(&[0x55], false);
            }
            // Keyboard interface test passed.
            0xab => {
                self.push(&[0x00], false);
            }
            0xad => self.control |= CTL_KBD_DISABLE,
            0xae => self.control &= !CTL_KBD_DISABLE,
            // Read the input port: keyboard not inhibited.
            0xc0 => {
                self.push(&[0x80], false);
            }
            0xd0 => {
                self.push(&[self.output_port], false);
            }
            // Pulse output lines: a 0 bit in the low nibble pulses that line; bit 0 is reset.
            0xf0..=0xff if cmd & 1 == 0 => self.pulse_reset(),
            // Anything else (versions, passwords, test inputs, ...): ignored.
            _ => {}
        }
    }

    /// A data byte (port 0x60): the argument of a controller command, else a byte for the
    /// keyboard.
    fn data(&mut self, v: u8) {
        match self.pending_cmd.take() {
            Some(0x60) => self.set_control(v),
            // Other RAM bytes: accepted and forgotten.
            Some(0x61..=0x7f) => {}
            Some(0xd1) => {
                self.output_port = v;
                if v & OUTP_RESET_OFF == 0 {
                    self.pulse_reset();
                }
            }
            Some(0xd2) => {
                self.push(&[v], false);
            }
            Some(0xd3) => {
                self.push(&[v], true);
            }
            // To the aux device: there is none, the byte is lost.
            Some(_) => {}
            None => self.keyboard(v),
        }
    }

    /// A byte for the keyboard: a command or the argument of the previous one.
    fn keyboard(&mut self, v: u8) {
        if let Some(cmd) = self.pending_kbd.take() {
            if cmd == 0xf0 && v == 0 {
                // Get the scancode set: 2, as the controller's translation shows it (0x41).
                let set = if self.control & CTL_XLATE != 0 {
                    0x41
                } else {
                    0x02
                };
                self.push(&[KBD_ACK, set], false);
            } else {
                self.push(&[KBD_ACK], false);
            }
            return;
        }
        match v {
            // Set LEDs, set/get the scancode set, set typematic rate: an argument follows.
            0xed | 0xf0 | 0xf3 => {
                self.pending_kbd = Some(v);
                self.push(&[KBD_ACK], false);
            }
            0xee => {
                self.push(&[KBD_ECHO], false);
            }
            0xf2 => {
                self.push(&[KBD_ACK, KBD_ID[0], KBD_ID[1]], false);
            }
            // Reset: acknowledged, then the basic assurance test passed.
            0xff => {
                self.push(&[KBD_ACK, KBD_SELF_TEST_OK], false);
            }
            // Enable/disable scanning (there are no keys to scan: only the host's
            // Ctrl+Alt+Del, which is queued either way), set defaults, the set-3 key modes,
            // resend, unknown bytes: acknowledged.
            _ => {
                self.push(&[KBD_ACK], false);
            }
        }
    }
}

impl<I: Trigger + Send, R: Trigger + Send> BusDevice for I8042<I, R> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            DATA => self.read_data(),
            COMMAND => self.status(),
            // 0x61-0x63 (system control port B and friends) are not ours to model.
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            DATA => {
                self.last_was_cmd = false;
                self.data(v);
            }
            COMMAND => {
                self.last_was_cmd = true;
                self.command(v);
            }
            _ => {}
        }
    }
}

/// The exit port device: a write of 1, 2 or 4 bytes at offset 0 hands the value to its callback.
pub struct ExitPort<F: FnMut(u32)>(pub F);

impl<F: FnMut(u32) + Send> BusDevice for ExitPort<F> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        (self.0)(u32::from_le_bytes(v));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A line that counts how often it was pulled.
    #[derive(Clone, Default)]
    struct Line(Arc<AtomicU64>);

    impl Trigger for Line {
        type E = std::convert::Infallible;
        fn trigger(&self) -> Result<(), Self::E> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    impl Line {
        /// Pulls since the last call.
        fn take(&self) -> u64 {
            self.0.swap(0, Ordering::Relaxed)
        }
    }

    type Dev = I8042<Line, Line>;

    /// A controller, its interrupt line and its reset line.
    fn device() -> (Dev, Line, Line) {
        let (irq, reset) = (Line::default(), Line::default());
        (I8042::new(irq.clone(), reset.clone()), irq, reset)
    }

    fn inb(d: &mut Dev, offset: u64) -> u8 {
        let mut b = [0xa5u8];
        d.read(offset, &mut b);
        b[0]
    }

    fn outb(d: &mut Dev, offset: u64, v: u8) {
        d.write(offset, &[v]);
    }

    /// Interrupts signalled since the last call.
    fn irqs(line: &Line) -> u64 {
        line.take()
    }

    /// Reads every byte the status register says is there.
    fn drain(d: &mut Dev) -> Vec<u8> {
        let mut v = Vec::new();
        while inb(d, COMMAND) & STS_OBF != 0 {
            v.push(inb(d, DATA));
            assert!(v.len() <= I8042_BUFFER, "more bytes than the buffer holds");
        }
        v
    }

    #[test]
    fn reset_command_ends_the_vm() {
        let (mut d, _irq, reset) = device();
        outb(&mut d, COMMAND, 0xfe);
        assert_eq!(reset.take(), 1);
        // Through the output port too (bit 0 low), but not when it keeps bit 0 high (A20 gate).
        outb(&mut d, COMMAND, 0xd1);
        outb(&mut d, DATA, 0xdf);
        assert_eq!(reset.take(), 0);
        outb(&mut d, COMMAND, 0xd1);
        outb(&mut d, DATA, 0xde);
        assert_eq!(reset.take(), 1);
        // 0xff pulses no line.
        outb(&mut d, COMMAND, 0xff);
        assert_eq!(reset.take(), 0);
    }

    #[test]
    fn ctrl_alt_del_comes_out_in_order_with_obf_and_irq() {
        let (mut d, irq, _reset) = device();
        assert_eq!(inb(&mut d, COMMAND) & STS_OBF, 0);
        assert_eq!(irqs(&irq), 0);
        assert!(d.send_ctrl_alt_del());
        assert_ne!(inb(&mut d, COMMAND) & STS_OBF, 0);
        assert_eq!(inb(&mut d, COMMAND) & STS_AUXDATA, 0);
        assert_eq!(irqs(&irq), 1);
        let mut got = Vec::new();
        for i in 0..CTRL_ALT_DEL.len() {
            assert_ne!(inb(&mut d, COMMAND) & STS_OBF, 0);
            got.push(inb(&mut d, DATA));
            // Another interrupt for every byte still waiting.
            let more = i + 1 < CTRL_ALT_DEL.len();
            assert_eq!(irqs(&irq), u64::from(more), "after byte {i}");
        }
        assert_eq!(got, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        assert_eq!(inb(&mut d, COMMAND) & STS_OBF, 0);
        // An empty buffer reads the last byte again and raises nothing.
        assert_eq!(inb(&mut d, DATA), 0x9d);
        assert_eq!(irqs(&irq), 0);
    }

    #[test]
    fn no_interrupt_while_the_control_byte_masks_it() {
        let (mut d, irq, _reset) = device();
        outb(&mut d, COMMAND, 0x60);
        outb(&mut d, DATA, CTL_SYS | CTL_XLATE);
        assert!(d.send_ctrl_alt_del());
        assert_eq!(irqs(&irq), 0);
        assert_eq!(inb(&mut d, DATA), 0x1d);
        assert_eq!(irqs(&irq), 0);
        // Enabling it with bytes waiting raises it at once.
        outb(&mut d, COMMAND, 0x60);
        outb(&mut d, DATA, CTL_KBD_INT | CTL_SYS | CTL_XLATE);
        assert_eq!(irqs(&irq), 1);
        assert_eq!(drain(&mut d), [0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
    }

    #[test]
    fn the_buffer_is_bounded() {
        let (mut d, _irq, _reset) = device();
        assert!(d.send_ctrl_alt_del());
        assert!(d.send_ctrl_alt_del());
        // 16 bytes queued: a third sequence does not fit and queues nothing.
        assert!(!d.send_ctrl_alt_del());
        // A guest flooding keyboard commands cannot grow it either.
        for _ in 0..1000 {
            outb(&mut d, DATA, 0xf2);
            outb(&mut d, COMMAND, 0xaa);
        }
        let got = drain(&mut d);
        assert_eq!(got.len(), I8042_BUFFER);
        assert_eq!(&got[..8], &CTRL_ALT_DEL);
        assert_eq!(&got[8..], &CTRL_ALT_DEL);
        // Room again.
        assert!(d.send_ctrl_alt_del());
    }

    #[test]
    fn probe_commands_answer_like_linux_expects() {
        let (mut d, _irq, _reset) = device();
        let cmd = |d: &mut Dev, c: u8, arg: Option<u8>| {
            outb(d, COMMAND, c);
            if let Some(a) = arg {
                outb(d, DATA, a);
            }
            drain(d)
        };
        assert_eq!(cmd(&mut d, 0xaa, None), [0x55]);
        assert_eq!(cmd(&mut d, 0xab, None), [0x00]);
        assert_eq!(cmd(&mut d, 0x20, None), [CTL_DEFAULT]);
        assert_ne!(inb(&mut d, COMMAND) & STS_SYS, 0);
        assert_ne!(inb(&mut d, COMMAND) & STS_CMD, 0);
        // Write the control byte and read it back (the aux port stays disabled).
        assert!(cmd(&mut d, 0x60, Some(0x01)).is_empty());
        assert_eq!(cmd(&mut d, 0x20, None), [0x01 | CTL_AUX_DISABLE]);
        // Aux loop-back: the byte comes back flagged as aux data, with no IRQ 1.
        outb(&mut d, COMMAND, 0xd3);
        outb(&mut d, DATA, 0x5a);
        assert_eq!(
            inb(&mut d, COMMAND) & (STS_OBF | STS_AUXDATA),
            STS_OBF | STS_AUXDATA
        );
        assert_eq!(inb(&mut d, DATA), 0x5a);
        // Aux cannot be enabled.
        assert!(cmd(&mut d, 0xa7, None).is_empty());
        assert!(cmd(&mut d, 0xa8, None).is_empty());
        assert_ne!(cmd(&mut d, 0x20, None)[0] & CTL_AUX_DISABLE, 0);
        assert_eq!(cmd(&mut d, 0xa9, None), [0x01]);
        // 0xd4 swallows its byte: it is not a keyboard command.
        assert!(cmd(&mut d, 0xd4, Some(0xff)).is_empty());
        // Keyboard disable/enable in the control byte.
        cmd(&mut d, 0xad, None);
        assert_ne!(cmd(&mut d, 0x20, None)[0] & CTL_KBD_DISABLE, 0);
        cmd(&mut d, 0xae, None);
        assert_eq!(cmd(&mut d, 0x20, None)[0] & CTL_KBD_DISABLE, 0);
        // Keyboard commands.
        let kbd = |d: &mut Dev, bytes: &[u8]| {
            for &b in bytes {
                outb(d, DATA, b);
            }
            assert_eq!(inb(d, COMMAND) & STS_CMD, 0);
            drain(d)
        };
        assert_eq!(kbd(&mut d, &[0xff]), [0xfa, 0xaa]);
        assert_eq!(kbd(&mut d, &[0xf2]), [0xfa, 0xab, 0x83]);
        assert_eq!(kbd(&mut d, &[0xf5]), [0xfa]);
        assert_eq!(kbd(&mut d, &[0xf4]), [0xfa]);
        assert_eq!(kbd(&mut d, &[0xed, 0x07]), [0xfa, 0xfa]);
        assert_eq!(kbd(&mut d, &[0xf3, 0x00]), [0xfa, 0xfa]);
        // The control byte written above turned translation off: set 2 shows as 2.
        assert_eq!(kbd(&mut d, &[0xf0, 0x00]), [0xfa, 0xfa, 0x02]);
        assert_eq!(kbd(&mut d, &[0xee]), [0xee]);
    }

    #[test]
    fn arbitrary_accesses_never_panic_and_stay_bounded() {
        let (mut d, irq, _reset) = device();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = [0u8; 16];
        for i in 0..200_000u32 {
            let r = next();
            let offset = match r & 3 {
                0 => DATA,
                1 => COMMAND,
                2 => (r >> 8) % 8,
                _ => r >> 8,
            };
            let len = ((r >> 16) % 9) as usize;
            if r & 0x8000_0000 != 0 {
                d.read(offset, &mut buf[..len]);
                assert!(buf[1..len.max(1)].iter().all(|&b| b == 0));
            } else {
                for b in &mut buf[..len] {
                    *b = next() as u8;
                }
                d.write(offset, &buf[..len]);
            }
            if i % 97 == 0 {
                d.send_ctrl_alt_del();
            }
            assert!(d.len <= I8042_BUFFER);
            assert!(d.head < I8042_BUFFER);
        }
        let _ = irqs(&irq);
        // Still a working controller afterwards.
        drain(&mut d);
        outb(&mut d, COMMAND, 0xaa);
        assert_eq!(drain(&mut d), [0x55]);
    }

    #[test]
    fn state_round_trips_mid_conversation() {
        let (mut d, irq, _reset) = device();
        // Mid-way: a control-byte write waiting for its data byte, a keyboard command waiting
        // for its argument, Ctrl+Alt+Del half read, an aux byte queued behind it.
        assert!(d.send_ctrl_alt_del());
        assert_eq!(inb(&mut d, DATA), 0x1d);
        outb(&mut d, COMMAND, 0xd3);
        outb(&mut d, DATA, 0x77);
        outb(&mut d, DATA, 0xf0);
        outb(&mut d, COMMAND, 0x60);
        let saved = d.state();
        assert_eq!(saved.pending_cmd, Some(0x60));
        let json = serde_json::to_string(&saved).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();

        let (mut d2, irq2, _) = device();
        d2.restore(&back).unwrap();
        assert_eq!(d2.state(), saved);
        let _ = (irqs(&irq), irqs(&irq2));
        // Both controllers now behave identically from here on.
        for dev in [&mut d, &mut d2] {
            outb(dev, DATA, 0x01); // the control byte: keyboard interrupt on, no translation
            let rest = drain(dev);
            assert_eq!(rest, [0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d, 0x77, 0xfa]);
            assert_eq!(cmd_byte(dev), 0x01 | CTL_AUX_DISABLE);
        }
        // A state with too many bytes is refused and changes nothing.
        let mut bad = saved.clone();
        bad.output = vec![(0, false); I8042_BUFFER + 1];
        assert!(d2.restore(&bad).is_err());
        assert_eq!(cmd_byte(&mut d2), 0x01 | CTL_AUX_DISABLE);
    }

    fn cmd_byte(d: &mut Dev) -> u8 {
        outb(d, COMMAND, 0x20);
        inb(d, DATA)
    }

    #[test]
    fn exit_port_reports_the_status() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut p = ExitPort(move |code| tx.send(code).unwrap());
        p.write(0, &[7, 0, 0, 0]);
        assert_eq!(rx.try_recv(), Ok(7));
        p.write(0, &[9]);
        assert_eq!(rx.try_recv(), Ok(9));
        p.write(1, &[7]);
        p.write(0, &[]);
        assert!(rx.try_recv().is_err());
    }
}
