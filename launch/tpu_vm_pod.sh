#!/usr/bin/env bash
# Runs a cfdg_jax job on every worker of a Cloud TPU VM pod slice, from any machine with gcloud:
#
#   TPU_NAME=cfdg-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 launch/tpu_vm_pod.sh -- \
#       cfdg_jax.train --config configs/imagenet64.py --workdir gs://BUCKET/cfdg/in64 \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets
#   launch/tpu_vm_pod.sh --dry_run -- cfdg_jax.train ...   # prints the commands only
#
# Steps: (0) here, before any slice is created or used: compile the job for ACCELERATOR_TYPE with
# python -m cfdg_jax.aot (libtpu: pip install -r requirements-tpu.txt) and stop with its message
# when it would not fit (--skip_check skips this; CHECK_FLAGS adds flags, e.g. --fast); (1)
# create the slice if it does not exist (ACCELERATOR_TYPE, RUNTIME_VERSION; SPOT=1 for a
# preemptible one); (2) ship this repository's committed tree (git archive HEAD) to every worker;
# (3) install requirements.txt and jax[tpu] there (SKIP_INSTALL=1 skips it); (4) run
# `python3 -m MODULE FLAGS --distributed` on --worker=all (JAX finds the other workers itself)
# and stream the output (worker 0 logs progress; the others only warnings). Keep the workdir and
# the TFDS data dir on GCS, so that every worker reads and writes the same ones. The job ends
# with the ssh session: start long runs inside tmux or screen.
set -euo pipefail

dry_run=0
skip_check=0
while [[ "${1:-}" == --dry_run || "${1:-}" == --skip_check ]]; do
  if [[ "$1" == --dry_run ]]; then dry_run=1; else skip_check=1; fi
  shift
done
if [[ "${1:-}" == "--" ]]; then shift; fi
if (($# == 0)); then
  echo "usage: $0 [--dry_run] [--skip_check] -- MODULE [FLAGS...], e.g. -- cfdg_jax.train" \
       "--config ..." >&2
  exit 2
fi
TPU_NAME="${TPU_NAME:?set TPU_NAME, the slice to create or reuse}"
ZONE="${ZONE:?set ZONE, e.g. us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REPO_DIR="${REPO_DIR:-cfdg_jax}"  # On each worker, relative to its home directory.
JAX_VERSION="$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")"
for arg in "$@"; do
  if [[ "$arg" == --workdir=/* || "$arg" == /* ]]; then
    echo "warning: $arg is a local path; each worker would write its own. Use gs://." >&2
  fi
done

quote() {  # One argument as a shell reads it back, in single quotes where needed.
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {  # Prints the command; runs it unless --dry_run.
  local arg line=""
  for arg in "$@"; do line+="$(quote "$arg") "; done
  echo "${line% }"
  if ((!dry_run)); then "$@"; fi
}
remote() {  # A command line for the workers' shell, each argument quoted.
  local arg line=""
  for arg in "$@"; do line+="$(quote "$arg") "; done
  printf '%s' "${line% }"
}
tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")

# (0) Does the job fit the slice? Its --config and --config.* flags, compiled here for it.
declare -A check_jobs=([cfdg_jax.train]=train [cfdg_jax.evaluate]=eval)
config=() overrides=()
for ((i = 2; i <= $#; i++)); do
  arg="${!i}"
  if [[ "$arg" == --config ]]; then next=$((i + 1)); config=(--config "${!next}")
  elif [[ "$arg" == --config=* ]]; then config=("$arg")
  elif [[ "$arg" == --config.* ]]; then overrides+=("$arg"); fi
done
if ((!skip_check)) && [[ -n "${check_jobs[$1]:-}" && ${#config[@]} -gt 0 ]]; then
  echo "# does the job fit $ACCELERATOR_TYPE? (--skip_check skips this)"
  # shellcheck disable=SC2086  (CHECK_FLAGS: extra flags, split on spaces)
  if ! run env -C "$(dirname "$0")/.." python3 -m cfdg_jax.aot --topology "$ACCELERATOR_TYPE" --jobs "${check_jobs[$1]}" \
      "${config[@]}" "${overrides[@]}" ${CHECK_FLAGS:-}; then
    echo "$0: not launched: the job does not fit $ACCELERATOR_TYPE, or the check failed (above)." >&2
    exit 1
  fi
elif ((!skip_check)); then
  echo "# no fit check: $1 without --config (python -m cfdg_jax.aot checks a config)"
fi

if ((dry_run)) || ! "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" > /dev/null 2>&1; then
  echo "# if $TPU_NAME does not exist yet:"
  run "${tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
      --version "$RUNTIME_VERSION" ${SPOT:+--spot}
fi
archive="${TMPDIR:-/tmp}/cfdg_jax_$$.tar.gz"
run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$TPU_NAME:cfdg_jax.tar.gz" "${where[@]}" --worker=all
run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command \
    "rm -rf $(remote "$REPO_DIR") && mkdir -p $(remote "$REPO_DIR") && tar xzf cfdg_jax.tar.gz -C $(remote "$REPO_DIR")"
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command \
      "cd $(remote "$REPO_DIR") && python3 -m pip install -q -r requirements.txt $(remote "jax[tpu]==$JAX_VERSION")"
fi
run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command \
    "cd $(remote "$REPO_DIR") && python3 -m $(remote "$@") --distributed"
