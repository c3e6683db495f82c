//! Panic handler: print the panic over COM1 and report failure on the exit port.
use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::uart::force_unlock();
    crate::println!("bexar-rt: FAIL panic: {}", info);
    crate::exit::exit(crate::exit::EXIT_PANIC)
}
