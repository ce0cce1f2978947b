"""Every jitted function a job runs, on abstract inputs: what `python -m cfdg_jax.aot` compiles.

Each program is built by the code its job runs (job.create_job, trainer.make_train_step,
trainer.grid_sampler, pipeline.make_sample_fn on the mesh sharding.job_mesh gives, the evaluator's
sampler settings, the FID Inception's forward pass) on ShapeDtypeStructs that carry their
shardings: no array is made and no data is read, so it lowers for any devices, a TPU slice's
compile-only ones included:

  for program in programs.build(config, devices, jobs=("train", "sample")):
    compiled = program.lower().compile()

The jobs: "train" (the train step; the sample grid, drawn while the whole train state is held),
"sample" (the sample CLI's sampler on the checkpoint's mesh), "eval" (the evaluator's samplers at
config.eval.batch_size, and its Inception network on one device).
"""
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cfdg_jax import guidance
from cfdg_jax import job as job_lib
from cfdg_jax import pipeline
from cfdg_jax import samplers
from cfdg_jax import sharding
from cfdg_jax import trainer
from cfdg_jax.eval import inception
from cfdg_jax.eval import plan

JOBS = ("train", "sample", "eval")


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted function of a job, with abstract arguments."""
  job: str
  name: str  # "train_step", "grid", "sampler", "inception".
  fn: Any  # The jitted function.
  args: tuple  # Its arguments as ShapeDtypeStructs with shardings.
  # Bytes per device that the job holds outside this program's arguments while it runs (the
  # train state beside the grid's sampler; the EMA weights beside the Inception network).
  resident_bytes: int = 0
  # What one call computes, for the time estimates: "images" per call; for a sampler its
  # "setting" (canonical), "sampler", "num_steps" and "evaluations" (network calls per image);
  # "loop_trips": how often the train step's loop over microbatches runs its body.
  work: dict = dataclasses.field(default_factory=dict)

  def lower(self) -> jax.stages.Lowered:
    return self.fn.lower(*self.args)

  @property
  def num_devices(self) -> int:
    """Devices it runs on (all the mesh's, or one for the Inception network)."""
    return max(len(x.sharding.device_set) for x in jax.tree.leaves(self.args)
               if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None)


def per_device_bytes(tree: Any) -> int:
  """Bytes of an abstract pytree's shards on its most loaded device."""
  def shard(x):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize
  return sum(shard(x) for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct))


def _abstract(tree: Any, where: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                                     sharding=where), tree)


def _rng(mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))


def _sampler_args(params: Any, mesh: jax.sharding.Mesh, labels: np.ndarray,
                  options: guidance.Options, ids: np.ndarray | None) -> tuple:
  """make_sample_fn's arguments for a batch, padded as pipeline.generate pads it."""
  padded = pipeline.padded_inputs(labels, options, ids, mesh.size)
  return (params, None, _rng(mesh), *_abstract(padded, sharding.data_sharding(mesh)))


def _sampler_work(settings: samplers.Settings, images: int) -> dict:
  return {"images": images, "setting": settings.canonical, "sampler": settings.name,
          "num_steps": settings.num_steps,
          "evaluations": samplers.get(settings.name).evaluations(settings.num_steps)}


def train_programs(config: ml_collections.ConfigDict,
                   devices: Sequence[jax.Device]) -> list[Program]:
  """The train step and the sample grid, on config.mesh over `devices`."""
  job = job_lib.create_job(config, sharding.create_mesh(config.mesh, devices))
  size, channels = config.data.image_size, config.data.channels
  split = sharding.data_sharding(job.mesh)
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, channels), jnp.float32,
                                         sharding=split),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=split)}
  step = Program("train", "train_step", trainer.make_train_step(job),
                 (job.abstract_state, batch, _rng(job.mesh)),
                 work={"images": config.batch_size, "loop_trips": config.microbatches})
  pipe, settings, clip_x, labels, options, ids = trainer.grid_sampler(job)
  call = pipe.call_size(len(labels), config.sample.batch_size)  # A call's images (padded).
  held = per_device_bytes(job.abstract_state) - per_device_bytes(job.abstract_state.ema_params)
  first = jax.tree.map(lambda a: a[:call], (labels, options, ids))
  grid = Program("train", "grid", pipe.sample_fn(settings, clip_x),
                 _sampler_args(job.abstract_state.ema_params, job.mesh, *first),
                 resident_bytes=held, work=_sampler_work(settings, call))
  return [step, grid]


def _sampling_job(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                  fsdp: int | None) -> tuple[job_lib.Job, pipeline.Network]:
  job = job_lib.create_job(config, sharding.job_mesh(config.mesh, fsdp=fsdp, devices=devices))
  return job, pipeline.Network(job.model, config, job.state_sharding.ema_params)


def sample_programs(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                    batch_size: int | None = None, fsdp: int | None = None) -> list[Program]:
  """The sample CLI's sampler (config.sample's setting), `batch_size` images per call (its
  --batch_size; default, as the CLI's: config.sample.batch_size, else the whole grid of
  config.sample, classes × num_per_class × len(w))."""
  job, network = _sampling_job(config, devices, fsdp)
  settings = samplers.settings_from_config(config.sample.sampler)
  section = guidance.settings_from_config(config.sample.guidance)
  n = batch_size or config.sample.batch_size or (
      config.data.num_classes * config.sample.num_per_class * len(config.sample.w))
  labels = np.arange(n) % config.data.num_classes
  options = guidance.make_options(n, 1.0, **section.option_values())
  fn = pipeline.make_sample_fn(network, job.mesh, settings, clip_x=section.clip_x)
  return [Program("sample", "sampler", fn, _sampler_args(
      job.abstract_state.ema_params, job.mesh, labels, options, None),
                  work=_sampler_work(settings, n))]


def eval_programs(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                  fsdp: int | None = None) -> list[Program]:
  """The evaluator's sampler per sampler family of config.eval (eval.batch_size images a call;
  the step count changes no shape), and the FID Inception on one device (with logits)."""
  job, network = _sampling_job(config, devices, fsdp)
  model = inception.InceptionV3(include_logits=True)
  features = jax.sharding.SingleDeviceSharding(devices[0])
  variables = jax.tree.map(
      lambda x: x.update(sharding=features),
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, inception.SIZE,
                                                                inception.SIZE, 3))))
  out = []
  families = {}
  for point in plan.plan_points(config.eval, config.sample):
    families.setdefault(point.sampler.family, point)
  for point in families.values():
    n = config.eval.batch_size
    options = guidance.make_options(n, 1.0, **point.guidance.option_values())
    fn = pipeline.make_sample_fn(network, job.mesh, point.sampler, clip_x=point.guidance.clip_x)
    out.append(Program("eval", f"sampler {point.sampler.family}", fn, _sampler_args(
        job.abstract_state.ema_params, job.mesh, np.arange(n) % config.data.num_classes, options,
        None), resident_bytes=per_device_bytes(variables),
                       work=_sampler_work(point.sampler, n)))
  images = jax.ShapeDtypeStruct((inception.BATCH_SIZE, inception.SIZE, inception.SIZE, 3),
                                jnp.float32, sharding=features)
  out.append(Program("eval", "inception", inception.forward, (model, variables, images),
                     resident_bytes=per_device_bytes(job.abstract_state.ema_params),
                     work={"images": inception.BATCH_SIZE}))
  return out


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
          jobs: Sequence[str] = JOBS, *, sample_batch: int | None = None,
          fsdp: int | None = None) -> list[Program]:
  """The programs of `jobs` for `config` on `devices` (see the module docstring).

  fsdp: the sample and eval jobs' --fsdp (default: config.mesh, as a checkpoint of this config).
  """
  build_job = {"train": lambda: train_programs(config, devices),
               "sample": lambda: sample_programs(config, devices, batch_size=sample_batch,
                                                 fsdp=fsdp),
               "eval": lambda: eval_programs(config, devices, fsdp=fsdp)}
  return [p for job in jobs for p in build_job[job]()]
