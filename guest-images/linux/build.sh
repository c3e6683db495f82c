#!/usr/bin/env bash
# Build Bexar's Linux guest image: vmlinux (with the PVH note), bzImage,
# initramfs.cpio (+ .cpio.gz), the final .config and the build log, into a content-addressed
# cache directory outside the repository:
#
#   ${BEXAR_CACHE_DIR:-/var/cache/bexar}/guest-images/linux-<16 hex>/
#
# The hash covers microvm.config, patches/*.patch, this script, init, and the
# Debian versions of linux-source-6.1 and busybox-static. If that directory
# exists the script does nothing. The LAST line of stdout is always the
# directory's absolute path; everything else goes to stderr or build.log:
#
#   dir=$(guest-images/linux/build.sh | tail -n1)
#
# Options:
#   --print-dir   print the directory that would be used, build nothing;
#                 exit 0 if it is already built, 1 if not.
# Environment:
#   BEXAR_CACHE_DIR    cache root (default /var/cache/bexar)
#   BEXAR_BUILD_JOBS   make -j value (default 2)
#   BEXAR_VERBOSE=1    also copy the build output to stderr
#
# Run as root when packages are missing (it apt-get installs them).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
CACHE=${BEXAR_CACHE_DIR:-/var/cache/bexar}
JOBS=${BEXAR_BUILD_JOBS:-2}
KSRC_PKG=linux-source-6.1
KSRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
BUSYBOX_PKG=busybox-static
PKGS=("$KSRC_PKG" "$BUSYBOX_PKG" build-essential bc bison flex libelf-dev libssl-dev
      cpio xz-utils gzip lz4 util-linux)

log() { printf 'guest-images/linux/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mode=build
case "${1:-}" in
    "") ;;
    --print-dir) mode=print ;;
    -h|--help) sed -n '2,24p' "$SELF" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (only --print-dir is accepted)" ;;
esac

# Absolute cache path (the printed directory must be absolute).
case "$CACHE" in /*) ;; *) CACHE="$(pwd)/$CACHE" ;; esac

pkg_version() {
    # Installed version, else the candidate apt would install, else "unknown".
    local v
    v=$(dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null || true)
    if [[ $v == installed\ * ]]; then echo "${v#installed }"; return; fi
    v=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [[ -n $v && $v != "(none)" ]] && echo "$v" || echo unknown
}

missing_pkgs() {
    local p
    for p in "${PKGS[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] || echo "$p"
    done
}

if [[ $mode == build ]]; then
    mapfile -t missing < <(missing_pkgs)
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || die "packages missing (${missing[*]}); run as root to install them"
        log "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update >&2
        apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
fi

# ---- content hash ------------------------------------------------------------
KSRC_VER=$(pkg_version "$KSRC_PKG")
BUSYBOX_VER=$(pkg_version "$BUSYBOX_PKG")
shopt -s nullglob
PATCHES=("$HERE"/patches/*.patch)
shopt -u nullglob
hash_inputs() {
    local f
    printf 'bexar-guest-linux v1\n%s %s\n%s %s\n' "$KSRC_PKG" "$KSRC_VER" "$BUSYBOX_PKG" "$BUSYBOX_VER"
    for f in "$HERE/microvm.config" "$SELF" "$HERE/init" "${PATCHES[@]}"; do
        printf '== %s\n' "${f#"$HERE"/}"
        cat "$f"
    done
}
HASH=$(hash_inputs | sha256sum | cut -c1-16)
OUT="$CACHE/guest-images/linux-$HASH"
ARTIFACTS=(vmlinux bzImage initramfs.cpio initramfs.cpio.gz config build.log)

is_complete() {
    local a
    [[ -d $OUT ]] || return 1
    for a in "${ARTIFACTS[@]}"; do [[ -s $OUT/$a ]] || return 1; done
}

if [[ $mode == print ]]; then
    echo "$OUT"
    is_complete && exit 0 || exit 1
fi

if is_complete; then
    log "up to date"
    echo "$OUT"
    exit 0
fi

[[ $KSRC_VER != unknown && $BUSYBOX_VER != unknown ]] || die "cannot determine package versions"
[[ -f $KSRC_TARBALL ]] || die "$KSRC_TARBALL not found (is $KSRC_PKG installed?)"

# ---- build (one at a time per cache) -------------------------------------------
mkdir -p "$CACHE/guest-images" "$CACHE/build"
exec 9>"$CACHE/build/.lock"
if ! flock -n 9; then
    log "another build is running in $CACHE/build; waiting for it"
    flock 9
fi
if is_complete; then   # built by whoever held the lock
    echo "$OUT"
    exit 0
fi

TMP=$(mktemp -d "$CACHE/guest-images/.tmp-linux-$HASH.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
LOG="$TMP/build.log"
: >"$LOG"
run() {   # run a command, output to the log (and stderr if BEXAR_VERBOSE=1)
    printf '+ %s\n' "$*" >>"$LOG"
    if [[ ${BEXAR_VERBOSE:-0} == 1 ]]; then
        "$@" 2>&1 | tee -a "$LOG" >&2
    else
        "$@" >>"$LOG" 2>&1
    fi
}
fail() {
    cp "$LOG" "$CACHE/guest-images/linux-$HASH.failed.log" 2>/dev/null || true
    log "error: $*; full log: $CACHE/guest-images/linux-$HASH.failed.log; last lines:"
    tail -n 40 "$LOG" >&2
    exit 1
}
START=$(date +%s)
{
    echo "bexar guest linux build $HASH, $(date -u +%FT%TZ)"
    echo "$KSRC_PKG $KSRC_VER, $BUSYBOX_PKG $BUSYBOX_VER, $(gcc --version | head -n1)"
} >>"$LOG"

# Source tree: unpacked + patched once per (source version, patches); reused
# (with its object dir) by later builds that only change the config, init, etc.
SRC_HASH=$( { echo "$KSRC_VER"; for p in "${PATCHES[@]}"; do basename "$p"; cat "$p"; done; } | sha256sum | cut -c1-16)
SRC="$CACHE/build/linux-src-$SRC_HASH"
OBJ="$CACHE/build/linux-obj-$SRC_HASH"
if [[ ! -f $SRC/.bexar-prepared ]]; then
    log "unpacking $KSRC_TARBALL (${KSRC_VER}) into $SRC"
    # Older trees are of no further use: remove them (the lock is held).
    rm -rf "$CACHE"/build/linux-src-* "$CACHE"/build/linux-obj-*
    mkdir -p "$SRC.part"
    run tar -xJf "$KSRC_TARBALL" -C "$SRC.part" --strip-components=1 || fail "unpacking failed"
    for p in "${PATCHES[@]}"; do
        log "applying $(basename "$p")"
        run patch -d "$SRC.part" -p1 --forward --batch -i "$p" || fail "patch $(basename "$p") failed"
    done
    touch "$SRC.part/.bexar-prepared"
    mv -T "$SRC.part" "$SRC"
fi
mkdir -p "$OBJ"

# Config: allnoconfig + fragment, then check every line of the fragment held.
log "configuring (allnoconfig + microvm.config)"
run env -C "$SRC" scripts/kconfig/merge_config.sh -n -O "$OBJ" "$HERE/microvm.config" \
    || fail "merge_config.sh failed"
bad=0
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF -- "$line" "$OBJ/.config" || { log "config: wanted $line, got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$OBJ/.config" || echo unset)"; bad=1; }
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        if grep -qE "^${BASH_REMATCH[1]}=[ym]$" "$OBJ/.config"; then
            log "config: wanted ${BASH_REMATCH[1]} off, but it is on"; bad=1
        fi
    fi
done <"$HERE/microvm.config"
((bad == 0)) || fail "the final .config does not match microvm.config"

log "building vmlinux + bzImage (make -j$JOBS, nice 19); log: $OUT/build.log"
run nice -n 19 make -C "$SRC" O="$OBJ" -j"$JOBS" vmlinux bzImage || fail "kernel build failed"

# Artifacts.
cp "$OBJ/.config" "$TMP/config"
cp "$OBJ/arch/x86/boot/bzImage" "$TMP/bzImage"
strip --strip-debug -o "$TMP/vmlinux" "$OBJ/vmlinux"
# The PVH entry point note (Xen, type 0x12 = XEN_ELFNOTE_PHYS32_ENTRY) must be there.
readelf -Wn "$TMP/vmlinux" | grep -Eq '^[[:space:]]*Xen[[:space:]].*(\(0x00000012\)|PHYS32)' \
    || { readelf -n "$TMP/vmlinux" >>"$LOG"; fail "vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"; }

# initramfs: busybox-static + init, device node for the console, fixed mtimes.
log "building initramfs"
GEN="$OBJ/bexar-gen_init_cpio"
[[ -x $GEN ]] || run gcc -O2 -o "$GEN" "$SRC/usr/gen_init_cpio.c" || fail "gen_init_cpio build failed"
cat >"$TMP/initramfs.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /bin 0755 0 0
dir /sbin 0755 0 0
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
dir /root 0700 0 0
dir /etc 0755 0 0
file /bin/busybox /bin/busybox 0755 0 0
slink /bin/sh busybox 0777 0 0
file /init $HERE/init 0755 0 0
EOF
"$GEN" -t 0 "$TMP/initramfs.list" >"$TMP/initramfs.cpio" 2>>"$LOG" || fail "initramfs failed"
# Both forms: the kernel recognises either. On PVM hosts use the uncompressed one:
# inflating 1 MB of gzip in emulated ring 0 costs ~19 s of boot time there.
gzip -9 -n <"$TMP/initramfs.cpio" >"$TMP/initramfs.cpio.gz"
rm "$TMP/initramfs.list"

echo "built in $(($(date +%s) - START)) s" >>"$LOG"
log "built in $(($(date +%s) - START)) s"
chmod 0755 "$TMP"
rm -f "$CACHE/guest-images/linux-$HASH.failed.log"
trap - EXIT
if ! mv -T "$TMP" "$OUT" 2>/dev/null; then
    rm -rf "$TMP"
    is_complete || die "could not move the build into $OUT"
fi
echo "$OUT"
