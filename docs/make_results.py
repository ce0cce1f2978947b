"""Tables and figures of docs/results.md from evaluated training workdirs.

  python docs/make_results.py --out_prefix docs/results_digits WORKDIR [WORKDIR ...]

Each WORKDIR is a training run (its config.json gives p_uncond and the training seed) scored by
python -m cfdg_jax.evaluate (its eval/results.jsonl). Only each run's newest evaluated step is
used, and only rows of the paper's sampler (ancestral) with plain guidance and class-balanced
labels (docs/samplers.md has the other samplers). Writes <out_prefix>_tradeoff.png
(classifier-FID against classifier-IS and accuracy against w, at the main T) and, once a T sweep
is evaluated, <out_prefix>_steps.png (the metrics against T), and prints the Markdown tables. A
cell is the mean over the replicates found (training seeds x sampling seeds) +- their standard
deviation, with the replicate count n of that cell.
"""
import argparse
import collections
import json
import pathlib

import numpy as np
from matplotlib import figure
from matplotlib import ticker

METRICS = (("classifier_fid", "cls-FID", "{:.3f}"), ("classifier_is", "cls-IS", "{:.3f}"),
           ("classifier_accuracy", "accuracy", "{:.3f}"))


def load_rows(workdirs):
  """Rows of every run's newest evaluated step, each with p_uncond and train_seed added."""
  rows = []
  for workdir in map(pathlib.Path, workdirs):
    config = json.loads((workdir / "config.json").read_text())
    run_rows = [json.loads(line) for line in
                (workdir / "eval" / "results.jsonl").read_text().splitlines() if line.strip()]
    # Rows of earlier versions have no sampler, guidance or labels fields: all were these.
    run_rows = [r for r in run_rows if r.get("sampler", "ancestral").startswith("ancestral(")
                or "sampler" not in r]
    run_rows = [r for r in run_rows if (r.get("guidance", "cfg"), r.get("labels", "balanced"))
                == ("cfg", "balanced")]
    last = max(r["step"] for r in run_rows)
    rows += [dict(r, p_uncond=config["diffusion"]["p_uncond"], train_seed=config["seed"])
             for r in run_rows if r["step"] == last]
  return rows


def group(rows, *fields):
  groups = collections.defaultdict(list)
  for r in rows:
    groups[tuple(r[f] for f in fields)].append(r)
  return groups


def cell(rows, metric, fmt):
  """mean ± sd (n) over the cell's replicates."""
  values = np.array([r[metric] for r in rows])
  if len(values) == 1:
    return f"{fmt.format(values[0])} (n = 1)"
  return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))} (n = {len(values)})"


_SYMBOLS = {"w": "w", "num_steps": "T"}


def print_table(rows, title, row_field, metric, fmt):
  """One Markdown table: a row per `row_field` value, a column per p_uncond."""
  by = group(rows, "p_uncond", row_field)
  ps = sorted({r["p_uncond"] for r in rows})
  print(f"\n{title}\n")
  print(f"| {_SYMBOLS[row_field]} | " + " | ".join(f"p_uncond = {p}" for p in ps) + " |")
  print("|---" * (len(ps) + 1) + "|")
  for value in sorted({r[row_field] for r in rows}):
    print(f"| {value:g} | " + " | ".join(cell(by[p, value], metric, fmt) if by[p, value] else "–"
                                        for p in ps) + " |")


def print_tables(rows, main_steps):
  """The w sweep at T = main_steps, then the T sweep at each of its w."""
  w_rows = [r for r in rows if r["num_steps"] == main_steps]
  for metric, name, fmt in METRICS:
    print_table(w_rows, f"{name} at T = {main_steps}", "w", metric, fmt)
  step_ws = sorted({r["w"] for r in rows if r["num_steps"] != main_steps})
  for metric, name, fmt in METRICS[:2]:  # The accuracy is ~1 at these w.
    for w in step_ws:
      print_table([r for r in rows if r["w"] == w], f"{name} at w = {w:g}", "num_steps", metric,
                  fmt)


def mean_curve(rows, x, y):
  """(w, mean x, mean y) lists over the replicates of each w, in increasing w."""
  points = group(rows, "w")
  keys = sorted(points)
  return ([w for w, in keys], [np.mean([r[x] for r in points[k]]) for k in keys],
          [np.mean([r[y] for r in points[k]]) for k in keys])


def plot_tradeoff(rows, num_steps, path, title):
  rows = [r for r in rows if r["num_steps"] == num_steps]
  fig = figure.Figure(figsize=(13, 5), layout="constrained")
  left, right = fig.subplots(1, 2)
  for (p,), p_rows in sorted(group(rows, "p_uncond").items()):
    ws, xs, ys = mean_curve(p_rows, "classifier_is", "classifier_fid")
    line, = left.plot(xs, ys, marker="o", label=f"p_uncond = {p}")
    left.scatter([r["classifier_is"] for r in p_rows], [r["classifier_fid"] for r in p_rows],
                 s=8, color=line.get_color(), alpha=0.4)
    for w, x, y in zip(ws, xs, ys):
      left.annotate(f"{w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                    color=line.get_color())
    ws, accuracy, _ = mean_curve(p_rows, "classifier_accuracy", "classifier_accuracy")
    right.plot(ws, accuracy, marker="o", label=f"p_uncond = {p}")
  left.set(xlabel="classifier-IS", ylabel="classifier-FID (lower is better)",
           title="FID against IS, one point per w (labels); small dots: replicates")
  ws = sorted({r["w"] for r in rows})
  right.set(xscale="symlog", xticks=ws, xticklabels=[f"{w:g}" for w in ws],
            xlabel="guidance strength w (linear to 1, then logarithmic)",
            ylabel="accuracy on the conditioning label", title="samples classified as their label")
  right.xaxis.set_minor_locator(ticker.NullLocator())
  test_accuracy = rows[0].get("classifier_test_accuracy")
  if test_accuracy is not None:
    right.axhline(test_accuracy, color="gray", linestyle="--", linewidth=1,
                  label=f"classifier on real test images ({test_accuracy:.3f})")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
  fig.suptitle(title)
  fig.savefig(path, dpi=100)


def plot_steps(rows, main_steps, path, title):
  step_ws = {r["w"] for r in rows if r["num_steps"] != main_steps}
  rows = [r for r in rows if r["w"] in step_ws]
  fig = figure.Figure(figsize=(13, 5), layout="constrained")
  axes = fig.subplots(1, 2)
  ps = sorted({r["p_uncond"] for r in rows})
  for (p, w), curve_rows in sorted(group(rows, "p_uncond", "w").items()):
    by_t = group(curve_rows, "num_steps")
    ts = sorted(by_t)
    if len(ts) < 2:
      continue
    for ax, metric in zip(axes, ("classifier_fid", "classifier_is")):
      ax.plot([t for t, in ts], [np.mean([r[metric] for r in by_t[t]]) for t in ts],
              marker="o", color=f"C{ps.index(p)}", linestyle="-" if w == min(step_ws) else "--",
              label=f"p_uncond = {p}, w = {w:g}")
  ts = sorted({r["num_steps"] for r in rows})
  for ax, name in zip(axes, ("classifier-FID (lower is better)", "classifier-IS")):
    ax.set(xscale="log", xticks=ts, xticklabels=[str(t) for t in ts], xlabel="sampling steps T",
           ylabel=name)
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.grid(alpha=0.3)
  # One legend for both panels, below them, where it covers no line.
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9)
  fig.suptitle(title)
  fig.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out_prefix", required=True, help="e.g. docs/results_digits")
  parser.add_argument("--num_steps", type=int, default=128, help="T of the w sweep.")
  args = parser.parse_args()
  rows = load_rows(args.workdirs)
  dataset, samples = rows[0]["dataset"], rows[0]["num_samples"]
  print_tables(rows, args.num_steps)
  plot_tradeoff(rows, args.num_steps, f"{args.out_prefix}_tradeoff.png",
                f"{dataset}: guidance sweep at T = {args.num_steps}, {samples} samples per point")
  if any(r["num_steps"] != args.num_steps for r in rows):  # No T sweep evaluated yet: no plot.
    plot_steps(rows, args.num_steps, f"{args.out_prefix}_steps.png",
               f"{dataset}: sampling steps T, {samples} samples per point")


if __name__ == "__main__":
  main()
