"""What a resumed run changes against the config its checkpoint was trained with.

A run resumes bit-exactly only with the config it saved: the batches are a function of (seed,
batch size, data), the noise of (seed, step, diffusion), the parameters of the model. Fields
that decide those are REFUSED: a resume that changes one stops with a table, unless the user
says so (--allow_config_change). Fields that say only how, when or where the same run is computed
or looked at (logging, checkpoints, the mesh, sample grids, evaluation, data paths) are IGNORED.
Every other change (the learning rate, EMA decay, number of steps, dtype, ...) is allowed and
recorded: logged, and appended with its step to <workdir>/config_changes.jsonl.
"""
import json

import ml_collections
from absl import logging
from etils import epath

from cfdg_jax import errors

REFUSED = ("seed", "batch_size", "data", "diffusion", "model")
IGNORED = ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints",
           "max_nonfinite_steps", "mesh", "sample", "eval", "data.data_dir", "data.manual_dir",
           "data.prefetch", "data.num_workers")
HOW_COMPUTED = ("model.dtype", "model.remat", "model.attention")  # Within REFUSED: allowed.
LOG = "config_changes.jsonl"
_ABSENT = "(absent)"


def _under(field: str, prefixes: tuple[str, ...]) -> bool:
  return any(field == p or field.startswith(p + ".") for p in prefixes)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
  """{dotted field: its value as JSON} (tuples and the JSON's lists compare equal)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = json.dumps(value)
  return flat


def changes(saved: ml_collections.ConfigDict, here: ml_collections.ConfigDict
            ) -> list[tuple[str, str, str, bool]]:
  """[(field, checkpoint's value, this run's, refused)] of the fields that are not IGNORED.

  A field the checkpoint's config lacks (saved by an earlier version) is never refused.
  """
  a, b = flatten(saved.to_dict()), flatten(here.to_dict())
  rows = []
  for field in sorted(a.keys() | b.keys()):
    old, new = a.get(field, _ABSENT), b.get(field, _ABSENT)
    if old != new and not _under(field, IGNORED):
      refused = (_under(field, REFUSED) and not _under(field, HOW_COMPUTED)
                 and old != _ABSENT)
      rows.append((field, old, new, refused))
  return rows


def check(saved: ml_collections.ConfigDict, here: ml_collections.ConfigDict, step: int,
          workdir: str, *, allow: bool, write: bool) -> None:
  """Refuses (UserError, with a table) a resume from `step` that changes a REFUSED field unless
  `allow`; logs the changes and, if `write` (process 0), appends them to the workdir's LOG."""
  rows = changes(saved, here)
  refused = [r for r in rows if r[3]]
  if refused and not allow:
    width = max(len(f) for f, *_ in refused) + 9
    lines = [f"{workdir} was trained to step {step} with another config; these fields decide "
             "the batches, the noise or the model, so resuming would silently make another run:",
             f"  {'field':<{width}}{'checkpoint':<20}this run"]
    lines += [f"  {'config.' + f:<{width}}{old:<20}{new}" for f, old, new, _ in refused]
    lines.append("Resume with the checkpoint's values (<workdir>/config.json), use a new "
                 "--workdir, or pass --allow_config_change to resume with these changes.")
    raise errors.UserError("\n".join(lines))
  for field, old, new, _ in rows:
    logging.warning("Resuming from step %d with config.%s = %s (the checkpoint's: %s).", step,
                    field, new, old)
  if rows and write:
    value = lambda v: None if v == _ABSENT else json.loads(v)
    with (epath.Path(workdir) / LOG).open("a") as f:
      for field, old, new, _ in rows:
        f.write(json.dumps({"step": step, "field": field, "checkpoint": value(old),
                            "now": value(new)}) + "\n")
