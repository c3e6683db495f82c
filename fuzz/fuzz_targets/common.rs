//! What both fuzz targets share: one small disk image and one guest memory per process.

use std::sync::OnceLock;

use bexar::devices::virtio::block::DiskConfig;
use bexar::vmm::memory::{create_guest_memory, GuestRam};

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
pub fn ram() -> &'static GuestRam {
    static R: OnceLock<GuestRam> = OnceLock::new();
    R.get_or_init(|| create_guest_memory(2).unwrap())
}
