"""What a compiled program costs on each of its devices, as XLA reports it: memory, FLOPs, bytes
accessed and collectives (read from the optimized HLO), and a roofline estimate of its time.

  costs.measure(jax.jit(f).lower(*abstract_args).compile(), chip)

Every figure is per device (per chip on a TPU). XLA's cost analysis and this module's HLO reading
count a loop's body once: for a sampler they give one step of its loop.
"""
import collections
import re
from typing import Any

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Bytes each device sends per byte of the full buffer, in a ring over n devices (bandwidth term).
_RING_FACTOR = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
                "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
                "collective-permute": lambda n: 1.0}
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
                "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) (" + "|".join(COLLECTIVES)
                 + r"|fusion|async-start)(-start|-done)?\((%[\w.-]+)?")


def shape_bytes(text: str) -> float:
  """Bytes of every array shape written in `text`, e.g. "(bf16[2,3]{1,0}, f32[4])" -> 28."""
  return float(sum(_DTYPE_BYTES[dtype] * np.prod([int(d) for d in dims.split(",") if d] or [1])
                   for dtype, dims in _SHAPE.findall(text)))


def group_size(line: str) -> int:
  """Devices per replica group of a collective's HLO line (1 when it names no groups)."""
  if match := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
    return len(match.group(1).split(","))
  if match := re.search(r"replica_groups=\[(\d+),(\d+)\]", line):
    return int(match.group(2))
  if match := re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", line):
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", match.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'(\w+)'", match.group(2))]))
  return 1


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {"count", "bytes", "ring_bytes"}} of the collectives in an optimized HLO module.

  bytes: the full buffers (an all-gather's result, a reduce-scatter's input); ring_bytes: what
  each device sends for them in a ring, the bandwidth term of their time. Asynchronous pairs
  (GPU) count once, at their -done; a collective wrapped in a called computation (async-start;
  TPU's reduce-scatter, a fusion calling "all-reduce-scatter") counts at its call site.
  """
  computations, headers, current = collections.defaultdict(list), {}, None
  for line in hlo_text.splitlines():
    if match := _HEADER.match(line):
      current = match.group(1)
      headers[current] = match.group(2)
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
  called = set(re.findall(r"calls=%([\w.-]+)", hlo_text))
  starts = {m.group(1): group_size(line) for lines in computations.values() for line in lines
            if (m := _OP.match(line)) and m.group(4) == "-start"}
  out = {kind: {"count": 0, "bytes": 0.0, "ring_bytes": 0.0} for kind in COLLECTIVES}

  def add(kind, size, n):
    out[kind]["count"] += 1
    out[kind]["bytes"] += size
    out[kind]["ring_bytes"] += size * _RING_FACTOR[kind](max(n, 1))

  def inner(name):  # The first collective in a called computation: (kind, result, line).
    for line in computations.get(name, ()):
      if (m := _OP.match(line)) and m.group(3) in COLLECTIVES:
        return m.group(3), m.group(2), line
    return None

  for name, lines in computations.items():
    if name in called:
      continue  # Counted where it is called.
    for line in lines:
      if not (match := _OP.match(line)):
        continue
      _, result, op, suffix, operand = match.groups()
      if op in ("fusion", "async-start"):
        callee = re.search(r"calls=%([\w.-]+)", line)
        found = callee and inner(callee.group(1))
        if found and callee.group(1).startswith("all-reduce-scatter"):
          add("reduce-scatter", shape_bytes(headers[callee.group(1)]), group_size(found[2]))
        elif found and op == "async-start":
          kind, inner_result, inner_line = found
          n = group_size(inner_line)
          add(kind, shape_bytes(inner_result) * (n if kind == "reduce-scatter" else 1), n)
        continue
      if suffix == "-start":
        continue  # Counted at its -done, whose result is the collective's.
      n = starts.get((operand or "%")[1:], 1) if suffix == "-done" else group_size(line)
      add(op, shape_bytes(result) * (n if op == "reduce-scatter" else 1), n)
  return {kind: value for kind, value in out.items() if value["count"]}


def lowered_flops(lowered: Any) -> float:
  """XLA's FLOP count of a lowered program before partitioning: all devices together."""
  cost = lowered.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def measure(compiled: Any, chip: Any = None) -> dict[str, Any]:
  """Per-device memory, cost and collectives of a compiled program (`jax.stages.Compiled`).

  With `chip` (topology.Chip) also the roofline estimate: compute time (FLOPs over the peak bf16
  rate), HBM time (bytes accessed over the HBM bandwidth), collective time (ring bytes over the
  ICI bandwidth), all lower bounds, none measured.
  """
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  report = {
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "code_bytes": memory.generated_code_size_in_bytes,
      "total_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                      - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
      "flops": float(cost.get("flops", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "collectives": collectives(compiled.as_text()),
  }
  if chip is not None:
    report["estimate"] = roofline(report, chip)
  return report


def roofline(report: dict[str, Any], chip: Any) -> dict[str, float]:
  """Lower bounds on one execution's seconds from the chip's published rates (an estimate)."""
  compute = report["flops"] / chip.peak_flops
  hbm = report["bytes_accessed"] / chip.hbm_bandwidth
  ring = sum(c["ring_bytes"] for c in report["collectives"].values())
  return {"compute_s": compute, "hbm_s": hbm, "step_s": max(compute, hbm),
          "collective_s": ring / chip.ici_bandwidth}
