r"""Trains and evaluates a memjax DecoderLM; see experiments/configs/mqar.py.

  python experiments/train.py --config=experiments/configs/mqar.py:tiny \
      --workdir=/tmp/memjax/tiny
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from memjax import models
from memjax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mqar.py"),
    "Config file, optionally with `:variant`.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/memjax/mqar", "Where checkpoints and metrics go."
)


def print_parameter_summary(config) -> None:
  """Prints the model's parameter counts; shapes only (jax.eval_shape), nothing computed."""
  model = models.DecoderLM(**config.model)
  tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  print(models.parameter_summary(params, model=model), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # The progress lines are printed; orbax logs every save at INFO, which
    # would bury them. --verbosity=0 brings the INFO logs back.
    logging.set_verbosity(logging.WARNING)
  print_parameter_summary(_CONFIG.value)
  final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(f"final metrics: {json.dumps(final, sort_keys=True)}")


if __name__ == "__main__":
  app.run(main)
