//! Guest memory as devices see it.

pub use vm_memory::GuestMemoryMmap;

/// Anonymous guest memory of `mib` MiB at guest address 0, for unit tests and fuzz targets that
/// drive devices without a VM.
#[cfg(any(test, feature = "fuzzing"))]
pub fn test_memory(mib: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), (mib << 20) as usize)])
        .expect("anonymous guest memory")
}
