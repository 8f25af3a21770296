#!/usr/bin/env bash
# Live migration between two "hosts" on one machine: network namespaces hostA and hostB
# joined by a veth pair. A workload holding a few hundred MiB that it keeps modifying,
# with a visible progress counter, is moved from A to B while it runs.
#
#   sudo examples/migration/demo.sh [MIB]        (needs ckpt installed, iproute2, root)
set -euo pipefail
# Start clean: fds this shell inherited (pipes of a terminal multiplexer, say) would be
# inherited by the workload, and ckpt refuses to migrate fds it cannot recreate.
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null || true
done
MIB=${1:-256}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d /tmp/ckpt-migration-demo.XXXXXX)
A=ckdemoA B=ckdemoB B_ADDR=10.78.0.2 PORT=27000
PY=$(command -v python3)
SERVER="" TARGET=""

cleanup() {
    [ -n "$TARGET" ] && kill -9 "$TARGET" 2>/dev/null || true
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true
    [ -f "$WORK/pid" ] && kill -9 "$(cat "$WORK/pid")" 2>/dev/null || true
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    echo "(output and images left in $WORK)"
}
trap cleanup EXIT

echo "== two hosts: $A (10.78.0.1) and $B ($B_ADDR), joined by a veth pair"
ip netns add "$A"; ip netns add "$B"
ip link add ckdemo-a type veth peer name ckdemo-b
ip link set ckdemo-a netns "$A"; ip link set ckdemo-b netns "$B"
ip -n "$A" addr add 10.78.0.1/24 dev ckdemo-a; ip -n "$B" addr add "$B_ADDR/24" dev ckdemo-b
ip -n "$A" link set ckdemo-a up; ip -n "$B" link set ckdemo-b up
ip -n "$A" link set lo up; ip -n "$B" link set lo up

head -c 32 /dev/urandom | base64 > "$WORK/token"
echo "== page server on $B"
ip netns exec "$B" ckpt page-server --address "$B_ADDR" --port "$PORT" -D "$WORK/in" \
    --auth-token-file "$WORK/token" 2> "$WORK/server.log" &
SERVER=$!
until grep -q listening "$WORK/server.log" 2>/dev/null; do sleep 0.1; done

echo "== workload on $A: $MIB MiB, rewritten as it counts"
ip netns exec "$A" "$PY" "$HERE/workload.py" "$MIB" > "$WORK/progress.txt" 2>&1 < /dev/null &
TARGET=$!
until [ "$(wc -l < "$WORK/progress.txt")" -ge 3 ]; do sleep 0.2; done
tail -n 1 "$WORK/progress.txt"

echo "== ckpt migrate -t $TARGET --to $B_ADDR:$PORT"
ip netns exec "$A" ckpt migrate -t "$TARGET" --to "$B_ADDR:$PORT" \
    --auth-token-file "$WORK/token" --max-downtime-ms 50 | tee "$WORK/migrate.txt"
NEW=$(sed -n 's/.* as pid \([0-9]*\).*/\1/p' "$WORK/migrate.txt")
echo "$NEW" > "$WORK/pid"
TARGET=""
sleep 2
echo "== the counter goes on, now as pid $NEW in $B's network namespace:"
tail -n 3 "$WORK/progress.txt"
if [ "$(stat -Lc %i "/proc/$NEW/ns/net")" = "$(stat -Lc %i "/run/netns/$B")" ]; then
    echo "pid $NEW lives in $B"
else
    echo "pid $NEW is NOT in $B"; exit 1
fi
"$PY" - "$WORK/progress.txt" <<'PYEOF'
import re, sys
nums = [int(m[1]) for m in re.finditer(r"step=(\d+)", open(sys.argv[1]).read())]
ok = nums == list(range(nums[0], nums[0] + len(nums)))
print("progress counter:", "no gap, no repeat" if ok else "BROKEN", f"({len(nums)} steps)")
sys.exit(0 if ok else 1)
PYEOF
