#!/bin/sh
# The scale-out benchmark of docs/scale-out.md, through loadtests/ (python -m loadtests run):
#   1. aggregate output tokens/s at 16 concurrent streams: 2 replicas x 1 thread vs 1 replica x 1 thread
#      (ragtop serve --replicas N on a local Ray);
#   2. Ray proxy overhead at 1 stream: 1 replica x 1 thread on Ray vs the single-process server.
# Plus the single-process server at 16 streams, for reference. Every server runs with the same
# settings (--threads 1, the default --max-batch-size 8); fixed lengths, greedy, ignore_eos.
#
#   sh scripts/bench_scale_out.sh MODEL_DIR        # results: build/bench/scale-out/*.json + summary.md
set -eu
MODEL=${1:?usage: scripts/bench_scale_out.sh MODEL_DIR}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-build/bench/scale-out}
N1=${N1:-16}    # requests at 1 stream
N16=${N16:-64}  # requests at 16 streams
LENS=${LENS:---input-len 32 --output-len 64}
PORT=${PORT:-8230}
mkdir -p "$OUT"

start() {  # start NAME ARGS...: a server on $PORT, ready when /health says 200
  name=$1; shift
  "$BIN/ragtop" serve "$MODEL" --threads 1 --port "$PORT" --log-level warning "$@" >"$OUT/$name.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do
    if "$BIN/python" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" 2>/dev/null; then
      return 0
    fi
    kill -0 $PID 2>/dev/null || { echo "server $name exited; see $OUT/$name.log" >&2; exit 1; }
    sleep 1
  done
  echo "server $name not ready after 600 s" >&2; kill -TERM $PID; exit 1
}

stop() { kill -TERM $PID; wait $PID || true; }

load() {  # load LABEL CONCURRENCY REQUESTS
  "$BIN/python" -m loadtests run --url "http://127.0.0.1:$PORT" --max-concurrency "$2" --num-requests "$3" \
    $LENS --warmup 2 --no-progress --label "$1" --json "$OUT/$1.json" >"$OUT/$1.txt"
  echo "load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/$1.txt"
  grep -E "Output token throughput|Mean TTFT|Mean TPOT|load average" "$OUT/$1.txt" | sed "s/^/$1: /"
}

# A phase whose results are all there is skipped (rerun one by deleting its .json files);
# PHASES sets the order (on a machine shared with other work, run twice in opposite orders).
done_() { for f in "$@"; do [ -f "$OUT/$f.json" ] || return 1; done; }
for phase in ${PHASES:-single ray-1x1 ray-2x1}; do
  case $phase in
    single) done_ single-c1 single-c16 || { start single; load single-c1 1 "$N1"; load single-c16 16 "$N16"; stop; } ;;
    ray-1x1) done_ ray-1x1-c1 ray-1x1-c16 || { start ray-1x1 --replicas 1; load ray-1x1-c1 1 "$N1"; load ray-1x1-c16 16 "$N16"; stop; } ;;
    ray-2x1) done_ ray-2x1-c16 || { start ray-2x1 --replicas 2; load ray-2x1-c16 16 "$N16"; stop; } ;;
  esac
done

"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
s = {p.stem: json.loads(p.read_text())["summary"] for p in out.glob("*.json")}
tok = {k: v["output_throughput"] for k, v in s.items()}
lines = ["| run | streams | requests | output tok/s | mean TTFT (ms) | mean TPOT (ms) |", "|---|---|---|---|---|---|"]
for k in ("single-c1", "ray-1x1-c1", "single-c16", "ray-1x1-c16", "ray-2x1-c16"):
    v = s[k]
    lines.append(f"| {k} | {k.rsplit('-c', 1)[1]} | {v['completed']}/{v['requests']} | {tok[k]:.1f} | "
                 f"{1000 * v['ttft_s']['mean']:.0f} | {1000 * v['tpot_s']['mean']:.1f} |")
lines.append("")
lines.append(f"2 replicas x 1 thread / 1 replica x 1 thread at 16 streams: {tok['ray-2x1-c16'] / tok['ray-1x1-c16']:.2f}x")
lines.append(f"Ray proxy overhead at 1 stream (1 - ray / single): {100 * (1 - tok['ray-1x1-c1'] / tok['single-c1']):.1f} %")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
