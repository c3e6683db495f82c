//! Panic handler: print the panic over COM1 and report failure on the exit port.
use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::uart::force_unlock();
    match info.location() {
        Some(l) => crate::println!("bexar-rt: FAIL panic at {}:{}: {}", l.file(), l.line(), info.message()),
        None => crate::println!("bexar-rt: FAIL panic: {}", info.message()),
    }
    crate::exit::exit(crate::exit::EXIT_PANIC)
}

/// With panic=abort nothing unwinds, but the prebuilt `core` of the host
/// target (built with unwinding) still references the personality routine
/// in builds without LTO (the dev profile).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
