"""Every user mistake is refused before any data loading or compilation, by one message that names
the field, its value and what would be valid; the CLIs print it as their last line and exit 1."""
import os
import pathlib
import runpy
import subprocess
import sys

import jax
import pytest
import tensorflow_datasets as tfds
from jax import monitoring

from cfdg_jax import input_pipeline
from cfdg_jax import job as job_lib
from cfdg_jax import validation
from cfdg_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]

_compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def _config(data_dir, **overrides):
  config = runpy.run_path(str(REPO / "configs" / "digits.py"))["get_config"]()
  config.data.data_dir = data_dir
  config.model.base_channels = 16
  config.model.head_channels = 16
  config.batch_size = 16
  config.update_from_flattened_dict(overrides)  # {"model.dropout": 0.1, ...}
  return config


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  """A TFDS data dir holding digits, prepared (TFDS knows its splits only then)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_builder(_config(data_dir).data)
  return data_dir


@pytest.fixture(autouse=True)
def no_heavy_work(monkeypatch):
  """Fails a test that prepares or reads data, builds a job or compiles while checking."""
  def forbidden(name):
    def fail(*args, **kwargs):
      raise AssertionError(f"{name} was called during validation")
    return fail
  for owner, name in ((input_pipeline, "get_builder"), (input_pipeline, "create_train_iterator"),
                      (input_pipeline, "read_split"), (job_lib, "create_job"), (jax, "jit"),
                      (jax, "eval_shape"), (tfds.core.DatasetBuilder, "download_and_prepare"),
                      (tfds.core.DatasetBuilder, "as_data_source")):
    monkeypatch.setattr(owner, name, forbidden(f"{getattr(owner, '__name__', owner)}.{name}"))
  start = len(_compiles)
  yield
  assert _compiles[start:] == [], "validation compiled something"


def test_the_guard_is_real(prepared_dir):
  with pytest.raises(AssertionError, match="create_job was called"):
    job_lib.create_job(_config(prepared_dir), None)
  with pytest.raises(AssertionError, match="download_and_prepare was called"):
    tfds.builder("digits", data_dir=prepared_dir).download_and_prepare()


def test_a_good_config_passes(prepared_dir, tmp_path):
  validation.check_train_config(_config(prepared_dir), str(tmp_path / "new" / "run"))
  assert not (tmp_path / "new").exists()  # Nothing is created.


# (config overrides, the message); the devices are 2 (tests/conftest.py).
CONFIG_CASES = [
    ({"batch_size": 0}, r"config.batch_size=0 must be a positive multiple of the 2 devices "
     r"\(mesh data=2 × fsdp=1, 1 processes\) it is split over; e.g. 2"),
    ({"batch_size": 15}, r"config.batch_size=15 must be a positive multiple .* e.g. 16"),
    ({"microbatches": 3}, r"config.microbatches=3 must divide the 8 examples per device "
     r"\(batch_size=16 over 2 devices\), .*; e.g. one of \[1, 2, 4, 8\]"),
    ({"microbatches": 0}, r"config.microbatches=0 must divide the 8 examples per device"),
    ({"mesh.fsdp": 3}, r"config.mesh: .* needs a device count divisible by 3, but there are 2"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, r"data=2 × fsdp=2 = 4 devices, but there are 2"),
    ({"mesh.fsdp": -1}, r"config.mesh.data and config.mesh.fsdp are both -1"),
    ({"mesh.fsdp": 0}, r"config.mesh.fsdp=0: use a positive axis size"),
    ({"model.channel_mult": (1, 2, 2, 2, 2)}, r"config.data.image_size=8 must be divisible by "
     r"2\*\*\(len\(channel_mult\)-1\) = 16 for 5 UNet levels"),
    ({"model.channel_mult": ()}, r"config.model.channel_mult=\(\) must be a non-empty sequence"),
    ({"model.attn_resolutions": (3,)}, r"config.model.attn_resolutions=\(3,\) has 3, but the "
     r"feature maps .* are \[8, 4\] pixels; pick from those, e.g. \(4,\)"),
    ({"model.head_channels": 24}, r"config.model.head_channels=24 must divide the 32 channels "
     r"of the attention at level 1 \(base_channels=16 × channel_mult\[1\]=2\); e.g. "
     r"head_channels=16"),
    ({"model.base_channels": 0}, r"config.model.base_channels=0 must be an integer >= 1"),
    ({"model.num_res_blocks": -1}, r"config.model.num_res_blocks=-1 must be an integer >= 0"),
    ({"model.dropout": 1.0}, r"config.model.dropout=1.0 must lie in \[0, 1\)"),
    ({"model.remat": "all"}, r"config.model.remat='all'; use one of \('none', 'blocks'\)"),
    ({"model.attention": "flash"}, r"config.model.attention='flash'; use one of \('auto', 'xla'"),
    ({"model.dtype": "float17"}, r"config.model.dtype='float17' is not a dtype"),
    ({"data.image_size": 0}, r"config.data.image_size=0 must be an integer >= 1"),
    ({"data.num_classes": 0}, r"config.data.num_classes=0 must be an integer >= 1"),
    ({"diffusion.p_uncond": 1.5}, r"config.diffusion.p_uncond=1.5 is a probability; use a value "
     r"in \[0, 1\]"),
    ({"diffusion.p_uncond": -0.1}, r"config.diffusion.p_uncond=-0.1 is a probability"),
    ({"diffusion.prediction": "x0"}, r"config.diffusion.prediction='x0'; use one of "
     r"\('eps', 'v'\)"),
    ({"diffusion.logsnr_min": 5.0, "diffusion.logsnr_max": 5.0}, r"config.diffusion.logsnr_min="
     r"5.0 must be below config.diffusion.logsnr_max=5.0"),
    ({"num_train_steps": 0}, r"config.num_train_steps=0 must be an integer >= 1"),
    ({"log_every": 0}, r"config.log_every=0 must be an integer >= 1"),
    ({"checkpoint_every": -5}, r"config.checkpoint_every=-5 must be an integer >= 1"),
    ({"sample_every": 0}, r"config.sample_every=0 must be an integer >= 1"),
    ({"keep_checkpoints": 0}, r"config.keep_checkpoints=0 must be an integer >= 1"),
    ({"data.prefetch": 0}, r"config.data.prefetch=0 must be an integer >= 1"),
    ({"data.num_workers": 0}, r"config.data.num_workers=0 must be an integer >= 1"),
    ({"sample.num_per_class": 0}, r"config.sample.num_per_class=0 must be an integer >= 1"),
    ({"optimizer.warmup_steps": -1}, r"config.optimizer.warmup_steps=-1 must be an integer >= 0"),
    ({"optimizer.learning_rate": 0.0}, r"config.optimizer.learning_rate=0.0 must be positive"),
    ({"ema_decay": 1.5}, r"config.ema_decay=1.5 must lie in \[0, 1\]"),
    ({"sample.sampler.name": "dpm"}, r"config.sample.sampler: Unknown sampler 'dpm'"),
    ({"sample.sampler.ancestral.v": 1.5},
     r"config.sample.sampler: v=1.5: the variance exponent .* lies in \[0, 1\]"),
    ({"sample.sampler.num_steps": 1}, r"config.sample.sampler: num_steps=1: ancestral needs"),
    ({"sample.guidance.rescale": -1.0}, r"config.sample.guidance: Guidance option rescale"),
    ({"sample.w": ()}, r"config.sample.w=\(\) must be a non-empty tuple of finite guidance"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES,
                         ids=[",".join(o) for o, _ in CONFIG_CASES])
def test_bad_config(prepared_dir, tmp_path, overrides, message):
  config = _config(prepared_dir, **overrides)
  with pytest.raises(UserError, match=message):
    validation.check_config(config)
  with pytest.raises(UserError, match=message):  # The first check of a training run.
    validation.check_train_config(config, str(tmp_path))


def test_max_nonfinite_steps(prepared_dir):
  config = _config(prepared_dir)
  with config.unlocked():
    config.max_nonfinite_steps = -1
  with pytest.raises(UserError, match=r"config.max_nonfinite_steps=-1 must be an integer >= 0"):
    validation.check_config(config)


DATA_CASES = [
    ({"data.name": "mnsit"}, r"config.data.name='mnsit' is not a TFDS data set; did you mean "
     r"'mnist'"),
    ({"data.name": "binarized_mnist"}, r"config.data.name='binarized_mnist': the TFDS data set "
     r"has features \['image'\]; the input pipeline needs an 'image' and a 'label'"),
    ({"data.split": "validation"}, r"config.data.split='validation' does not exist in TFDS data "
     r"set 'digits' .* one of \['test', 'train'\]"),
    ({"data.num_classes": 5}, r"config.data.num_classes=5 but TFDS data set 'digits' has 10 "
     r"classes: set config.data.num_classes=10"),
    ({"data.channels": 3}, r"config.data.channels=3 but the images of TFDS data set 'digits' "
     r"have 1 channel\(s\)"),
]


@pytest.mark.parametrize("overrides, message", DATA_CASES,
                         ids=[",".join(o) for o, _ in DATA_CASES])
def test_bad_data_config(prepared_dir, tmp_path, overrides, message):
  config = _config(prepared_dir, **overrides)
  with pytest.raises(UserError, match=message):
    validation.check_train_config(config, str(tmp_path))


def test_manual_dir_of_data_not_yet_prepared(tmp_path):
  config = _config(str(tmp_path / "tfds"), **{"data.manual_dir": str(tmp_path / "nowhere")})
  with pytest.raises(UserError, match=r"config.data.manual_dir='.*nowhere' is not a directory"):
    validation.check_data(config.data)
  assert not (tmp_path / "tfds").exists()


def test_a_data_dir_that_cannot_be_written_and_is_not_prepared(tmp_path, prepared_dir,
                                                                monkeypatch):
  # Root writes anywhere; the check asks os.access, as a user without the permission would.
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  config = _config(str(tmp_path / "tfds"))
  with pytest.raises(UserError, match=rf"^config.data.data_dir='{tmp_path}/tfds': 'digits' is "
                     rf"not prepared there, and preparing it needs write permission on "
                     rf"{tmp_path}; give a data_dir you can write, or one where it is prepared"):
    validation.check_data(config.data)
  validation.check_data(_config(prepared_dir).data)  # Prepared: only read.


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  """{path: (mtime, size)} of everything under root, root included."""
  return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
          for p in [root, *root.rglob("*")]}


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
  """A workdir with contents: a note, a config and a checkpoint step directory."""
  path = tmp_path / "run"
  (path / "checkpoints" / "3").mkdir(parents=True)
  (path / "notes.txt").write_text("mine")
  (path / "config.json").write_text("{}")
  return path


def test_bad_workdirs(workdir, tmp_path, monkeypatch):
  before = _snapshot(workdir)
  file = workdir / "notes.txt"
  for path, message in ((file, r"--workdir=.*notes.txt: .*notes.txt is a file, not a directory"),
                        (file / "sub", r"--workdir=.*sub cannot be created: .*notes.txt is a "
                         r"file"),
                        ("", r"--workdir is empty")):
    with pytest.raises(UserError, match=message):
      validation.check_workdir(str(path))
  # Root writes anywhere; the check asks os.access, as a user without the permission would.
  with monkeypatch.context() as patch:
    patch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r"--out_dir=.*run is not writable: no write permission"):
      validation.check_workdir(str(workdir), "--out_dir")
    with pytest.raises(UserError, match=r"--workdir=.*run/new cannot be created in .*run: no "
                       r"write permission"):
      validation.check_workdir(str(workdir / "new"))
  assert _snapshot(workdir) == before
  other = tmp_path / "other"
  other.mkdir()
  (other / "checkpoints").write_text("")
  with pytest.raises(UserError, match=r"--workdir=.*other: .*other/checkpoints is a file, not a "
                     "directory"):
    validation.check_workdir(str(other))


def test_checkpoints_to_load(workdir, tmp_path):
  before = _snapshot(workdir)
  assert validation.check_checkpoint(str(workdir)) == 3
  assert validation.check_checkpoint(str(workdir), 3) == 3
  with pytest.raises(UserError, match=r"--step=5: .*run has no checkpoint at step 5; the steps "
                     r"are \[3\]"):
    validation.check_checkpoint(str(workdir), 5)
  with pytest.raises(UserError, match=r"--guide_step=1: "):
    validation.check_checkpoint(str(workdir), 1, step_flag="--guide_step")
  with pytest.raises(UserError, match=r"No checkpoints: --workdir=.*nowhere does not exist"):
    validation.check_checkpoint(str(workdir / "nowhere"))
  with pytest.raises(UserError, match=r"No checkpoints: --guide_workdir=.*notes.txt is a file"):
    validation.check_checkpoint(str(workdir / "notes.txt"), workdir_flag="--guide_workdir")
  assert _snapshot(workdir) == before
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match=r"No checkpoints in .*empty.checkpoints \(--workdir=.*"
                     r"empty\); train first .*, or pass --watch"):
    validation.check_checkpoint(str(tmp_path / "empty"), hint=", or pass --watch")


def test_output_files(workdir, monkeypatch):
  before = _snapshot(workdir)
  for path, flag, suffix, message in (
      (workdir, "--out", ".png", r"--out=.*run is a directory; give a file name in it, e.g. "
       r"--out=.*run/samples.png\.$"),
      (workdir / "no" / "g.png", "--out", ".png", r"--out=.*run/no/g.png: the directory .*run/no"
       r" does not exist; create it or write elsewhere"),
      (workdir / "notes.txt" / "g.npz", "--npz", ".npz", r"the directory .*notes.txt does not "
       "exist"),
      (workdir / "g.jpg", "--out", ".png", r"--out=.*g.jpg: the file is written as PNG; give a "
       r"\.png file name, e.g. --out=samples.png"),
      ("", "--npz", ".npz", r"--npz=: the file is written as NPZ; give a \.npz file name")):
    with pytest.raises(UserError, match=message):
      validation.check_output_file(str(path), flag, suffix)
  validation.check_output_file(str(workdir / "new.png"), "--out", ".png")
  validation.check_output_file(str(workdir / "notes.txt"), "--out", ".txt")  # Replaced.
  validation.check_output_file("gs://bucket/g.png", "--out", ".png")
  with monkeypatch.context() as patch:
    patch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r"--out=.*run/g.png cannot be written: no write "
                       r"permission on .*run; write elsewhere"):
      validation.check_output_file(str(workdir / "g.png"), "--out", ".png")
    with pytest.raises(UserError, match=r"no write permission on .*run/notes.txt;"):
      validation.check_output_file(str(workdir / "notes.txt"), "--out", ".txt")
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("overrides, message", [
    ({"rescale": 2.0}, r"--rescale=2.0: Guidance option rescale = \[2.0\]: φ lies in \[0, 1\]"),
    ({"interval_lo": 1.0, "interval_hi": -1.0}, r"--interval_lo=1.0 --interval_hi=-1.0: "
     r"Guidance option interval_hi = \[-1.0\]: must be >= interval_lo"),
    ({"dynamic_threshold": 1.0}, r"--dynamic_threshold=1.0: .*the percentile p lies in \[0, 1\)"),
])
def test_bad_guidance_flags(overrides, message):
  with pytest.raises(UserError, match=message):
    validation.check_guidance_flags(overrides)
  validation.check_guidance_flags({"rescale": 0.7, "interval_lo": -2.0})


@pytest.mark.parametrize("path, message", [
    ("batchsize", r"--config.batchsize: the config has no field 'batchsize'; did you mean "
     r"--config.batch_size or --config.eval.batch_size or --config.sample.batch_size\?"),
    ("p_uncond", r"did you mean --config.diffusion.p_uncond\?"),
    ("model.head_channel", r"no field 'model.head_channel'; did you mean "
     r"--config.model.head_channels"),
    ("zzz", r"no field 'zzz'; the top-level fields are \['batch_size', "),
    ("batch_size.x", r"no field 'batch_size.x'"),
])
def test_unknown_override(prepared_dir, path, message):
  with pytest.raises(UserError, match=message):
    validation.check_override(_config(prepared_dir), path)
  for good in ("batch_size", "model.channel_mult", "sample.sampler.ddim.eta", "data.data_dir"):
    validation.check_override(_config(prepared_dir), good)


# The command lines, as a user runs them: (module, arguments, the last line of stderr).
CLI_CASES = {
    "batch_size": ("cfdg_jax.train", ["--config.batch_size=0"],
                   "error: config.batch_size=0 must be a positive multiple of the 2 devices"),
    "unknown_field": ("cfdg_jax.train", ["--config.batchsize=8"],
                      "error: --config.batchsize: the config has no field 'batchsize'; did you "
                      "mean --config.batch_size or --config.eval.batch_size or "
                      "--config.sample.batch_size?"),
    "bad_value": ("cfdg_jax.train", ["--config.batch_size=abc"],
                  "error: flag --config.batch_size=abc: invalid literal for int() with base 10: "
                  "'abc'; config.batch_size takes a value of type int, e.g. 64"),
    "workdir_is_a_file": ("cfdg_jax.train", ["--workdir={workdir}/notes.txt"],
                          "error: --workdir={workdir}/notes.txt: {workdir}/notes.txt is a file"),
    "no_such_step": ("cfdg_jax.sample", ["--step=5"],
                     "error: --step=5: {workdir} has no checkpoint at step 5; the steps are [3]"),
    "sample_out": ("cfdg_jax.sample", ["--out={workdir}/no/such/g.png"],
                   "error: --out={workdir}/no/such/g.png: the directory {workdir}/no/such does "
                   "not exist; create it or write elsewhere."),
    "sample_rescale": ("cfdg_jax.sample", ["--rescale=2"],
                       "error: --rescale=2.0: Guidance option rescale = [2.0]: φ lies in [0, 1]"),
    "sample_w": ("cfdg_jax.sample", ["--w", "1,x"],
                 "error: --w takes comma-separated numbers, e.g. 0,1,3; got ['1', 'x']."),
    "sample_guide_step": ("cfdg_jax.sample", ["--guide_step", "1"],
                          "error: --guide_step needs --guide_workdir"),
    "sample_no_workdir": ("cfdg_jax.sample", ["--workdir={workdir}/nowhere"],
                          "error: No checkpoints: --workdir={workdir}/nowhere does not exist"),
    "fsdp": ("cfdg_jax.sample", ["--fsdp=3"],
             "error: --fsdp=3: use a divisor of the 2 devices"),
    "microbatches": ("cfdg_jax.train", ["--config.microbatches=5"],
                     "error: config.microbatches=5 must divide the 32 examples per device"),
    "fid_input": ("cfdg_jax.eval.fid", ["{workdir}/notes.txt", "{workdir}/notes.txt"],
                  "error: {workdir}/notes.txt is not a readable .npz file (not a zip archive)"),
    "aot_topology": ("cfdg_jax.aot", ["--config", "configs/digits.py", "--topology=v5e-3"],
                     "error: --topology=v5e-3: use GENERATION:SHAPE"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
  """{case: (workdir, snapshots before and after, CompletedProcess-like)}, run 6 at a time."""
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=2",
             TF_CPP_MIN_LOG_LEVEL="2")
  runs, results = {}, {}

  def finish(case):
    workdir, before, process = runs.pop(case)
    _, stderr = process.communicate(timeout=300)
    results[case] = (workdir, before, _snapshot(workdir), process.returncode, stderr)

  for case, (module, args, _) in CLI_CASES.items():
    workdir = tmp_path_factory.mktemp(case) / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "notes.txt").write_text("mine")
    args = [a.format(workdir=workdir) for a in args]
    if module == "cfdg_jax.train":
      args = ["--config", "configs/digits.py", f"--config.data.data_dir={workdir.parent}/tfds",
              *args]
    if not any(a.startswith("--workdir") for a in args) and module in (
        "cfdg_jax.train", "cfdg_jax.sample"):
      args.append(f"--workdir={workdir}")
    if len(runs) == 6:  # Each holds ~1 GB (TensorFlow and JAX); the machine may have 24.
      finish(next(iter(runs)))
    before = _snapshot(workdir)
    runs[case] = (workdir, before, subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  while runs:
    finish(next(iter(runs)))
  return results


@pytest.mark.parametrize("case", CLI_CASES)
def test_command_line_mistakes_end_in_one_line(cli_results, case):
  workdir, before, after, returncode, stderr = cli_results[case]
  expected = CLI_CASES[case][2].format(workdir=workdir)
  last = stderr.rstrip("\n").splitlines()[-1]
  assert returncode == 1, stderr[-3000:]
  assert last.startswith(expected), stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  assert after == before  # The workdir is as it was.
