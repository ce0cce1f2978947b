"""Wall time of guided sampling with and without a guidance interval, from one checkpoint.

  python bench/guidance_interval.py --workdir /tmp/cfdg_digits --w 1 --interval=-3.38,2.55

Samples the same labels and noise with plain guidance and with guidance only for λ in the
interval (the conditional pass alone, on B examples instead of 2B, elsewhere), alternating the
two --repeats times after a compiling warm-up, and prints one JSON line: the median seconds of
each, their ratio, and the network examples per sample of each (the sampler's own counters).
"""
import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run from a checkout.
import cfdg_jax  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--sampler", default="dpmpp_2m")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--w", type=float, default=1.0)
  parser.add_argument("--interval", default="-3.38,2.55", help="λ_lo,λ_hi")
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  lo, hi = (float(x) for x in args.interval.split(","))

  pipe = cfdg_jax.load(args.workdir, args.step)
  labels = np.arange(args.num_samples) % pipe.config.data.num_classes
  settings = {"plain": {}, "interval": {"interval_lo": lo, "interval_hi": hi}}
  seconds = {name: [] for name in settings}
  examples = {}

  def run(name):
    start = time.perf_counter()
    for part in range(0, args.num_samples, args.batch_size):
      pipe.sample(labels[part:part + args.batch_size], args.w, sampler=args.sampler,
                  num_steps=args.steps, **settings[name])
      examples[name] = examples.get(name, 0) + pipe.last_stats["examples"]
    return time.perf_counter() - start

  for name in settings:  # Compiles.
    run(name)
  examples.clear()
  for _ in range(args.repeats):
    for name in settings:
      seconds[name].append(run(name))
  median = {name: statistics.median(s) for name, s in seconds.items()}
  print(json.dumps({
      "workdir": args.workdir, "step": pipe.step, "sampler": args.sampler, "steps": args.steps,
      "w": args.w, "interval": [lo, hi], "num_samples": args.num_samples,
      "seconds_plain": median["plain"], "seconds_interval": median["interval"],
      "ratio_interval_to_plain": median["interval"] / median["plain"],
      "examples_per_sample_plain": examples["plain"] / args.repeats / args.num_samples,
      "examples_per_sample_interval": examples["interval"] / args.repeats / args.num_samples,
      "all_seconds": seconds}))


if __name__ == "__main__":
  main()
