#!/usr/bin/env bash
# Kernel-shaped device/edge link: two network namespaces joined by a veth pair, `tc tbf` on each side's egress
# (device egress = uplink, edge egress = downlink). NATS and the edge services (verifier, scheduler, telemetry)
# run in the edge namespace, the draft service in the device namespace, so every verify round crosses the
# shaped veth. netem is not in this kernel, so the kernel adds no delay: the RTT is the veth's (~0.05 ms).
# For delay on top, run `draftwire bench --links 'up=...,down=...,rtt=...'` instead (user-space proxy).
#
# usage (root):  deploy/netns-tbf.sh [UP_RATE] [DOWN_RATE]        e.g. deploy/netns-tbf.sh 2mbit 10mbit
# env: MODES (ar,full,tkslt,dssd) PROMPTS (2) TOKENS (32) DRAFT/TARGET (smollm2-135m:int8 / smollm2-135m:fp32)
#      OUT (bench-out/netns-tbf)
# writes $OUT/results.json: one record per mode with tokens/s, speedup over ar and bytes per token.
set -euo pipefail
UP=${1:-2mbit}
DOWN=${2:-10mbit}
MODES=${MODES:-ar,full,tkslt,dssd}
PROMPTS=${PROMPTS:-2}
TOKENS=${TOKENS:-32}
DRAFT=${DRAFT:-smollm2-135m:int8}
TARGET=${TARGET:-smollm2-135m:fp32}
OUT=${OUT:-bench-out/netns-tbf}
PY=${PYTHON:-python}
EDGE=dw-edge DEV=dw-dev EDGE_IP=10.77.0.1 DEV_IP=10.77.0.2
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "netns-tbf.sh: needs root (network namespaces and tc)" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del $EDGE 2>/dev/null || true
  ip netns del $DEV 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns del $EDGE 2>/dev/null || true
ip netns del $DEV 2>/dev/null || true
ip netns add $EDGE
ip netns add $DEV
ip link add dw-e type veth peer name dw-d
ip link set dw-e netns $EDGE
ip link set dw-d netns $DEV
ip -n $EDGE addr add $EDGE_IP/24 dev dw-e
ip -n $DEV addr add $DEV_IP/24 dev dw-d
for ns in $EDGE $DEV; do ip -n $ns link set lo up; done
ip -n $EDGE link set dw-e up
ip -n $DEV link set dw-d up
tc -n $DEV qdisc add dev dw-d root tbf rate "$UP" burst 32kb latency 2s
tc -n $EDGE qdisc add dev dw-e root tbf rate "$DOWN" burst 32kb latency 2s
rtt="no ping binary to measure the veth RTT"
command -v ping >/dev/null && rtt=$(ip netns exec $DEV ping -c 3 -q $EDGE_IP | tail -1)
echo "netns-tbf: uplink $UP, downlink $DOWN (tc tbf); $rtt"

nats_bin=$($PY -c 'from shared.io.nats_server import nats_server_binary; print(nats_server_binary())')
printf 'max_payload: 8MB\n' > "$work/nats.conf"
ip netns exec $EDGE "$nats_bin" -c "$work/nats.conf" -a $EDGE_IP -p 4222 -js -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=($!)
url=nats://$EDGE_IP:4222
start() {  # start NS NAME ARGS...: a service in a namespace; waits for its ready line
  local ns=$1 name=$2; shift 2
  ip netns exec "$ns" env OMP_NUM_THREADS=1 $PY -m "services.$name" --nats "$url" "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do grep -q draftwire-ready "$work/$name.log" && return 0; sleep 1; done
  echo "netns-tbf: $name did not become ready:" >&2; tail -20 "$work/$name.log" >&2; exit 1
}
sleep 1
start $EDGE telemetry --http-port 0
start $EDGE verifier --target-model "${TARGET%%:*}" --target-dtype "${TARGET##*:}" --torch-threads 1
start $EDGE scheduler
start $DEV draft --draft-model "${DRAFT%%:*}" --draft-dtype "${DRAFT##*:}" --torch-threads 1

mkdir -p "$OUT"
ip netns exec $EDGE $PY - "$url" "$MODES" "$PROMPTS" "$TOKENS" "$UP" "$DOWN" "$DRAFT" "$TARGET" "$OUT" <<'PYEOF'
"""Runs the prompts per mode against the stack in the namespaces and writes results.json."""
import asyncio, json, sys, time
from services.cli.remote import ask, load_prompts, request_body
from shared.io.bus import connect
from shared.core.params import SamplingParams, SpecParams

url, modes, n_prompts, n, up, down, draft, target, out = sys.argv[1:]
n, prompts = int(n), load_prompts(None, int(n_prompts))

async def main():
    nc = await connect(url, "netns-tbf")
    records = []
    for mode in modes.split(","):
        tokens = up_b = down_b = 0
        t0 = time.perf_counter()
        for i, row in enumerate(prompts):
            s = SamplingParams(temperature=0.0, seed=i, max_new_tokens=n, min_new_tokens=n)
            r = await ask(nc, request_body(row["prompt"], s, SpecParams(mode=mode), False, f"tbf-{mode}-{i}"), 1800)
            if "error" in r:
                raise SystemExit(f"{mode}: {r['error']}")
            tokens += r["stats"]["new_tokens"]; up_b += r["stats"]["uplink_bytes"]; down_b += r["stats"]["downlink_bytes"]
        wall = time.perf_counter() - t0
        records.append({"mode": mode, "link": f"tbf up={up} down={down}", "draft_model": draft, "target_model": target,
                        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                        "uplink_bytes_per_token": up_b / tokens, "downlink_bytes_per_token": down_b / tokens})
        print(f"{mode:<6} {tokens / wall:7.2f} tok/s  up {up_b / tokens:10.1f} B/tok  down {down_b / tokens:8.1f} B/tok",
              flush=True)
    ar = next((r["tokens_per_s"] for r in records if r["mode"] == "ar"), None)
    for r in records:
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar if ar else None
    with open(f"{out}/results.json", "w") as f:
        json.dump({"meta": {"shaping": "tc tbf between network namespaces", "up": up, "down": down}, "records": records},
                  f, indent=1)
    await nc.close()

asyncio.run(main())
PYEOF
echo "netns-tbf: wrote $OUT/results.json"
