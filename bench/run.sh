#!/usr/bin/env bash
# persistproxy benchmarks. See bench/README.md.
#
#   bash bench/run.sh            throughput: wrk → {direct, persistproxy, nginx, haproxy} → nginx origin
#   bash bench/run.sh idle       memory per idle keep-alive client connection (bench/idle_memory.py)
#   bash bench/run.sh tls        full vs resumed TLS handshakes/s, persistproxy vs nginx (bench/tls_bench.py)
#   bash bench/run.sh tcp        raw TCP relay GiB/s and CPU/GiB vs nginx stream, haproxy (bench/tcp_bench.py)
#   bash bench/run.sh race       keep-alive race errors per method, persistproxy vs nginx, haproxy (bench/race_soak.py)
#   bash bench/run.sh h2         HTTP/2 over TLS, h2load -c10 -m10: persistproxy vs nginx (bench/h2_bench.py)
#   bash bench/run.sh redis      redis-benchmark -P 16 -c 50: direct, persistproxy, twemproxy (bench/redis_bench.py)
#
# Installs nginx, haproxy, wrk (and openssl, taskset, prlimit; redis-server, redis-tools and
# nutcracker for redis) from apt when missing and builds the proxy's venv with `make venv`. Every
# server it starts is stopped on exit, Ctrl-C or SIGTERM. Knobs (environment): DURATION ROUNDS
# CONNECTIONS THREADS SCENARIOS WRK_CPUS PROXY_CPU ORIGIN_CPU IDLE_CONNECTIONS TLS_TIME TCP_BYTES
# TCP_PARALLEL TCP_TARGETS CLIENT_CPU RACE_SECONDS RACE_ROUNDS RACE_IDLE_CLOSE RACE_CLIENTS
# RACE_TARGETS H2_CLIENT_CPU REDIS_REQUESTS REDIS_CLIENTS REDIS_PIPELINE REDIS_TESTS REDIS_TARGETS
# KEEP_WORKDIR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-python3}"

usage() {
  sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

mode="throughput"
case "${1:-}" in
  "" | throughput | --throughput) ;;
  idle | --idle) mode="idle" ;;
  tls | --tls) mode="tls" ;;
  tcp | --tcp) mode="tcp" ;;
  race | --race) mode="race" ;;
  h2 | --h2) mode="h2" ;;
  redis | --redis) mode="redis" ;;
  -h | --help | help) usage; exit 0 ;;
  *) echo "run.sh: unknown mode '$1'" >&2; usage >&2; exit 2 ;;
esac
[ $# -gt 0 ] && shift

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }

ensure_tools() {
  local need=()
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
  command -v wrk >/dev/null || need+=(wrk)
  command -v openssl >/dev/null || need+=(openssl)
  command -v h2load >/dev/null || need+=(nghttp2-client)
  command -v taskset >/dev/null || need+=(util-linux)
  command -v prlimit >/dev/null || need+=(util-linux)
  command -v "$PYTHON" >/dev/null || need+=(python3)
  # nginx's stream proxy, a dynamic module in Debian's nginx packages.
  [ "$mode" != tcp ] || [ -f /usr/lib/nginx/modules/ngx_stream_module.so ] \
    || need+=(libnginx-mod-stream)
  if [ "$mode" = redis ]; then
    command -v redis-server >/dev/null || need+=(redis-server)
    { command -v redis-cli && command -v redis-benchmark; } >/dev/null || need+=(redis-tools)
    command -v nutcracker >/dev/null || [ -x /usr/sbin/nutcracker ] || need+=(nutcracker)
  fi
  [ ${#need[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "run.sh: missing ${need[*]} and no apt-get here; install them by hand" >&2
    exit 1
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing missing tools: ${need[*]}"
  $sudo apt-get update -qq
  local pkgs=()
  mapfile -t pkgs < <(printf '%s\n' "${need[@]}" | sort -u)
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${pkgs[@]}" >/dev/null
}

ensure_tools
export PATH="$PATH:/usr/sbin:/sbin"

# The proxy's venv. The proxy may not build yet: the other scenarios still run.
TWISTD="$REPO/.venv/bin/twistd"
log "make venv (the proxy's virtualenv in $REPO/.venv)"
venv_log="$(mktemp)"
if make -C "$REPO" --no-print-directory venv >"$venv_log" 2>&1; then
  rm -f "$venv_log"
else
  tail -n 25 "$venv_log" >&2
  rm -f "$venv_log"
  log "WARNING: 'make venv' failed — the persistproxy scenarios will be reported as failed"
fi

case "$mode" in
  throughput) script="$HERE/harness.py" ;;
  idle) script="$HERE/idle_memory.py" ;;
  tls) script="$HERE/tls_bench.py" ;;
  tcp) script="$HERE/tcp_bench.py" ;;
  race) script="$HERE/race_soak.py" ;;
  h2) script="$HERE/h2_bench.py" ;;
  redis) script="$HERE/redis_bench.py" ;;
esac

# Run the Python driver as a child so this shell can forward signals to it; the driver stops
# every server it started (each in its own process group) in its `finally`.
child=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$child" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$child" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

cd "$REPO"
"$PYTHON" "$script" --twistd "$TWISTD" "$@" &
child=$!
set +e
wait "$child"
rc=$?
set -e
child=""
exit "$rc"
