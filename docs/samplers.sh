#!/bin/bash
# The measurements of docs/samplers.md for one trained model, with the evaluation job:
#   bash docs/samplers.sh CONFIG WORKDIR CLASSIFIER_DIR GUIDE_STEP [extra evaluate flags...]
# e.g. bash docs/samplers.sh configs/digits.py /tmp/campaign/digits/p0.2_s0 \
#          /tmp/campaign/digits/classifier 1000
# WORKDIR is a finished training run (docs/campaign.sh makes them) whose checkpoint at
# GUIDE_STEP is kept, to serve as the autoguidance guide. Rows go to WORKDIR/eval/results.jsonl
# (finished points are skipped when re-run); then
#   python docs/make_samplers.py --out_prefix docs/samplers_NAME WORKDIR
set -eu
config=$1 workdir=$2 classifier=$3 guide_step=$4
shift 4
# One XLA device per core (bench/xla_host_devices.py).
export XLA_FLAGS="--xla_force_host_platform_device_count=$(nproc)"
last=$(python - "$config" "$@" <<'EOF'  # num_train_steps, with the extra flags.
import sys
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config")
flags.FLAGS(["samplers", "--config", *sys.argv[1:]], known_only=True)
print(flags.FLAGS.config.num_train_steps)
EOF
)
evaluate() {  # Scores the final checkpoint at the points of the flags.
  python -m cfdg_jax.evaluate --workdir "$workdir" --config "$config" --step "$last" \
      --config.eval.classifier_dir="$classifier" --config.eval.step_sweep="()" "$@"
}
# 1. Quality against NFE: every sampler at several step counts, at w = 0, 1 and 3. SAMPLERS
# replaces the list (a cheaper study on a slower model).
evaluate --config.eval.w="(0.0,1.0,3.0)" --config.eval.samplers="${SAMPLERS:-(\
'ancestral(num_steps=16)','ancestral(num_steps=32)','ancestral(num_steps=64)',\
'ancestral(num_steps=128)','ancestral(num_steps=256)',\
'ddim(num_steps=10)','ddim(num_steps=20)','ddim(num_steps=50)','ddim(num_steps=100)',\
'dpmpp_2m(num_steps=10)','dpmpp_2m(num_steps=15)','dpmpp_2m(num_steps=20)',\
'dpmpp_2m(num_steps=30)','dpmpp_2m(num_steps=50)',\
'heun(num_steps=5)','heun(num_steps=8)','heun(num_steps=12)','heun(num_steps=20)')}" "$@"
# 2. Guidance methods against w, with DPM-Solver++(2M) at 20 steps: plain guidance, two guidance
# intervals (Kynkäänniemi et al.'s ImageNet interval σ in (0.28, 5.42], i.e. λ in [-3.38, 2.55],
# and a wider one), rescale, APG with and without momentum, and autoguidance by the checkpoint
# at GUIDE_STEP. GUIDED_W replaces the guidance weights; SHORT=1 keeps plain guidance, the first
# interval and autoguidance.
autoguidance="'autoguidance(guide_workdir=\"$workdir\",guide_step=$guide_step)'"
methods="'cfg','cfg(interval_lo=-3.38,interval_hi=2.55)',$autoguidance"
if [[ -z "${SHORT:-}" ]]; then
  methods+=",'cfg(interval_lo=-6.0,interval_hi=4.0)','cfg(rescale=0.7)','cfg(apg_eta=0.0)'"
  methods+=",'cfg(apg_eta=0.0,apg_momentum=-0.5)'"
fi
evaluate --config.eval.w="${GUIDED_W:-(0.5,1.0,2.0,3.0,4.0)}" \
    --config.eval.samplers="('dpmpp_2m(num_steps=20)',)" --config.eval.guidance="($methods)" "$@"
