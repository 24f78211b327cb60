"""MQAR as a TFDS dataset, stored as array_record for random access.

Each set of parameters is its own builder config, named after the parameters
(for example `v8192_t128_kv8_a0.01_rnq1_train100000_test3000_s0`), so
different tasks are built once each into their own directories under
`data_dir/mqar/`. Building and reading need neither TensorFlow nor a download.

    source = load_mqar(MqarTask(seq_len=128, num_kv_pairs=8), "train",
                       data_dir="/tmp/tfds")
    source[0]  # {"inputs": int32 [128], "labels": int32 [128]}
"""

import dataclasses
import os

import tensorflow_datasets as tfds

from memjax.data import generated_tfds
from memjax.data.mqar import MqarTask
from memjax.data.mqar import generate_mqar


@dataclasses.dataclass(eq=False)
class MqarConfig(tfds.core.BuilderConfig):
  """A builder config: the task and how many examples of each split.

  Build one with `mqar_config`, which derives the name from the parameters.

  Attributes:
    task: The MQAR task.
    num_train: Number of examples of the train split.
    num_test: Number of examples of the test split.
    seed: Seed from which the seed of each split is derived.
  """

  task: MqarTask = MqarTask()
  num_train: int = 100_000
  num_test: int = 3_000
  seed: int = 0


def mqar_config(
    task: MqarTask, *, num_train: int, num_test: int, seed: int
) -> MqarConfig:
  """Returns the config of these parameters, named after them.

  Args:
    task: The MQAR task; validated here so a bad task fails before building.
    num_train: Number of train examples.
    num_test: Number of test examples.
    seed: Seed of the dataset.

  Returns:
    The config.
  """
  task.validate()
  name = (
      f"v{task.vocab_size}_t{task.seq_len}_kv{task.num_kv_pairs}"
      f"_a{float(task.power_a)!r}_rnq{int(task.random_non_queries)}"
      f"_train{num_train}_test{num_test}_s{seed}"
  )
  return MqarConfig(
      name=name,
      description=f"MQAR {task}, {num_train} train / {num_test} test, seed {seed}.",
      task=task,
      num_train=num_train,
      num_test=num_test,
      seed=seed,
  )


class MqarDataset(generated_tfds.GeneratedSplits, tfds.core.GeneratorBasedBuilder):
  """Multi-query associative recall (Zoology, arXiv 2312.04927)."""

  name = "mqar"
  # Bump when `generate_mqar` changes the examples of a given seed.
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      mqar_config(MqarTask(), num_train=100_000, num_test=3_000, seed=0)
  ]
  generate = staticmethod(generate_mqar)
  length_field = "seq_len"
  homepage = "https://arxiv.org/abs/2312.04927"


def mqar_builder(
    task: MqarTask,
    *,
    data_dir: str | os.PathLike | None = None,
    num_train: int = 100_000,
    num_test: int = 3_000,
    seed: int = 0,
) -> MqarDataset:
  """Returns the builder of these parameters (not built yet).

  Args:
    task: The MQAR task.
    data_dir: TFDS data directory; None for the TFDS default.
    num_train: Number of train examples.
    num_test: Number of test examples.
    seed: Seed of the dataset.

  Returns:
    The builder.
  """
  config = mqar_config(task, num_train=num_train, num_test=num_test, seed=seed)
  return generated_tfds.builder(MqarDataset, config, data_dir)


def load_mqar(
    task: MqarTask,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    num_train: int = 100_000,
    num_test: int = 3_000,
    seed: int = 0,
):
  """Returns a random-access source over a split, building it on first use.

  Args:
    task: The MQAR task.
    split: "train" or "test".
    data_dir: TFDS data directory; None for the TFDS default.
    num_train: Number of train examples.
    num_test: Number of test examples.
    seed: Seed of the dataset; the split's examples are
      `generate_mqar(task, n, generated_tfds.split_seed(seed, split))`.

  Returns:
    A TFDS array_record data source: `len(source)` examples, `source[i]` is
    {"inputs": int32 [seq_len], "labels": int32 [seq_len]}.
  """
  builder = mqar_builder(
      task, data_dir=data_dir, num_train=num_train, num_test=num_test, seed=seed
  )
  return generated_tfds.load_split(builder, split)
