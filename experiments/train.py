r"""Trains and evaluates a memjax DecoderLM; see experiments/configs/mqar.py.

  python experiments/train.py --config=experiments/configs/mqar.py:tiny \
      --workdir=/tmp/memjax/tiny

On several hosts, start one process per host with the same flags plus either
`--distributed` (JAX detects the cluster: TPU pods, SLURM) or all three of
`--coordinator_address`, `--num_processes` and `--process_id`, e.g. two CPU
processes on one machine (the workdir must be shared):

  python experiments/train.py --config=experiments/configs/mqar.py:tiny \
      --workdir=/tmp/memjax/tiny2 --coordinator_address=localhost:12345 \
      --num_processes=2 --process_id=0    # and --process_id=1 in another shell
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
from memjax.train import distributed
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for multi-process training; needs --num_processes "
    "and --process_id.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-process run."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id in [0, num_processes)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Start jax.distributed with the cluster JAX detects (TPU pods, SLURM); "
    "instead of the three flags above.",
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
  # Before anything touches the devices: the backends start with the cluster.
  distributed.initialize(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      auto=_DISTRIBUTED.value,
  )
  primary = jax.process_index() == 0
  if primary:
    print_parameter_summary(_CONFIG.value)
  final = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if primary:
    print(f"final metrics: {json.dumps(final, sort_keys=True)}")


if __name__ == "__main__":
  app.run(main)
