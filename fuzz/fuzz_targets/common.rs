//! What the fuzz targets share: one small disk image and one guest memory per process.
#![allow(dead_code)] // not every target uses every piece

use std::sync::OnceLock;

use bexar_devices::block::DiskConfig;
use bexar_devices::memory::{test_memory, GuestMemoryMmap};

/// A 64 KiB raw image in the temporary directory.
pub fn disk() -> &'static DiskConfig {
    static D: OnceLock<DiskConfig> = OnceLock::new();
    D.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("bexar-fuzz-{}.img", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 * 1024)
            .unwrap();
        DiskConfig {
            path,
            ..Default::default()
        }
    })
}

/// 2 MiB of guest memory.
pub fn mem() -> &'static GuestMemoryMmap {
    static M: OnceLock<GuestMemoryMmap> = OnceLock::new();
    M.get_or_init(|| test_memory(2))
}
