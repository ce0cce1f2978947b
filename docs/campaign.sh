#!/bin/bash
# The measurements of docs/results.md for one data set, on one machine, one job after another:
#   bash docs/campaign.sh CONFIG OUT [--config.data.manual_dir=DIR ...]
# e.g. bash docs/campaign.sh configs/digits.py /tmp/campaign/digits
#      bash docs/campaign.sh configs/mnist_cpu.py /tmp/campaign/mnist \
#          --config.data.manual_dir=../shared/data/mnist
# Extra flags go to every job. In OUT: the classifier, one training workdir per p_uncond and
# training seed (p<p_uncond>_s<seed>, each scored into its eval/results.jsonl), logs/ and
# logs/campaign.log (start and end time of each job). Finished jobs are skipped when re-run: the
# trainer resumes or exits, the evaluator recomputes nothing recorded.
# Then: python docs/make_results.py --out_prefix docs/results_NAME OUT/p*_s*
set -eu
config=$1 out=$2
shift 2
data_flags=("$@")
# One XLA device per core: 1.1x faster training and 1.6x faster sampling on a 2-core CPU
# (bench/xla_host_devices.py).
export XLA_FLAGS="--xla_force_host_platform_device_count=$(nproc)"
mkdir -p "$out/logs"
run() {  # name command...: runs one job, logging to $out/logs/name.log.
  local name=$1
  shift
  echo "$(date -u +%FT%TZ) start $name" >> "$out/logs/campaign.log"
  "$@" "${data_flags[@]}" > "$out/logs/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) done  $name" >> "$out/logs/campaign.log"
}
last=$(python - "$config" "${data_flags[@]}" <<'EOF'  # num_train_steps, with the extra flags.
import sys
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config")
flags.FLAGS(["campaign", "--config", *sys.argv[1:]])
print(flags.FLAGS.config.num_train_steps)
EOF
)
half=$((last / 2))
train() {  # p_uncond seed [checkpoint_every]; a grid of samples at the end only.
  run "train_p$1_s$2" python -m cfdg_jax.train --config "$config" --workdir "$out/p$1_s$2" \
      --config.diffusion.p_uncond="$1" --config.seed="$2" --config.sample_every=1000000 \
      ${3:+--config.checkpoint_every=$3}
}
evaluate() {  # p_uncond seed name [flags]: every checkpoint of the run.
  local p=$1 seed=$2 name=$3
  shift 3
  run "eval_p${p}_s${seed}_$name" python -m cfdg_jax.evaluate --workdir "$out/p${p}_s${seed}" \
      --config "$config" --config.eval.classifier_dir="$out/classifier" \
      --config.eval.reference_cache="$out/reference" "$@"
}
final() {  # p_uncond seed name [flags]: the final checkpoint, which the sweeps score.
  evaluate "$@" --step "$last"
}

[[ -f $out/classifier/classifier.json ]] ||
  run classifier python -m cfdg_jax.eval.train_classifier --config "$config" \
      --out_dir "$out/classifier"
# The eval job beside a training run: it scores the halfway checkpoint while training goes on,
# then the final one (two w each); the sweeps below reuse the final checkpoint's rows.
train 0.2 0 "$half" &
trainer=$!
evaluate 0.2 0 watch --watch --poll_seconds 10 --config.eval.w="(0.0,1.0)" \
    --config.eval.step_sweep="()"
wait $trainer
for p in 0.1 0.5; do train $p 0; done
# The w sweep at T = 128 for every model first, so that a stopped campaign has the main result,
# and its spread for one model (again with other sampling noise); then the T sweep at w = 0.3
# and 1 (the rest of the config's eval section)...
for p in 0.2 0.1 0.5; do final $p 0 wsweep --config.eval.step_sweep="()"; done
final 0.2 0 seed1w --config.eval.seed=1 --config.eval.step_sweep="()"
for p in 0.2 0.1 0.5; do final $p 0 sweep; done
# ...and the rest of the sampling-noise spread (the T sweep for p_uncond = 0.2 only)...
for p in 0.1 0.5; do final $p 0 seed1w --config.eval.seed=1 --config.eval.step_sweep="()"; done
final 0.2 0 seed1 --config.eval.seed=1
# ...and with another training seed.
for p in 0.2 0.1 0.5; do
  train $p 1
  final $p 1 sweep --config.eval.step_sweep="()"
done
