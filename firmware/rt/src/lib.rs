//! `rt`: the freestanding runtime shared by Bexar guest programs.
//!
//! Ring 0 is only the assembly in [`boot`]; everything else runs in ring 3
//! (CPL3, RFLAGS.IOPL=3) where port I/O and MMIO work and code runs
//! natively on PVM. A program provides its entry with [`entry!`]:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! rt::entry!(main);
//! fn main(bp: rt::bootparams::BootParams) -> ! { rt::exit::exit(0) }
//! ```
#![no_std]

pub mod arch;
pub mod boot;
pub mod bootparams;
pub mod dma;
pub mod exit;
pub mod irq;
pub mod mem;
pub mod mptable;
pub mod panic;
pub mod smp;
pub mod uart;
pub mod virtio;

pub use boot::MAX_CPUS;

/// Define the program's ring-3 entry point: `fn(BootParams) -> !`, called
/// on the BSP once it reached ring 3 (the UART is initialised, .bss zeroed).
#[macro_export]
macro_rules! entry {
    ($path:path) => {
        #[no_mangle]
        pub extern "C" fn __rt_user_main(bp: $crate::bootparams::BootParams) -> ! {
            let f: fn($crate::bootparams::BootParams) -> ! = $path;
            f(bp)
        }
    };
}

unsafe extern "C" {
    fn __rt_user_main(bp: bootparams::BootParams) -> !;
}

/// Ring-3 entry of the BSP (called from the assembly shim).
pub(crate) extern "C" fn __rt_bsp_main(boot_params: usize) -> ! {
    let bp = bootparams::BootParams::from_addr(boot_params);
    dma::init(&bp);
    unsafe { __rt_user_main(bp) }
}

/// Ring-3 entry of an AP (called from the assembly shim), `index` >= 1.
pub(crate) extern "C" fn __rt_ap_main(index: usize) -> ! {
    smp::ap_run(index)
}
