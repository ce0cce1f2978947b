"""Tables and figures of docs/samplers.md from the rows docs/samplers.sh records.

  python docs/make_samplers.py --out_prefix docs/samplers WORKDIR [WORKDIR ...]

Each WORKDIR is a training run scored by docs/samplers.sh (its eval/results.jsonl); only its newest
step's rows with class-balanced labels are used. Writes <out_prefix>_nfe.png (classifier-FID and
accuracy against NFE per sampler, at each w) and <out_prefix>_guidance.png (classifier-FID and
accuracy against w per guidance method), and prints the Markdown tables.
"""
import argparse
import json
import pathlib
import re

from matplotlib import figure
from matplotlib import ticker

SAMPLERS = ("ancestral", "ddim", "dpmpp_2m", "heun")
METHOD_SAMPLER = "dpmpp_2m(grid='uniform',lower_order_final=True,num_steps=20)"


def load(workdir):
  """(data set name, rows of the newest evaluated step)."""
  path = pathlib.Path(workdir) / "eval" / "results.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  rows = [r for r in rows if "sampler" in r and r["labels"] == "balanced"]
  last = max(r["step"] for r in rows)
  return rows[0]["dataset"], [r for r in rows if r["step"] == last]


def name(row):
  return row["sampler"].split("(")[0]


def method(row):
  g = row["guidance"]
  if g.startswith("autoguidance"):
    step = re.search(r"guide_step=(\d+)", g).group(1)
    return f"autoguidance (step {step} as guide)"
  return {"cfg": "CFG"}.get(g, g.replace("cfg(", "CFG, ").rstrip(")"))


def nfe_table(dataset, rows, ws=(0.0, 1.0, 3.0)):
  rows = [r for r in rows if r["guidance"] == "cfg"]
  by = {(r["sampler"], r["w"]): r for r in rows}
  reference = {w: by.get(("ancestral(grid='cosine',num_steps=256,v=0.3)", w)) for w in ws}
  print(f"\n**{dataset}: classifier-FID (accuracy) against NFE, plain guidance; in brackets FID "
        "relative to ancestral at T = 256**\n")
  print("| sampler | NFE | " + " | ".join(f"w = {w:g}" for w in ws)
        + " | network examples per sample, w = 1 |")
  print("|---" * (len(ws) + 3) + "|")
  settings = sorted({r["sampler"] for r in rows},
                    key=lambda s: (SAMPLERS.index(s.split("(")[0]),
                                   next(r["nfe"] for r in rows if r["sampler"] == s)))
  for s in settings:
    cells = []
    for w in ws:
      r, ref = by.get((s, w)), reference[w]
      if r is None:
        cells.append("–")
        continue
      rel = f" [{r['classifier_fid'] / ref['classifier_fid']:.2f}×]" if ref else ""
      cells.append(f"{r['classifier_fid']:.3f} ({r['classifier_accuracy']:.3f}){rel}")
    examples = by[(s, 1.0)]["examples_per_sample"] if (s, 1.0) in by else float("nan")
    steps = next(r["num_steps"] for r in rows if r["sampler"] == s)
    nfe = next(r["nfe"] for r in rows if r["sampler"] == s)
    print(f"| {s.split('(')[0]}, {steps} steps | {nfe} | " + " | ".join(cells)
          + f" | {examples:.1f} |")


def method_table(dataset, rows):
  rows = [r for r in rows if r["sampler"] == METHOD_SAMPLER]
  ws = sorted({r["w"] for r in rows})
  by = {(method(r), r["w"]): r for r in rows}
  methods = list(dict.fromkeys(method(r) for r in sorted(rows, key=lambda r: r["guidance"] != "cfg")))
  print(f"\n**{dataset}: guidance methods with DPM-Solver++(2M), 20 steps: classifier-FID "
        "(accuracy); the best w of each in bold, with its network examples per sample**\n")
  print("| method | " + " | ".join(f"w = {w:g}" for w in ws) + " | examples per sample, best w |")
  print("|---" * (len(ws) + 2) + "|")
  for m in methods:
    present = [by[m, w] for w in ws if (m, w) in by]
    best = min(present, key=lambda r: r["classifier_fid"])
    cells = []
    for w in ws:
      r = by.get((m, w))
      text = "–" if r is None else f"{r['classifier_fid']:.3f} ({r['classifier_accuracy']:.3f})"
      cells.append(f"**{text}**" if r is best else text)
    print(f"| {m} | " + " | ".join(cells)
          + f" | {best['examples_per_sample']:.1f} |")


def _plain_ticks(*axes):
  """Log axes labelled 0.2, 0.5, 20 rather than 2×10^-1 (1, 2, 3, 5, 6, 8 times a power of 10)."""
  label = ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "123568" else "")
  for axis in axes:
    axis.set_major_formatter(label)
    axis.set_minor_formatter(label)


def plot_nfe(datasets, path):
  ws = (0.0, 1.0, 3.0)
  fig = figure.Figure(figsize=(15, 4.2 * len(datasets)), layout="constrained")
  axes = fig.subplots(len(datasets), len(ws), squeeze=False)
  for (dataset, rows), row_axes in zip(datasets, axes):
    rows = [r for r in rows if r["guidance"] == "cfg"]
    for ax, w in zip(row_axes, ws):
      for i, s in enumerate(SAMPLERS):
        points = sorted((r["nfe"], r["classifier_fid"]) for r in rows
                        if name(r) == s and r["w"] == w)
        if points:
          ax.plot(*zip(*points), marker="o", color=f"C{i}", label=s)
      ax.set(xscale="log", yscale="log", xlabel="denoiser evaluations per sample (NFE)",
             ylabel="classifier-FID (log scale)", title=f"{dataset}, w = {w:g}")
      _plain_ticks(ax.xaxis, ax.yaxis)
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=8)
  fig.suptitle("Sample quality against sampling cost, plain guidance (1,000 samples a point)")
  fig.savefig(path, dpi=90)


def plot_methods(datasets, path):
  fig = figure.Figure(figsize=(12, 4.2 * len(datasets)), layout="constrained")
  axes = fig.subplots(len(datasets), 2, squeeze=False)
  colors = {}  # One color per method across the data sets.
  for (dataset, rows), (left, right) in zip(datasets, axes):
    rows = [r for r in rows if r["sampler"] == METHOD_SAMPLER and r["w"] > 0]
    for m in dict.fromkeys(method(r) for r in rows):
      i = colors.setdefault(m, len(colors))
      points = sorted((r["w"], r["classifier_fid"], r["classifier_accuracy"]) for r in rows
                      if method(r) == m)
      ws, fids, accuracies = zip(*points)
      left.plot(ws, fids, marker="o", color=f"C{i}", label=m)
      right.plot(ws, accuracies, marker="o", color=f"C{i}", label=m)
    left.set(xlabel="guidance strength w", ylabel="classifier-FID (log scale)", yscale="log",
             title=f"{dataset}: FID (lower is better)")
    _plain_ticks(left.yaxis)
    right.set(xlabel="guidance strength w", ylabel="classifier accuracy",
              title=f"{dataset}: samples classified as their label")
    for ax in (left, right):
      ax.grid(alpha=0.3)
    left.legend(fontsize=8)
  fig.suptitle("Guidance methods with DPM-Solver++(2M), 20 steps (1,000 samples a point)")
  fig.savefig(path, dpi=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out_prefix", required=True, help="e.g. docs/samplers")
  args = parser.parse_args()
  datasets = [load(w) for w in args.workdirs]
  for dataset, rows in datasets:
    nfe_table(dataset, rows)
    method_table(dataset, rows)
  plot_nfe(datasets, f"{args.out_prefix}_nfe.png")
  plot_methods(datasets, f"{args.out_prefix}_guidance.png")


if __name__ == "__main__":
  main()
