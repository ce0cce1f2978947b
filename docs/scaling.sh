#!/bin/bash
# The rows of docs/scaling.md: every job of the paper's configs compiled for TPU slices (and 8
# H100s) on this machine by python -m cfdg_jax.aot, one JSON report per row in docs/scaling/:
#   bash docs/scaling.sh [ROW ...]   # default: every row; a row is "NAME=CONFIG@TOPOLOGY [FLAG ...]"
#   python docs/make_scaling.py docs/scaling/*.json   # the markdown table
# Rows are compiled with --fast (XLA's least optimisation effort, several times faster on a CPU);
# DEFAULT_EFFORT=1 compiles as the jobs do. --suggest adds, where a job does not fit, the
# settings that make it fit. Each report's "command" field is the command that made it.
set -eu
cd "$(dirname "$0")/.."
out=docs/scaling
mkdir -p "$out"
rows=("$@")
if ((${#rows[@]} == 0)); then
  # 8 chips as configured (fsdp over all of them); 256 chips with the pod mesh the configs
  # recommend (fsdp within 8 chips, data parallel across them).
  for config in imagenet64 imagenet128; do
    for topology in v4:2x2x2 v5e:2x4 v5p:2x2x2 v6e:2x4; do
      rows+=("${config}_${topology/:/-}=configs/$config.py@$topology")
    done
  done
  for topology in v4:4x8x8 v5e:16x16 v5p:4x8x8 v6e:16x16; do
    rows+=("imagenet64_${topology/:/-}=configs/imagenet64.py@$topology --config.mesh.data=-1 --config.mesh.fsdp=8")
  done
  rows+=("imagenet64_h100-8=configs/imagenet64.py@h100:8")
fi
for row in "${rows[@]}"; do
  name=${row%%=*} spec=${row#*=}
  read -r spec extra <<< "$spec"
  config=${spec%@*} topology=${spec#*@}
  if [[ -s "$out/$name.json" ]]; then echo "# $name: done"; continue; fi
  command=(python -m cfdg_jax.aot --topology "$topology" --config "$config" ${extra:-} --suggest)
  if [[ -z "${DEFAULT_EFFORT:-}" ]]; then command+=(--fast); fi
  echo "# $name: ${command[*]}"
  start=$(date +%s)
  "${command[@]}" > "$out/$name.log" 2>&1 || true  # Exit 1: a job does not fit (in the report).
  if ! grep -q '^{' "$out/$name.log"; then tail -3 "$out/$name.log"; exit 1; fi
  grep '^{' "$out/$name.log" | tail -1 | python -c '
import json, sys
report = json.load(sys.stdin)
report["command"], report["seconds"] = sys.argv[1], int(sys.argv[2])
print(json.dumps(report))' "${command[*]}" "$(($(date +%s) - start))" > "$out/$name.json"
done
