#!/bin/sh
# Installs what building the `virtio-media` crate (the media benchmark's baseline) needs:
# libclang for v4l2r's bindgen run, and a videodev2.h from Linux >= 6.5 (Debian
# bookworm's own linux-libc-dev 6.1 lacks v4l2_ctrl_av1_film_grain). The newer header
# package is unpacked (not installed) into a cache directory.
#
# Idempotent. The last line printed is the include directory to export as
#   V4L2R_VIDEODEV2_H_PATH=<that line>
# Usage: xtask/media-deps.sh [CACHE_DIR]   (default: $HOME/.cache/outboard/media-deps)
set -eu

cache="${1:-${HOME:-/tmp}/.cache/outboard/media-deps}"
include="$cache/root/usr/include"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

header_ok() {
    [ -f "$include/linux/videodev2.h" ] &&
        grep -q v4l2_ctrl_av1_film_grain "$include/linux/videodev2.h"
}

updated=0
apt_update() {
    if [ "$updated" = 0 ]; then
        $sudo apt-get update -qq >&2
        updated=1
    fi
}

# clang-sys (bindgen) loads libclang.so / libclang-N.so; libclang-cpp is not enough.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so* \
    >/dev/null 2>&1; then
    if ! $sudo apt-get install -y -qq libclang-dev >&2; then
        apt_update
        $sudo apt-get install -y -qq libclang-dev >&2
    fi
fi

if ! header_ok; then
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # Use the machine's own Debian mirror (the first URI of its main sources).
        mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        if [ -z "$mirror" ]; then
            echo "media-deps: no Debian mirror found in /etc/apt to add bookworm-backports" >&2
            exit 1
        fi
        echo "deb $mirror bookworm-backports main" |
            $sudo tee /etc/apt/sources.list.d/outboard-backports.list >/dev/null
        updated=0
    fi
    mkdir -p "$cache/debs"
    rm -rf "$cache/root"
    (
        cd "$cache/debs"
        rm -f linux-libc-dev_*.deb
        if ! apt-get download -qq linux-libc-dev/bookworm-backports >&2; then
            apt_update
            apt-get download -qq linux-libc-dev/bookworm-backports >&2
        fi
    )
    dpkg -x "$cache"/debs/linux-libc-dev_*.deb "$cache/root"
    if ! header_ok; then
        echo "media-deps: $include/linux/videodev2.h is older than Linux 6.5" >&2
        exit 1
    fi
fi

echo "$include"
