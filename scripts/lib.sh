# Sourced by the other scripts.
#
# bexar is built as one static, non-PIE executable (glibc's static libc): one file to copy to a
# host, and, measured with benches/boot.rs, ~0.4 ms less from exec to main and ~1 MiB less
# resident memory per VMM process than a dynamic PIE (no loader, no libraries to map, no
# relocations to apply). The flags go through the environment of these cargo calls only, because
# a config file would also reach the firmware, which has flags of its own. A plain
# `cargo build` still works and makes a dynamic binary.
BEXAR_TARGET=x86_64-unknown-linux-gnu
BEXAR_BIN="target/${BEXAR_TARGET}/release/bexar"

bexar_cargo() {
  CARGO_BUILD_TARGET="${BEXAR_TARGET}" \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
    cargo "$@"
}
