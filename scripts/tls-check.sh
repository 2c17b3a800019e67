#!/usr/bin/env bash
# Checks a persistproxy TLS listener with testssl.sh and sslyze: no protocol older than TLS 1.2
# is offered, and session resumption works (TLS 1.2 session IDs and tickets).
#
#   scripts/tls-check.sh                 starts a throwaway listener (self-signed P-256 certificate,
#                                        default [listener.tls] settings) on 127.0.0.1 and checks it
#   scripts/tls-check.sh HOST:PORT       checks a listener that is already running
#
# testssl comes from Debian (testssl.sh, see scripts/system-deps.sh). sslyze pins an older
# `cryptography` than persistproxy needs, so it lives in its own virtualenv
# (SSLYZE_VENV, default ~/.cache/persistproxy/sslyze-venv), created on first use.
# TLS_CHECK_TOOLS (default "testssl sslyze") picks the tools. The end-to-end test runs both,
# with SSLYZE_VENV in the checkout (.venv-sslyze).
# Exit status: 0 when every check passed, 1 otherwise. Takes about half a minute (testssl).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SSLYZE_VENV="${SSLYZE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/persistproxy/sslyze-venv}"
TOOLS=" ${TLS_CHECK_TOOLS:-testssl sslyze} "
failures=0

fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
pass() { echo "ok:   $*"; }

target="${1:-}"
workdir=""
proxy_pid=""
cleanup() {
  if [ -n "$proxy_pid" ] && kill -0 "$proxy_pid" 2>/dev/null; then
    kill "$proxy_pid" 2>/dev/null || true
    wait "$proxy_pid" 2>/dev/null || true
  fi
  [ -n "$workdir" ] && rm -rf "$workdir"
}
trap cleanup EXIT

if [ -z "$target" ]; then
  twistd="$REPO/.venv/bin/twistd"
  [ -x "$twistd" ] || { echo "tls-check: $twistd missing; run 'make venv'" >&2; exit 2; }
  workdir="$(mktemp -d)"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost" -days 2 \
    -keyout "$workdir/key.pem" -out "$workdir/cert.pem" 2>/dev/null
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  cat >"$workdir/persistproxy.toml" <<EOF
[[listener]]
name = "tls"
bind = "tcp:$port:interface=127.0.0.1"
upstream = "app"

[listener.tls]
certificates = [ { cert = "$workdir/cert.pem", key = "$workdir/key.pem" } ]

[[upstream]]
name = "app"
servers = ["127.0.0.1:9"]
EOF
  "$twistd" --nodaemon --pidfile= persistproxy --config "$workdir/persistproxy.toml" \
    >"$workdir/proxy.log" 2>&1 &
  proxy_pid=$!
  for _ in $(seq 1 100); do
    grep -q '"listener.started"' "$workdir/proxy.log" 2>/dev/null && break
    sleep 0.1
  done
  grep -q '"listener.started"' "$workdir/proxy.log" || {
    cat "$workdir/proxy.log" >&2
    echo "tls-check: the throwaway listener did not start" >&2
    exit 2
  }
  target="127.0.0.1:$port"
  echo "tls-check: throwaway listener on $target"
fi

# -- testssl.sh: protocols offered, server defaults (session resumption) ---------------------
if [[ "$TOOLS" != *" testssl "* ]]; then
  :
elif command -v testssl >/dev/null; then
  out="$(testssl --quiet --color 0 --warnings off --protocols --server-defaults "$target" 2>&1 || true)"
  echo "$out" | grep -E '^ (SSLv2|SSLv3|TLS 1(\.[0-3])?) |Session Resumption|SSL Session ID|Session Ticket' || true
  for old in 'SSLv2' 'SSLv3' 'TLS 1 ' 'TLS 1.1'; do
    if echo "$out" | grep -E "^ ${old} +" | grep -q 'not offered'; then
      pass "testssl: ${old% } not offered"
    else
      fail "testssl: ${old% } offered (or not tested)"
    fi
  done
  echo "$out" | grep -qE '^ TLS 1.2 +offered' && pass "testssl: TLS 1.2 offered" || fail "testssl: TLS 1.2 not offered"
  echo "$out" | grep -qE '^ TLS 1.3 +offered' && pass "testssl: TLS 1.3 offered" || fail "testssl: TLS 1.3 not offered"
  if echo "$out" | grep -qE 'Session Resumption +Tickets: yes, ID: yes'; then
    pass "testssl: session resumption with tickets and IDs"
  else
    fail "testssl: session resumption not fully supported"
  fi
else
  fail "testssl not installed (apt-get install testssl.sh, or scripts/system-deps.sh)"
fi

# -- sslyze: TLS 1.2 resumption, session IDs and tickets --------------------------------------
if [[ "$TOOLS" == *" sslyze "* ]]; then
  if [ ! -x "$SSLYZE_VENV/bin/python" ] || ! "$SSLYZE_VENV/bin/python" -c 'import sslyze' 2>/dev/null; then
    echo "tls-check: installing sslyze into $SSLYZE_VENV"
    python3 -m venv "$SSLYZE_VENV"
    "$SSLYZE_VENV/bin/python" -m pip install -q 'sslyze>=6,<7'
  fi
  out="$("$SSLYZE_VENV/bin/python" -m sslyze --resum "$target" 2>&1 || true)"
  echo "$out" | grep -E 'With Session IDs|With TLS Tickets' || true
  echo "$out" | grep -q 'With Session IDs: OK - Supported' && pass "sslyze: session IDs" || fail "sslyze: session ID resumption"
  echo "$out" | grep -q 'With TLS Tickets: OK - Supported' && pass "sslyze: TLS tickets" || fail "sslyze: ticket resumption"
fi

if [ "$failures" -gt 0 ]; then
  echo "tls-check: $failures check(s) failed" >&2
  exit 1
fi
echo "tls-check: all checks passed for $target"
