"""Trains the evaluation classifier of a data set (classifier-FID, classifier-IS, label accuracy).

  python -m cfdg_jax.eval.train_classifier --config configs/digits.py --out_dir /tmp/cls_digits

Only `config.data` is used; override it as in training, e.g. offline MNIST:

  python -m cfdg_jax.eval.train_classifier --config configs/mnist.py --out_dir /tmp/cls_mnist \
      --config.data.manual_dir=../shared/data/mnist

Logs the loss, training accuracy and steps/s every 100 steps, then the test accuracy, and writes
classifier.msgpack and classifier.json into --out_dir (see cfdg_jax.eval.classifier).
"""
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from cfdg_jax import runtime
from cfdg_jax import validation
from cfdg_jax.eval import classifier

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py); only "
                                "config.data is used.", lock_config=True)
flags.DEFINE_string("out_dir", None, "Directory for classifier.msgpack and classifier.json.")
flags.DEFINE_integer("num_steps", None, "Training steps; default: about 100 epochs, at most 1,500.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (cosine decay to 0).")
flags.DEFINE_integer("width", 64, "Channels of the classifier's coarsest level.")
flags.DEFINE_integer("seed", 0, "Seeds initialization, data order and augmentation.")
flags.mark_flags_as_required(["config", "out_dir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name in ("num_steps", "batch_size", "width"):
    if FLAGS[name].value is not None and FLAGS[name].value < 1:
      raise app.UsageError(f"--{name}={FLAGS[name].value} must be at least 1.")
  runtime.initialize()
  validation.check_data(FLAGS.config.data)  # Before any data loading or compilation.
  validation.check_workdir(FLAGS.out_dir, "--out_dir")
  data_config = FLAGS.config.data
  num_steps = FLAGS.num_steps
  if num_steps is None:
    num_steps = classifier.default_num_steps(data_config, FLAGS.batch_size)
  metadata = classifier.train(data_config, FLAGS.out_dir, num_steps=num_steps,
                              batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
                              seed=FLAGS.seed, width=FLAGS.width)
  print(f"Test accuracy of the {metadata['dataset']} classifier: {metadata['test_accuracy']:.4f}; "
        f"wrote {FLAGS.out_dir}/{classifier.METADATA_FILE}:")
  print(json.dumps(metadata, indent=2))


def cli() -> None:
  """The `cfdg-train-classifier` command (pyproject.toml)."""
  runtime.run(main)


if __name__ == "__main__":
  cli()
