#!/usr/bin/env bash
# Starts the same training command on every worker of a Cloud TPU VM pod slice.
#
# Usage, from any machine with gcloud:
#   TPU_NAME=my-v4-64 ZONE=us-central2-b BUCKET=gs://my-bucket launch/tpu_vm_pod.sh \
#       [--config.field=value ...]
#
# Every worker needs this repository at $REPO_DIR (relative to its home directory) and the
# Python environment (see launch/README.md). With --distributed and no further flags, JAX detects
# the slice's workers itself. The workdir and the TFDS data dir are on GCS so that every worker
# reads and writes the same ones. The command runs in the foreground and ends with this ssh
# session: start long runs inside tmux or screen.
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ZONE="${ZONE:?set ZONE}"
BUCKET="${BUCKET:?set BUCKET, e.g. gs://my-bucket}"
CONFIG="${CONFIG:-configs/imagenet64.py}"
WORKDIR="${WORKDIR:-$BUCKET/cfdg/$(basename "$CONFIG" .py)}"
DATA_DIR="${DATA_DIR:-$BUCKET/tensorflow_datasets}"  # Holds the prepared TFDS data set.
REPO_DIR="${REPO_DIR:-cfdg_jax}"
PYTHON="${PYTHON:-python3}"

# Quoted once more for the remote shell.
command="cd $(printf '%q' "$REPO_DIR") && $PYTHON -m cfdg_jax.train"
for arg in --config "$CONFIG" --workdir "$WORKDIR" --config.data.data_dir="$DATA_DIR" \
    --distributed "$@"; do
  command+=" $(printf '%q' "$arg")"
done

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$command"
