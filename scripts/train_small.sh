#!/usr/bin/env bash
# Trains the four `small` models of docs/models.md, one after another, same tokens each.
set -e
export RAGTOP_DATA_DIR=${RAGTOP_DATA_DIR:-$PWD/data}
R=${RAGTOP:-.venv/bin/ragtop}
$R train --preset small --attention dense --embedding uniform --out runs/small-dense-uniform --no-progress
$R train --preset small --attention topk --topk 32 --embedding uniform --out runs/small-topk32-uniform --no-progress
$R train --preset small --attention dense --embedding ragged --out runs/small-dense-ragged --no-progress
$R train --preset small --attention topk --topk 32 --embedding ragged --out runs/small-topk32-ragged --no-progress
