#!/usr/bin/env bash
# The test command (README): installs the Debian packages the tests use, then runs
# every test of the workspace. Needs root: the tests build network namespaces and TUN
# devices. With everything installed, CI=1 is set so that no test may skip.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  iproute2        # ip, ss: namespaces, veth, routes (testbed, selftest)
  util-linux      # setpriv: the no-permission exit-code tests; prlimit (udp_dns bench)
  curl            # an unmodified application; SOCKS client against our server
  python3-socks   # PySocks (for /usr/bin/python3): SOCKS4/5 and UDP ASSOCIATE client
  ncat            # SOCKS4/5 client
  dante-server    # danted: an independent SOCKS4/5 server
  microsocks      # a SOCKS5 server without UDP (benchmarks)
  openssh-server  # sshd: the far end of `ssh -D` (ssh_netns; runs with its own host key, not the package's)
  openssh-client  # ssh -D: OpenSSH's dynamic forward as the tunnel's upstream; ssh-keygen for its keys
  shadowsocks-libev # ss-server and ss-local -u: a shadowsocks client's SOCKS5 inbound as the upstream (shadowsocks_netns)
  iperf3          # tunnel benchmark
  dnsmasq-base    # dnsmasq: the resolver in the target namespace (testbed::dnsmasq)
  bind9-dnsutils  # dig: DNS queries over UDP and TCP from a namespace
  nftables        # nft: blackholing the proxy (memory_netns SYN storm)
  ca-certificates
)

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (sudo scripts/test.sh): the tests create network namespaces and TUN devices" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  # Do not let package scripts start daemons (danted, iperf3, sshd, ss-server) on this machine.
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

export CI="${CI:-1}"
# The platform crate must build, with its "not supported on this OS yet" errors, for
# the other systems wherever their Rust targets are installed.
for target in x86_64-apple-darwin x86_64-pc-windows-gnu; do
  if rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "checking tun2socks-platform for $target"
    cargo check --locked -q -p tun2socks-platform --target "$target"
  fi
done
exec cargo test --workspace --locked
