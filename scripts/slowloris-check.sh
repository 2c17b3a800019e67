#!/bin/sh
# Manual slowloris / slow-body check of a running persistproxy, with the real slowhttptest.
#
#   scripts/slowloris-check.sh [URL] [SECONDS] [CONNECTIONS]
#   scripts/slowloris-check.sh http://127.0.0.1:8080/ 10 300
#
# Runs slowhttptest -H (slow headers) and -B (slow body) at the same time against URL, while
# curl fetches URL sequentially; prints slowhttptest's verdicts and the curl latencies (p50,
# p99, max) and fails (exit 1) if a normal request failed or slowhttptest saw the service
# unavailable. Use it against a proxy you run yourself, on loopback or a test host only.
# The automated version of this is test_slowloris_and_slow_body_normal_clients_still_served
# in tests/e2e/test_governance.py.
set -eu

URL=${1:-http://127.0.0.1:8080/}
SECONDS_=${2:-10}
CONNS=${3:-300}

for tool in slowhttptest curl; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool is not installed (scripts/system-deps.sh)" >&2; exit 2; }
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/slowloris-check.XXXXXX")
echo "slowloris-check: $URL for ${SECONDS_}s, $CONNS connections per attack; reports in $dir"

slowhttptest -H -c "$CONNS" -r 100 -i 2 -l "$SECONDS_" -x 24 -p 3 -g -o "$dir/slowloris" \
    -u "$URL" >"$dir/slowloris.out" 2>&1 &
h=$!
slowhttptest -B -c "$CONNS" -r 100 -i 5 -l "$SECONDS_" -x 24 -p 3 -s 8192 -g -o "$dir/slowbody" \
    -u "$URL" >"$dir/slowbody.out" 2>&1 &
b=$!

fail=0
end=$(( $(date +%s) + SECONDS_ ))
while [ "$(date +%s)" -lt "$end" ]; do
    if ! curl -sS -o /dev/null --max-time 5 -w '%{http_code} %{time_total}\n' "$URL" >>"$dir/curl.txt" 2>>"$dir/curl.err"; then
        fail=1
    fi
    sleep 0.02
done
wait "$h" || true
wait "$b" || true

strip() { sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$1"; }
for attack in slowloris slowbody; do
    echo "== $attack: $(strip "$dir/$attack.out" | grep -E 'Exit status' | tail -1 | sed 's/^ *//')"
    if strip "$dir/$attack.out" | grep -Eq 'service available:[[:space:]]*NO'; then
        echo "   slowhttptest saw the service UNAVAILABLE"
        fail=1
    fi
done

total=$(wc -l <"$dir/curl.txt")
bad=$(awk '$1 != "200"' "$dir/curl.txt" | wc -l)
[ "$bad" -eq 0 ] || fail=1
awk '{print $2}' "$dir/curl.txt" | sort -n | awk -v total="$total" -v bad="$bad" '
    { v[NR] = $1 }
    END {
        if (NR == 0) { print "no normal request completed"; exit }
        p50 = v[int(NR * 0.50) + 1]; i = int(NR * 0.99) + 1; if (i > NR) i = NR; p99 = v[i]
        printf "normal requests: %d (non-200: %d)  p50 %.1f ms  p99 %.1f ms  max %.1f ms\n",
            total, bad, p50 * 1000, p99 * 1000, v[NR] * 1000
    }' | tee "$dir/latency.txt"
[ ! -s "$dir/curl.err" ] || { echo "curl errors:"; head -5 "$dir/curl.err"; }
exit "$fail"
