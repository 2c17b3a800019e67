#!/usr/bin/env bash
# Installs the real clients and servers the end-to-end tests drive (curl, openssl, slowhttptest,
# testssl.sh, ss, h2load and nghttp, headless Chromium, wrk, redis-server with redis-cli and
# redis-benchmark, haproxy; systemd's systemd-analyze and systemd-socket-activate, util-linux's
# setpriv and libseccomp for the unit's hardening) from Debian's packages when any is missing.
# Does nothing when all are present.
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v slowhttptest >/dev/null || need+=(slowhttptest)
command -v testssl >/dev/null || need+=(testssl.sh)
command -v ss >/dev/null || need+=(iproute2)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v chromium >/dev/null || need+=(chromium)   # the /status page, opened headless
command -v wrk >/dev/null || need+=(wrk)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v setpriv >/dev/null || need+=(util-linux)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)
command -v redis-server >/dev/null || need+=(redis-server)
{ command -v redis-cli && command -v redis-benchmark; } >/dev/null || need+=(redis-tools)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${need[*]} and no apt-get here; install them by hand" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "system-deps: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
