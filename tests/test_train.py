"""End to end on digits: train, checkpoint, resume, restore and sample; compile counts; bad input."""
import contextlib
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
from jax import monitoring

from cfdg_jax import checkpointing
from cfdg_jax import input_pipeline
from cfdg_jax import job as job_lib
from cfdg_jax import pipeline
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import trainer
from cfdg_jax import unet
from cfdg_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]

_compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations inside the block; yields a list whose len is the count."""
  start = len(_compiles)
  seen = []
  yield seen
  seen.extend(_compiles[start:])


def load_digits_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("digits_config", REPO / "configs" / "digits.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **overrides):
  config = load_digits_config()
  config.data.data_dir = data_dir
  config.model.base_channels = 16
  config.model.num_res_blocks = 1
  config.model.head_channels = 16
  config.batch_size = 16
  config.num_train_steps = 6
  config.log_every = 2
  config.checkpoint_every = 3
  config.sample_every = 6
  config.sample.sampler.num_steps = 6
  config.sample.num_per_class = 1
  config.sample.w = (0.0, 2.0)
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.mark.slow
def test_train_checkpoint_restore_sample_and_resume(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir)
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.step) == 6
  manager = checkpointing.create_manager(workdir, read_only=True)
  assert manager.all_steps() == [3, 6]
  assert (tmp_path / "run" / "samples_00000006.png").stat().st_size > 0
  assert (tmp_path / "run" / "config.json").exists()
  assert list((tmp_path / "run").glob("events.out.tfevents*"))  # TensorBoard scalars.

  # Sampling from the restored EMA weights gives the images of the in-memory state.
  pipe = pipeline.load(workdir)
  assert pipe.step == 6 and pipe.config.to_json(sort_keys=True) == config.to_json(sort_keys=True)
  labels, w, ids = pipeline.class_sweep(10, 2, (0.0, 3.0))
  from_disk = pipe.sample(labels, w, ids=ids, seed=5)
  in_memory = dataclasses.replace(pipe, params=state.ema_params)
  assert from_disk.shape == (40, 8, 8, 1) and from_disk.dtype == np.uint8
  np.testing.assert_array_equal(from_disk, in_memory.sample(labels, w, ids=ids, seed=5))
  jax.tree.map(np.testing.assert_array_equal, pipe.params, state.ema_params)
  # A sample depends on its id, not on the batch around it (here: 1 example, no padding peers).
  alone = pipe.sample(labels[-1:], w[-1:], ids=ids[-1:], seed=5)
  np.testing.assert_array_equal(alone[0], from_disk[-1])
  # The same images in batches of 16 (the last one padded) and with progress shown.
  np.testing.assert_array_equal(pipe.sample(labels, w, ids=ids, seed=5, batch_size=16,
                                            progress=True), from_disk)
  assert pipe.last_stats["nfe"] == 6 and pipe.last_stats["examples"] > 0

  # A second run with a longer schedule resumes at step 6 (it does not start over).
  longer = tiny_config(data_dir, num_train_steps=9)
  resumed = trainer.train_and_evaluate(longer, workdir)
  assert int(resumed.step) == 9
  assert checkpointing.create_manager(workdir, read_only=True).all_steps() == [3, 6, 9]
  # And a run whose workdir already holds the last step does nothing.
  with count_compiles() as compiles:
    assert trainer.train_and_evaluate(longer, workdir) is None
  assert not compiles

  # A different architecture is refused before anything is overwritten.
  with pytest.raises(ValueError, match="config.model"):
    trainer.train_and_evaluate(tiny_config(data_dir, **{"model.base_channels": 32,
                                                        "num_train_steps": 12}), workdir)
  assert checkpointing.create_manager(workdir, read_only=True).all_steps() == [3, 6, 9]


@pytest.mark.slow
def test_train_step_and_sampler_compile_once(data_dir):
  config = tiny_config(data_dir)
  mesh = sharding.create_mesh(config.mesh)
  job = job_lib.create_job(config, mesh)
  state = job.init_state(jax.random.key(0))
  step_fn = trainer.make_train_step(job)
  batches = input_pipeline.create_train_iterator(config.data, global_batch_size=16, seed=0)
  host_batches = [next(batches) for _ in range(5)]
  rng = jax.random.key(1)
  state, _ = step_fn(state, sharding.shard_batch(host_batches[0], mesh), rng)
  with count_compiles() as compiles:
    for batch in host_batches[1:]:
      state, metrics = step_fn(state, sharding.shard_batch(batch, mesh), rng)
    jax.block_until_ready(metrics)
  assert not compiles, compiles
  assert int(state.step) == 5

  pipe = pipeline.Pipeline(pipeline.Network(job.model, config, job.state_sharding.ema_params),
                           state.ema_params, mesh)
  for sampler in ("ancestral", "ddim(num_steps=4,eta=0.5)", "dpmpp_2m(num_steps=4)",
                  "heun(num_steps=3)"):
    pipe.sample(np.arange(10), 0.0, sampler=sampler)
    with count_compiles() as compiles:  # w and every guidance option are traced, per example.
      for w, options in ((1.0, {}), (3.0, {"rescale": 0.5}),
                         (np.linspace(0.0, 4.0, 10), {"interval_lo": np.linspace(-5, 5, 10),
                                                      "apg_eta": 0.0})):
        pipe.sample(np.arange(10)[::-1], w, sampler=sampler, **options)
    assert not compiles, compiles
  # Bad input is refused before anything compiles, saying what would be valid.
  with count_compiles() as compiles:
    for kwargs, message in (({"labels": [1, 10]}, r"labels \[10\] are not class ids .*0..9"),
                            ({"labels": []}, "a non-empty list of class ids"),
                            ({"labels": [1], "sampler": "dpm"}, "Unknown sampler 'dpm'"),
                            ({"labels": [1], "num_steps": 1}, "ancestral needs an integer >= 2"),
                            ({"labels": [1, 2], "rescale": [0.1, 2.0]}, r"rescale = \[2.0\]")):
      with pytest.raises(ValueError, match=message):
        pipe.sample(**kwargs)
  assert not compiles


def _random_pipeline(config, mesh, seed):
  """A Pipeline of `config`'s UNet with random weights (the zero-initialised output layer too)."""
  job = job_lib.create_job(config, mesh)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(seed), p.shape),
                        unet.init_params(jax.random.key(seed), job.model, config))
  params_sharding = job.state_sharding.ema_params
  params = jax.device_put(params, params_sharding)
  return pipeline.Pipeline(pipeline.Network(job.model, config, params_sharding), params, mesh)


@pytest.mark.slow
def test_autoguidance_by_a_smaller_model(data_dir):
  mesh = sharding.create_mesh()
  main = _random_pipeline(tiny_config(data_dir), mesh, 1)
  small = _random_pipeline(tiny_config(data_dir, **{"model.base_channels": 8,
                                                     "model.head_channels": 8}), mesh, 2)
  labels = np.arange(6)
  unguided = main.sample(labels, 0.0, sampler="ddim", num_steps=4)
  guided = main.sample(labels, 2.0, sampler="ddim", num_steps=4, guide=small)
  assert main.last_stats["network_calls"] == 8  # Both networks at each of 4 steps.
  assert (guided != unguided).any() and (guided != main.sample(labels, 2.0, sampler="ddim",
                                                               num_steps=4)).any()
  # Guided by itself, the model is its own conditional prediction: w = 0.
  np.testing.assert_array_equal(main.sample(labels, 2.0, sampler="ddim", num_steps=4, guide=main),
                                unguided)
  with pytest.raises(ValueError, match="data.num_classes=12, the model 10"):
    main.sample(labels, 1.0, guide=_random_pipeline(
        tiny_config(data_dir, **{"data.num_classes": 12}), mesh, 3))


@pytest.mark.slow
def test_wrong_num_classes_fails_before_compiling(tmp_path, data_dir):
  with count_compiles() as compiles:
    with pytest.raises(ValueError, match="num_classes=10"):
      trainer.train_and_evaluate(tiny_config(data_dir, **{"data.num_classes": 12}),
                                 str(tmp_path / "bad"))
  assert not compiles


def _run(module, *args):
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_command_line_train_then_sample(tmp_path, data_dir):
  workdir = str(tmp_path / "cli")
  flags = ["--config", "configs/digits.py", "--workdir", workdir,
           f"--config.data.data_dir={data_dir}", "--config.num_train_steps=2",
           "--config.batch_size=8", "--config.model.base_channels=16",
           "--config.model.num_res_blocks=1", "--config.model.head_channels=16",
           "--config.log_every=1", "--config.sample.sampler.num_steps=3",
           "--config.checkpoint_every=1",
           "--config.sample.num_per_class=1"]
  result = _run("cfdg_jax.train", *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "steps/s" in result.stderr and "ETA" in result.stderr  # Progress is shown.
  again = _run("cfdg_jax.train", *flags)
  assert again.returncode == 0 and "nothing to do" in again.stderr

  out, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
  result = _run("cfdg_jax.sample", "--workdir", workdir, "--w", "0,1,3", "--num_per_class", "2",
                "--steps", "4", "--out", str(out), "--npz", str(npz))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "images/s" in result.stderr and "4 denoiser evaluations per image" in result.stderr
  assert out.stat().st_size > 0
  data = np.load(npz)
  assert data["images"].shape == (60, 8, 8, 1) and data["images"].dtype == np.uint8
  np.testing.assert_array_equal(data["labels"], np.tile(np.repeat(np.arange(10), 2), 3))
  np.testing.assert_array_equal(data["w"], np.repeat([0.0, 1.0, 3.0], 20))

  # The Python API gives the CLI's images for the same settings and seed, any sampler.
  pipe = pipeline.load(workdir)
  labels, w, ids = pipeline.class_sweep(10, 2, (0.0, 2.0))
  for flags, kwargs in (([], {"num_steps": 4}),
                        (["--sampler", "ddim", "--ddim.eta=0.5", "--rescale=0.5"],
                         {"sampler": "ddim(eta=0.5)", "num_steps": 4, "rescale": 0.5}),
                        (["--sampler", "dpmpp_2m", "--interval_lo=-2", "--interval_hi=2"],
                         {"sampler": "dpmpp_2m", "num_steps": 4, "interval_lo": -2.0,
                          "interval_hi": 2.0})):
    result = _run("cfdg_jax.sample", "--workdir", workdir, "--w", "0,2", "--num_per_class", "2",
                  "--steps", "4", "--seed", "3", "--npz", str(npz), "--out", str(out), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(npz)["images"],
                                  pipe.sample(labels, w, ids=ids, seed=3, **kwargs))

  # Autoguidance by the earlier checkpoint, and bad flags, each with a clear message.
  result = _run("cfdg_jax.sample", "--workdir", workdir, "--guide_workdir", workdir,
                "--guide_step", "1", "--num_per_class", "1", "--steps", "3", "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"autoguidance(guide_step=1,guide_workdir='{workdir}')" in result.stderr
  # (Mistakes that need no checkpoint are tests/test_validation.py's CLI_CASES.)
  for flags, message in ((["--sampler", "dpm"], "Unknown sampler 'dpm'"),
                         (["--sampler", "ancestral", "--ddim.eta=0.5"],
                          "--ddim.eta is a field of ddim, but the sampler is ancestral")):
    bad = _run("cfdg_jax.sample", "--workdir", workdir, *flags)
    assert bad.returncode != 0 and re.search(message, bad.stderr), (flags, bad.stderr[-2000:])


def test_fsdp_rule_splits_the_largest_divisible_dimension():
  mesh = sharding.create_mesh({"data": 1, "fsdp": -1})
  assert mesh.shape == {"data": 1, "fsdp": 2}  # conftest's two CPU devices.
  spec = lambda shape, min_size=16: sharding.param_spec(shape, mesh, min_size)
  assert spec((3, 3, 64, 128)) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert spec((3, 3, 65, 33)) == jax.sharding.PartitionSpec()  # Nothing divisible by 2.
  assert spec((130, 7)) == jax.sharding.PartitionSpec("fsdp")
  assert spec((4,)) == jax.sharding.PartitionSpec()  # Below fsdp_min_size.
  data_parallel = sharding.create_mesh({"data": -1, "fsdp": 1})
  assert sharding.param_spec((3, 3, 64, 128), data_parallel, 16) == jax.sharding.PartitionSpec()


def test_a_grid_drawn_in_batches_is_the_grid_drawn_at_once(tmp_path):
  config = tiny_config("/nonexistent")
  job = job_lib.create_job(config, sharding.create_mesh(config.mesh))
  state = job.init_state(jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05, state.ema_params)  # Not the zero output layer's 0.
  grids = {}
  for batch_size in (None, 6):  # 20 images: 6, 6, 6 and a padded 2.
    config.sample.batch_size = batch_size
    trainer._grid_writer(job, str(tmp_path), jax.random.key(1))(7, params)  # pylint: disable=protected-access
    grids[batch_size] = np.asarray(PIL.Image.open(tmp_path / "samples_00000007.png"), int)
  # Each image's noise is fixed by its id: a batch of another size changes float round-off only.
  assert np.abs(grids[None] - grids[6]).max() <= 1


def test_sampling_runs_on_the_checkpoints_mesh_unless_told(caplog):
  from ml_collections import ConfigDict  # pylint: disable=import-outside-toplevel
  saved = ConfigDict({"data": 1, "fsdp": -1, "fsdp_min_size": 16})
  assert sharding.job_mesh(saved).shape == {"data": 1, "fsdp": 2}  # conftest's 2 devices.
  assert sharding.job_mesh(saved, fsdp=1).shape == {"data": 2, "fsdp": 1}
  # Saved on 8 devices with fsdp = 8: here it becomes fsdp = 2, and says so.
  with caplog.at_level("WARNING"):
    mesh = sharding.job_mesh(ConfigDict({"data": -1, "fsdp": 8, "fsdp_min_size": 16}))
  assert mesh.shape == {"data": 1, "fsdp": 2} and "Using fsdp=2 instead" in caplog.text
  with pytest.raises(UserError, match=r"--fsdp=3: use a divisor of the 2 devices"):
    sharding.job_mesh(saved, fsdp=3)


@pytest.mark.slow
def test_fsdp_training_matches_replicated_training(data_dir):
  """Sharding the parameters changes where they live, not what the step computes."""
  host_batches = None
  results = []
  for fsdp in (1, 2):
    config = tiny_config(data_dir, **{"mesh.data": -1, "mesh.fsdp": fsdp,
                                      "mesh.fsdp_min_size": 256})
    job = job_lib.create_job(config, sharding.create_mesh(config.mesh))
    state = job.init_state(jax.random.key(0))
    if host_batches is None:
      batches = input_pipeline.create_train_iterator(config.data, global_batch_size=16, seed=0)
      host_batches = [next(batches) for _ in range(2)]
    step_fn = trainer.make_train_step(job)
    for batch in host_batches:
      state, _ = step_fn(state, sharding.shard_batch(batch, job.mesh), jax.random.key(1))
    specs = {s.spec for s in jax.tree.leaves(job.state_sharding.params)}
    assert (jax.sharding.PartitionSpec() in specs) and (len(specs) > 1) == (fsdp > 1)
    results.append(jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *results)


def test_configs_of_older_checkpoints_are_upgraded(data_dir):
  """A checkpoint's config from before the sampler, mesh, remat and attention fields reads as
  today's."""
  config = tiny_config(data_dir)
  old = config.to_dict()
  old["sharding"] = {"fsdp": True, "fsdp_min_size": 1024}
  del old["mesh"], old["model"]["remat"], old["model"]["attention"]
  old["sample"] = {"num_steps": 64, "v": 0.2, "clip_x": False, "guidance": (0.0, 2.0),
                   "num_per_class": 3}
  old["eval"] = {**{k: v for k, v in old["eval"].items()
                    if k not in ("w", "samplers", "guidance", "step_sweep_w", "labels")},
                 "guidance": (0.0, 1.0), "num_steps": 128, "v": None,
                 "step_sweep_guidance": (1.0,)}
  new = checkpointing.upgrade_config(ml_collections.ConfigDict(old))
  assert new.mesh.to_dict() == {"data": 1, "fsdp": -1, "fsdp_min_size": 1024}
  assert "sharding" not in new and (new.model.remat, new.model.attention) == ("none", "auto")
  assert samplers.settings_from_config(new.sample.sampler).canonical == (
      "ancestral(grid='cosine',num_steps=64,v=0.2)")
  assert not new.sample.guidance.clip_x and tuple(new.sample.w) == (0.0, 2.0)
  assert tuple(new.eval.samplers) == ("ancestral(num_steps=128,v=0.2)",)
  assert tuple(new.eval.w) == (0.0, 1.0) and tuple(new.eval.step_sweep_w) == (1.0,)
  job = job_lib.create_job(new, sharding.create_mesh(new.mesh))  # Usable as it is.
  assert job.mesh.shape == {"data": 1, "fsdp": 2}
  assert checkpointing.upgrade_config(config).to_dict() == config.to_dict()  # Today's: as is.
