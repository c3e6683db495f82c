//! Memory for device rings and buffers: a bump allocator over the RAM above
//! the image (physical = virtual through the identity map, so any address it
//! returns can be handed to a device as is).
//!
//! The pool runs from the first page after the image to the end of the e820
//! RAM range that holds it (below the 32-bit MMIO gap, which the page tables leave
//! uncached) or the start of an initrd, whichever comes first. Allocations
//! are zeroed. `mark`/`release` give them back in LIFO order.
use crate::bootparams::{BootParams, E820_RAM};
use core::sync::atomic::{AtomicUsize, Ordering};

unsafe extern "C" {
    static __image_end: u8;
}

static NEXT: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);
static START: AtomicUsize = AtomicUsize::new(0);

/// Highest address the pool may reach (start of the uncached MMIO window).
const POOL_LIMIT: u64 = 0xc000_0000;

/// Set up the pool from the e820 map (the runtime calls this before `main`).
/// Returns the pool size in bytes (0 if no RAM follows the image).
pub fn init(bp: &BootParams) -> usize {
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let start = (image_end + 0xfff) & !0xfff;
    let mut end = 0u64;
    for e in bp.e820_iter() {
        if e.kind == E820_RAM && e.addr <= start && start < e.addr.saturating_add(e.size) {
            end = e.addr.saturating_add(e.size).min(POOL_LIMIT);
        }
    }
    if let Some((rd, rd_size)) = bp.ramdisk() {
        if rd + rd_size > start && rd < end {
            end = end.min(rd.max(start));
        }
    }
    let end = end.max(start);
    START.store(start as usize, Ordering::Relaxed);
    NEXT.store(start as usize, Ordering::Relaxed);
    END.store(end as usize, Ordering::Relaxed);
    (end - start) as usize
}

/// Bytes still free in the pool.
pub fn available() -> usize {
    END.load(Ordering::Relaxed).saturating_sub(NEXT.load(Ordering::Relaxed))
}

/// The pool's range as (start, end).
pub fn pool() -> (usize, usize) {
    (START.load(Ordering::Relaxed), END.load(Ordering::Relaxed))
}

/// `size` zeroed bytes aligned to `align` (a power of two), or None when the
/// pool is exhausted.
pub fn alloc(size: usize, align: usize) -> Option<*mut u8> {
    let align = align.max(1);
    let mut cur = NEXT.load(Ordering::Relaxed);
    loop {
        if cur == 0 {
            return None; // not initialised
        }
        let addr = cur.checked_add(align - 1)? & !(align - 1);
        let new = addr.checked_add(size)?;
        if new > END.load(Ordering::Relaxed) {
            return None;
        }
        match NEXT.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                let p = addr as *mut u8;
                unsafe { core::ptr::write_bytes(p, 0, size) };
                return Some(p);
            }
            Err(v) => cur = v,
        }
    }
}

/// A zeroed byte buffer of `len` bytes aligned to `align`.
pub fn alloc_bytes(len: usize, align: usize) -> Option<&'static mut [u8]> {
    let p = alloc(len, align)?;
    Some(unsafe { core::slice::from_raw_parts_mut(p, len) })
}

/// The current allocation point, for [`release`].
pub fn mark() -> usize {
    NEXT.load(Ordering::Relaxed)
}

/// Free everything allocated since `mark()` returned `m`.
///
/// # Safety
/// Nothing allocated after the mark may be used afterwards (by the program
/// or by a device: reset devices whose rings live there first).
pub unsafe fn release(m: usize) {
    let start = START.load(Ordering::Relaxed);
    if m >= start && m <= NEXT.load(Ordering::Relaxed) {
        NEXT.store(m, Ordering::Relaxed);
    }
}
