#!/usr/bin/env bash
# Fetches the newest cloud-init Debian has (unstable, which follows upstream releases) and
# unpacks it, for the metadata tests to run current upstream code besides Debian 12's own
# package. Nothing is installed: the package is unpacked into
#
#   ${BEXAR_CACHE_DIR:-/var/cache/bexar}/cloud-init/<version>/
#
# and the LAST line of stdout is the directory to put on PYTHONPATH. The apt index of
# unstable is kept in the cache too, so a run with nothing new downloads only what changed.
# It runs on Debian 12's Python and its python3-* packages (cloud-init's dependencies there).
set -euo pipefail
CACHE=${BEXAR_CACHE_DIR:-/var/cache/bexar}/cloud-init
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" >"$APT/sources.list"
opts=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o Dir::Etc::sourceparts=- \
      -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" \
      -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root -q)
exec 9>"$CACHE/.lock"
flock 9
apt-get "${opts[@]}" update >&2
version=$(apt-cache "${opts[@]}" policy cloud-init | awk '/Candidate:/ {print $2}')
[[ -n $version && $version != "(none)" ]] || { echo "upstream.sh: no cloud-init in Debian unstable" >&2; exit 1; }
out="$CACHE/$version"
if [[ ! -d $out/usr/lib/python3/dist-packages/cloudinit ]]; then
    tmp=$(mktemp -d "$CACHE/.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get "${opts[@]}" download "cloud-init=$version" >&2)
    dpkg-deb -x "$tmp"/cloud-init_*.deb "$tmp/root"
    rm -rf "$out"
    mv "$tmp/root" "$out"
fi
echo "$out/usr/lib/python3/dist-packages"
