"""Where a config's train step spends its time: a jax.profiler trace, op by op, grouped.

  python bench/profile.py --config configs/mnist.py [--config.x=...] [--steps 2] [--top 15] \
      [--trace_dir /tmp/trace] [--out profile.json]

Compiles the train step that training uses (as bench/train.py), runs it once, then traces
--steps steps with jax.profiler and reads the trace back (the XSpace protobuf that TensorBoard's
profiler plugin reads; keep it with --trace_dir to open it there). Each executed XLA op (on the
CPU: each thunk) is matched by name to its HLO instruction in the compiled module, and its time
is summed by
  kind    what the op computes: convolution, convolution_weight_grad (the backward pass's
          gradient of a kernel: a convolution whose window is the feature map), dot (matmul),
          reduction (e.g. GroupNorm's moments,
          softmax sums), elementwise (fused loops), copy (transposes and layout changes),
          collective (all-reduce of the gradients), other;
  block   the UNet block it belongs to, from the op's source metadata: attention, resblock,
          other (embeddings, up/down-sampling convolutions, loss, optimizer update).
Prints ONE JSON line: seconds and share per kind, per block and per (block, kind), the --top
ops (with the JAX operation each came from, e.g. .../down0_res1/conv0/conv_general_dilated), and the total op time summed over the threads that run them (on a CPU, over its cores:
so it exceeds the wall time). Tested on the CPU; on a GPU the same trace holds its kernels under
other names, which are then counted as "unmatched".
"""
import collections
import pathlib
import re
import sys
import tempfile

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # bench/*.py, and the package from any cwd.
import common  # noqa: E402  (bench/common.py)

from cfdg_jax import job as job_lib  # noqa: E402
from cfdg_jax import runtime  # noqa: E402
from cfdg_jax import sharding  # noqa: E402
from cfdg_jax import trainer  # noqa: E402
from cfdg_jax import validation  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_integer("steps", 2, "Traced steps.", lower_bound=1)
flags.DEFINE_integer("top", 15, "Slowest ops listed.", lower_bound=0)
flags.DEFINE_string("trace_dir", None, "Keep the trace here (default: a temporary directory).")
flags.DEFINE_string("out", None, "Also write the JSON line here.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_BLOCK = re.compile(r"/(?:down|up|mid)\d*_(attn|res)\d*/")
_KINDS = (("convolution", "convolution"), ("dot", "dot"), ("all-reduce", "collective"),
          ("all-gather", "collective"), ("reduce-scatter", "collective"), ("reduce", "reduction"))


def hlo_ops(hlo: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (kind, block, the JAX op it came from) for every instruction of an HLO
  module's text."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    if (m := _COMPUTATION.match(line)) and not line.startswith(" "):
      current = bodies.setdefault(m.group(1), [])
    elif current is not None and (m := _INSTRUCTION.match(re.sub(r"/\*.*?\*/", "", line))):
      current.append((m.group(1), m.group(2), line))
  ops = {}
  for body in bodies.values():
    for name, opcode, line in body:
      # A fusion is what it fuses: its called computations' opcodes decide the kind.
      fused = [item for called in re.findall(r"calls=%?([\w.\-]+)", line)
               for item in bodies.get(called, ())]
      inner = {opcode} | {op for _, op, _ in fused}
      kind = next((k for op, k in _KINDS if op in inner), None)
      if kind == "convolution" and any(
          max(map(int, m.group(1).split("x"))) > 3
          for text in [line] + [l for _, _, l in fused]
          if (m := re.search(r"window=\{size=([\dx]+)", text))):
        # A window wider than the 3×3 kernels: the feature map itself, i.e. a weight gradient.
        kind = "convolution_weight_grad"
      if kind is None:
        data_ops = inner - {"fusion", "parameter", "bitcast", "constant", "tuple",
                            "get-tuple-element"}
        kind = ("copy" if data_ops and data_ops <= {"copy", "transpose"} else
                "elementwise" if opcode == "fusion" else "other")
      # The op's own source, else (a fusion without one) that of the first fused op with one.
      source = next((m.group(1) for text in [line] + [l for _, _, l in fused]
                     if (m := re.search(r'op_name="([^"]*)"', text))), "")
      block = _BLOCK.search(source)
      ops[name] = (kind, {"attn": "attention", "res": "resblock"}[block.group(1)] if block
                   else "other", source)
  return ops


def op_times(trace_dir: str) -> collections.Counter:
  """Op name -> seconds summed over the trace's XLA op events (all threads)."""
  # pylint: disable=import-outside-toplevel  (TensorFlow's copy of the profiler's protobufs)
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  times = collections.Counter()
  for path in pathlib.Path(trace_dir).rglob("*.xplane.pb"):
    space = xplane_pb2.XSpace.FromString(path.read_bytes())
    for plane in space.planes:
      names = plane.event_metadata
      for line in plane.lines:
        for event in line.events:
          times[names[event.metadata_id].name] += event.duration_ps * 1e-12
  return times


def _shares(seconds: collections.Counter, total: float) -> dict:
  return {k: {"seconds": s, "share": s / total} for k, s in seconds.most_common()}


def run(config, steps: int, top: int, trace_dir: str) -> dict:
  """The profile of `config`'s train step (see the module docstring)."""
  validation.check_config(config)
  mesh = sharding.create_mesh(config.mesh)
  job = job_lib.create_job(config, mesh)
  state = job.init_state(jax.random.key(config.seed))
  batch = sharding.shard_batch(next(common.synthetic_batches(config)), mesh)
  rng = jax.random.key(0)
  compiled = trainer.make_train_step(job).lower(state, batch, rng).compile()
  ops = hlo_ops(compiled.as_text())
  state, metrics = jax.block_until_ready(compiled(state, batch, rng))
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      state, metrics = jax.block_until_ready(compiled(state, batch, rng))
  times = {name: s for name, s in op_times(trace_dir).items() if name in ops}
  total = sum(times.values())
  by_kind, by_block, by_both = (collections.Counter() for _ in range(3))
  for name, seconds in times.items():
    kind, block, _ = ops[name]
    by_kind[kind] += seconds
    by_block[block] += seconds
    by_both[f"{block}/{kind}"] += seconds
  slowest = sorted(times.items(), key=lambda item: -item[1])[:top]
  return {
      "op_seconds_per_step": total / steps, "steps": steps, "kind": _shares(by_kind, total),
      "block": _shares(by_block, total), "block_kind": _shares(by_both, total),
      "top": [{"op": name, "kind": ops[name][0], "block": ops[name][1], "source": ops[name][2],
               "seconds_per_step": s / steps, "share": s / total} for name, s in slowest],
      "flops_per_step": common.train_step_flops(config, mesh, state, batch, rng), "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "batch": config.batch_size, "dtype": config.model.dtype,
      "attention": config.model.attention}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with tempfile.TemporaryDirectory() as scratch:
    report = run(FLAGS.config, FLAGS.steps, FLAGS.top, FLAGS.trace_dir or scratch)
  common.emit(report, FLAGS.out)


if __name__ == "__main__":
  runtime.run(main)
