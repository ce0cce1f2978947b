"""results.jsonl: the evaluation job's rows, one JSON object per line, and their identity.

A row is identified by KEY_FIELDS: the checkpoint step, w, the sampler and guidance settings in
canonical form (cfdg_jax/samplers, cfdg_jax/guidance), the label protocol, num_samples, the seed,
and the metric networks by the SHA-1 of their weights. A row with the same key is never computed
again; one that differs in any of them (another sampler field, retrained classifier weights) is.
"""
import json
import os
from typing import Any, Mapping

from absl import logging
from etils import epath

KEY_FIELDS = ("step", "w", "sampler", "guidance", "labels", "num_samples", "seed",
              "metric_networks")


def row_key(row: Mapping[str, Any]) -> tuple:
  """The identity of a results row (KEY_FIELDS, with normalised types); KeyError if incomplete."""
  return (int(row["step"]), float(row["w"]), str(row["sampler"]), str(row["guidance"]),
          str(row["labels"]), int(row["num_samples"]), int(row["seed"]),
          tuple(sorted(row["metric_networks"].items())))


class ResultsLog:
  """results.jsonl: rows appended and flushed to disk one at a time, as they are computed."""

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    self.rows = []
    text = self.path.read_text() if self.path.exists() else ""
    # A crash during a write leaves a partial last line: it is skipped, and the next row starts
    # on a fresh line.
    self._needs_newline = bool(text) and not text.endswith("\n")
    old = 0
    for number, line in enumerate(text.splitlines(), 1):
      try:
        row = json.loads(line)
      except ValueError:
        logging.warning("%s line %d is not a complete results row; ignored (it is recomputed).",
                        self.path, number)
        continue
      try:
        row_key(row)
      except (KeyError, TypeError, AttributeError, ValueError):
        old += 1  # A row of an earlier version, keyed otherwise: kept in the file, not reused.
        continue
      self.rows.append(row)
    if old:
      logging.warning("%s holds %d rows written by an earlier version (without the sampler and "
                      "metric-network keys); they stay in the file but are not reused.",
                      self.path, old)
    self._index = {row_key(row): row for row in self.rows}

  def get(self, key: tuple) -> dict | None:
    return self._index.get(key)

  def append(self, row: dict) -> None:
    line = ("\n" if self._needs_newline else "") + json.dumps(row, sort_keys=True) + "\n"
    if "://" in os.fspath(self.path):
      # Object stores cannot append: rewrite the (small) object whole, which is atomic there.
      self.path.write_text((self.path.read_text() if self.path.exists() else "") + line)
    else:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    self._needs_newline = False
    self.rows.append(row)
    self._index[row_key(row)] = row
