//! The two small legacy port devices: the i8042 (its reset line ends the VM) and the exit port a
//! test guest writes its status code to.

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use crate::vmm::{ExitHandle, ExitReason};

/// Port of the i8042 data register; the command register is at +4.
pub const I8042_BASE: u64 = 0x60;
/// Length of the i8042 range (0x60..=0x64).
pub const I8042_LEN: u64 = 5;
/// The exit port: a write of a 1, 2 or 4 byte status ends the VM.
pub const EXIT_PORT: u64 = 0xf4;
/// Width of the exit port.
pub const EXIT_PORT_LEN: u64 = 4;

/// Turns the i8042's CPU-reset pulse into an orderly VM exit.
pub struct ResetLine(pub ExitHandle);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 on the bus.
pub struct I8042(pub I8042Device<ResetLine>);

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(off);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.0.write(off, *v);
        }
    }
}

/// The exit port device.
pub struct ExitPort(pub ExitHandle);

impl BusDevice for ExitPort {
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
        self.0
            .request(ExitReason::GuestStatus(u32::from_le_bytes(v)));
    }
}
