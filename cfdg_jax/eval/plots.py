"""The evaluation job's plots, from results rows (cfdg_jax/eval/evaluator.py).

  tradeoff.png  the w trade-off at one sampler and guidance setting, per checkpoint;
  nfe.png       FID against denoiser evaluations per sample, one line per sampler, per w.
"""
from typing import Any, Mapping, Sequence

import matplotlib
from etils import epath
from matplotlib import figure

PLOT_CHECKPOINTS = 4  # Newest checkpoints drawn in tradeoff.png.
# (x, y, x label, y label) of the trade-off's left panel, in order of preference.
_TRADEOFF_AXES = (("is", "fid", "Inception Score", "FID (Inception)"),
                  ("classifier_is", "classifier_fid", "classifier Inception Score",
                   "classifier FID"),
                  ("w", "fid", "guidance strength w", "FID (Inception)"))
_FIDS = (("fid", "FID (Inception)"), ("classifier_fid", "classifier FID"))


def _save(fig: figure.Figure, path: epath.PathLike) -> None:
  with epath.Path(path).open("wb") as f:  # Local paths and gs:// alike.
    fig.savefig(f, format="png", dpi=100)


def write_tradeoff_plot(path: epath.PathLike, rows: Sequence[Mapping[str, Any]], *,
                        title: str) -> bool:
  """Draws the w trade-off of the newest checkpoints into a PNG; rows: one setting's.

  Left: FID against IS (Inception's when both exist, else the classifier's; FID against w when no
  IS exists), one point per w labelled with w. Right: classifier accuracy against w. One line per
  checkpoint, the newest PLOT_CHECKPOINTS, darker when newer. Returns False (and writes nothing)
  when there are no rows.
  """
  if not rows:
    return False
  steps = sorted({r["step"] for r in rows})[-PLOT_CHECKPOINTS:]
  rows = [r for r in rows if r["step"] in steps]
  # The first pair that the rows have (rows recorded with other metric settings may lack it).
  for x_name, y_name, x_label, y_label in _TRADEOFF_AXES:
    if any(x_name in r and y_name in r for r in rows):
      break

  fig = figure.Figure(figsize=(12, 5), layout="constrained")
  left, right = fig.subplots(1, 2)
  colors = [matplotlib.colormaps["Blues"](1.0 - 0.6 * i / max(len(steps) - 1, 1))
            for i in reversed(range(len(steps)))]
  labelled = []
  for step, color in zip(steps, colors):
    points = sorted((r for r in rows if r["step"] == step), key=lambda r: r["w"])
    newest = step == steps[-1]
    style = {"color": color, "marker": "o", "linewidth": 2.0 if newest else 1.0,
             "label": f"step {step}"}
    quality = [r for r in points if x_name in r and y_name in r]
    if quality:
      left.plot([r[x_name] for r in quality], [r[y_name] for r in quality], **style)
      labelled = quality  # The newest line with points gets the w labels.
    accuracy = [r for r in points if "classifier_accuracy" in r]
    if accuracy:
      right.plot([r["w"] for r in accuracy], [r["classifier_accuracy"] for r in accuracy], **style)
  for r in labelled:
    left.annotate(f"w={r['w']:g}", (r[x_name], r[y_name]), textcoords="offset points",
                  xytext=(5, 5), fontsize=9)
  left.set(xlabel=x_label, ylabel=y_label, title="one point per w (lower FID is better)")
  left.ticklabel_format(useOffset=False)
  left.grid(alpha=0.3)
  left.legend(fontsize=9)
  test_accuracy = [r["classifier_test_accuracy"] for r in rows if "classifier_test_accuracy" in r]
  if test_accuracy:
    right.axhline(test_accuracy[-1], color="tab:red", linestyle="--", linewidth=1,
                  label=f"classifier on test images ({test_accuracy[-1]:.3f})")
    right.set(xlabel="guidance strength w", ylabel="classifier accuracy on the sampled class",
              title="samples recognised as their class")
    right.grid(alpha=0.3)
    right.legend(fontsize=9)
  else:
    right.text(0.5, 0.5, "no classifier:\nset config.eval.classifier_dir", ha="center",
               va="center", transform=right.transAxes)
    right.set_axis_off()
  fig.suptitle(title)
  _save(fig, path)
  return True


def write_nfe_plot(path: epath.PathLike, rows: Sequence[Mapping[str, Any]], *, title: str) -> bool:
  """FID against NFE (denoiser evaluations per sample), one line per sampler family and
  guidance setting, one panel per w; rows: one checkpoint's. Returns False without 2 NFE values.
  """
  fid, label = next(((k, l) for k, l in _FIDS if any(k in r for r in rows)), (None, None))
  rows = [r for r in rows if fid and fid in r]
  if len({r["nfe"] for r in rows}) < 2:
    return False
  ws = sorted({r["w"] for r in rows})
  fig = figure.Figure(figsize=(4.5 * len(ws), 4.5), layout="constrained")
  axes = fig.subplots(1, len(ws), squeeze=False)[0]
  # A line joins the settings that differ only in num_steps; a sampler's name labels it unless
  # two lines share the name.
  families = sorted({(r["sampler_family"], r["guidance"]) for r in rows})
  names = [f.split("(")[0] for f, _ in families]
  for ax, w in zip(axes, ws):
    for (family, guide), name in zip(families, names):
      points = sorted((r["nfe"], r[fid]) for r in rows
                      if (r["sampler_family"], r["guidance"], r["w"]) == (family, guide, w))
      if points:
        name = family if names.count(name) > 1 else name
        ax.plot(*zip(*points), marker="o", label=name if guide == "cfg" else f"{name}, {guide}")
    ax.set(xscale="log", yscale="log", xlabel="denoiser evaluations per sample (NFE)",
           ylabel=label, title=f"w = {w:g}")
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  _save(fig, path)
  return True
