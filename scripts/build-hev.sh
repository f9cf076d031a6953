#!/bin/sh
# Builds hev-socks5-tunnel 2.19.3 for the benchmark's peer column
# (T2S_BENCH_PEER_HEV), from the C source that the crates.io crate `tun2socks`
# 0.1.11 (hev's own Rust wrapper) carries in its impl/ directory: reachable where
# only the package registries are. Needs curl, make and a C compiler.
#
#   scripts/build-hev.sh [OUTPUT]     (default: target/peers/hev-socks5-tunnel)
set -eu

version=0.1.11
sha256=d93bed68278bf4c65060f1d3539a4012b485399166a0147ba0fe404af89331c1
out=${1:-target/peers/hev-socks5-tunnel}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

curl -fsSL -o "$work/hev.crate" \
    "https://static.crates.io/crates/tun2socks/tun2socks-$version.crate"
echo "$sha256  $work/hev.crate" | sha256sum -c --quiet -
tar xzf "$work/hev.crate" -C "$work"
# (its Makefile asks git for a version and complains outside a checkout: the log is
# shown only when the build fails)
make -C "$work/tun2socks-$version/impl" -j"$(nproc)" >"$work/make.log" 2>&1 ||
    { cat "$work/make.log"; exit 1; }
mkdir -p "$(dirname "$out")"
cp "$work/tun2socks-$version/impl/bin/hev-socks5-tunnel" "$out"
"$out" 2>&1 | grep -m1 Version || true
echo "built $out"
