#!/bin/sh
# Ray proxy overhead per streamed token, measured where it is largest: a model whose forward
# pass costs almost nothing, so time per output token is mostly serving overhead. The
# single-process server and a 1-replica Ray deployment run side by side (both idle between
# runs); 1-stream runs alternate between them, ROUNDS times, so that a machine shared with
# other work weighs on both alike. docs/scale-out.md relates the difference to a real model's
# time per token.
#
#   sh scripts/bench_proxy_overhead.sh TINY_MODEL_DIR    # build/bench/proxy-overhead/*.json + summary
set -eu
MODEL=${1:?usage: scripts/bench_proxy_overhead.sh MODEL_DIR}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-build/bench/proxy-overhead}
ROUNDS=${ROUNDS:-3}
N=${N:-30}
LENS=${LENS:---input-len 8 --output-len 64}
mkdir -p "$OUT"

wait_ready() {
  for _ in $(seq 300); do
    "$BIN/python" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$1/health').status_code != 200)" 2>/dev/null && return 0
    sleep 1
  done
  echo "no server on $1" >&2; return 1
}

"$BIN/ragtop" serve "$MODEL" --threads 1 --port 8240 --log-level warning >"$OUT/single.log" 2>&1 &
SINGLE=$!
"$BIN/ragtop" serve "$MODEL" --threads 1 --port 8241 --replicas 1 --log-level warning >"$OUT/ray.log" 2>&1 &
RAY=$!
trap 'kill -TERM $SINGLE $RAY 2>/dev/null; wait $SINGLE $RAY 2>/dev/null || true' EXIT
wait_ready 8240
wait_ready 8241
for r in $(seq "$ROUNDS"); do
  for target in single:8240 ray:8241; do
    name=${target%:*}-$r
    "$BIN/python" -m loadtests run --url "http://127.0.0.1:${target#*:}" --max-concurrency 1 --num-requests "$N" \
      $LENS --warmup 2 --no-progress --label "$name" --json "$OUT/$name.json" >"$OUT/$name.txt"
  done
done

"$BIN/python" - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
def get(name):
    s = json.loads((out / f"{name}.json").read_text())["summary"]
    return s["output_throughput"], 1000 * s["tpot_s"]["mean"], 1000 * s["ttft_s"]["mean"]
rows = ["| round | single tok/s | Ray tok/s | single TPOT (ms) | Ray TPOT (ms) | single TTFT (ms) | Ray TTFT (ms) |",
        "|---|---|---|---|---|---|---|"]
d_tpot, d_ttft = [], []
for r in range(1, rounds + 1):
    s, y = get(f"single-{r}"), get(f"ray-{r}")
    rows.append(f"| {r} | {s[0]:.1f} | {y[0]:.1f} | {s[1]:.2f} | {y[1]:.2f} | {s[2]:.1f} | {y[2]:.1f} |")
    d_tpot.append(y[1] - s[1])
    d_ttft.append(y[2] - s[2])
rows.append("")
rows.append(f"Ray - single, per output token (TPOT): median {statistics.median(d_tpot):.2f} ms; "
            f"on the first token (TTFT): median {statistics.median(d_ttft):.1f} ms")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
