#!/usr/bin/env bash
# Runs N training processes on this machine's CPU, as a multi-host job would, to exercise the
# multi-process code paths (jax.distributed, per-process input shards, checkpointing, sampling).
#
# Usage, from the repository root:
#   launch/local_multiprocess.sh [--config.field=value ...]
#   NUM_PROCESSES=4 launch/local_multiprocess.sh --config.num_train_steps=100
#
# Logs go to $WORKDIR/logs/process_<i>.log. Exits non-zero if any process fails; the others are
# then stopped, since they would wait for their peer in the next collective.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"  # CPU devices each process exposes to JAX.
CONFIG="${CONFIG:-configs/digits.py}"
WORKDIR="${WORKDIR:-/tmp/cfdg_multiprocess}"
PORT="${PORT:-12355}"  # Process 0 runs the coordination service on localhost:$PORT.
PYTHON="${PYTHON:-python}"

export JAX_PLATFORMS=cpu
# jax reads its config option jax_cpu_collectives_implementation from this variable; gloo is
# jax 0.10's default already, named here because cross-process CPU collectives need it.
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export JAX_NUM_CPU_DEVICES="$DEVICES_PER_PROCESS"

mkdir -p "$WORKDIR/logs"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  "$PYTHON" -m cfdg_jax.train --config "$CONFIG" --workdir "$WORKDIR" --distributed \
      --coordinator_address="localhost:$PORT" --num_processes="$NUM_PROCESSES" \
      --process_id="$i" "$@" > "$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=("$!")
done

status=0
for ((n = 0; n < NUM_PROCESSES; n++)); do
  if ! wait -n; then
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
if ((status)); then
  echo "A process failed; see $WORKDIR/logs/process_*.log" >&2
fi
exit "$status"
