"""The table of docs/scaling.md from the reports of docs/scaling.sh (python -m cfdg_jax.aot).

  python docs/make_scaling.py docs/scaling/*.json

One row per report: the config's own setting, and where a job does not fit, the setting
--suggest found; per job the peak GiB per chip (the largest of its programs); the train step's
collectives, its roofline estimate (a lower bound on time, not a measurement) and the days for the
config's num_train_steps at it.
"""
import json
import pathlib
import sys

GIB = 2**30


def _peak(job: dict) -> str:
  over = not job["fits"]
  return f"{job['peak_bytes'] / GIB:.1f}{' ✗' if over else ''}"


def _setting(report: dict) -> str:
  mesh = report["mesh"]
  data = f"data {mesh['data']} × " if mesh["data"] > 1 else ""
  return f"{data}fsdp {mesh['fsdp']}, remat {report['remat']}"


def row(report: dict) -> str:
  name = pathlib.Path(report["config"]).stem
  chosen = report.get("suggestion") or report
  jobs = {j: chosen["jobs"].get(j) or report["jobs"][j] for j in report["jobs"]}
  step = jobs["train"]["programs"].get("train_step", {})
  estimate = jobs["train"].get("estimate")
  coll = step.get("collectives", {})
  gathered = sum(c["bytes"] for c in coll.values()) / 1e9
  ici_ms = step.get("estimate", {}).get("collective_s", 0.0) * 1e3
  fits = "yes" if report["fits"] else (f"with {report['suggestion']['flags']}"
                                       if report.get("suggestion") else "no")
  cells = [name, report["topology"], str(report["chips"]),
           f"{report['chip']['usable_hbm_bytes'] / GIB:.2f}", _setting(report), fits,
           *(_peak(jobs[j]) if j in jobs else "–" for j in ("train", "sample", "eval")),
           f"{gathered:.2f} / {ici_ms:.0f}" if coll else "–",
           f"{estimate['step_s']:.3f}" if estimate else "–",
           f"{estimate['images_per_s']:,.0f}" if estimate else "–",
           f"{estimate['days']:.1f}" if estimate else "–",
           f"{report['seconds'] / 60:.0f}"]
  return "| " + " | ".join(cells) + " |"


HEADER = ("| config | slice | chips | usable GiB/chip | config's setting | fits | train GiB | "
          "sample GiB | eval GiB | train-step collectives GB / ICI ms | est. step s | "
          "est. images/s | est. days | compile min |\n|" + "---|" * 14)


def main(paths: list[str]) -> None:
  reports = [json.loads(pathlib.Path(p).read_text()) for p in paths]
  print(HEADER)
  for report in reports:
    print(row(report))
  print("\nThe commands (each row's report: docs/scaling/CONFIG_SLICE.json, its log beside it):\n")
  print("```sh")
  for report in reports:
    print(f"{report['command']}  # {report['seconds'] / 60:.0f} min")
  print("```")


if __name__ == "__main__":
  main(sys.argv[1:])
