"""S-NIAH as a TFDS dataset, stored as array_record for random access.

As for MQAR (`memjax.data.mqar_tfds`), each set of parameters is its own
builder config, named after them (for example
`passkey_t1024_duniform_train20000_test500_s0`), built once into its own
directory under `data_dir/sniah/`, with neither TensorFlow nor a download.

    source = load_sniah(SniahTask(needle="number", context_length=2048),
                        "test", data_dir="/tmp/tfds")
    source[0]  # {"inputs": int32 [2048], "labels": int32 [2048]}
"""

import dataclasses
import os

import tensorflow_datasets as tfds

from memjax.data import generated_tfds
from memjax.data.sniah import SniahTask
from memjax.data.sniah import generate_sniah


@dataclasses.dataclass(eq=False)
class SniahConfig(tfds.core.BuilderConfig):
  """A builder config: the task and how many examples of each split.

  Build one with `sniah_config`, which derives the name from the parameters.

  Attributes:
    task: The S-NIAH task.
    num_train: Number of examples of the train split.
    num_test: Number of examples of the test split.
    seed: Seed from which each split's seed is derived (`generated_tfds.split_seed`).
  """

  task: SniahTask = SniahTask()
  num_train: int = 20_000
  num_test: int = 500
  seed: int = 0


def sniah_config(
    task: SniahTask, *, num_train: int, num_test: int, seed: int
) -> SniahConfig:
  """Returns the config of these parameters, named after them.

  Args:
    task: The S-NIAH task; validated here so a bad task fails before building.
    num_train: Number of train examples.
    num_test: Number of test examples.
    seed: Seed of the dataset.

  Returns:
    The config.
  """
  task.validate()
  depth = "uniform" if task.depth is None else repr(float(task.depth))
  name = (
      f"{task.needle}_t{task.context_length}_d{depth}"
      f"_train{num_train}_test{num_test}_s{seed}"
  )
  return SniahConfig(
      name=name,
      description=(
          f"S-NIAH {task}, {num_train} train / {num_test} test, seed {seed}."
      ),
      task=task,
      num_train=num_train,
      num_test=num_test,
      seed=seed,
  )


class SniahDataset(generated_tfds.GeneratedSplits, tfds.core.GeneratorBasedBuilder):
  """Single needle-in-a-haystack (RULER S-NIAH, arXiv 2404.06654), byte tokens."""

  name = "sniah"
  # Bump when `generate_sniah` changes the examples of a given seed.
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      sniah_config(SniahTask(), num_train=20_000, num_test=500, seed=0)
  ]
  generate = staticmethod(generate_sniah)
  length_field = "context_length"
  homepage = "https://arxiv.org/abs/2404.06654"


def sniah_builder(
    task: SniahTask,
    *,
    data_dir: str | os.PathLike | None = None,
    num_train: int = 20_000,
    num_test: int = 500,
    seed: int = 0,
) -> SniahDataset:
  """Returns the builder of these parameters (not built yet).

  Args:
    task: The S-NIAH task.
    data_dir: TFDS data directory; None for the TFDS default.
    num_train: Number of train examples.
    num_test: Number of test examples.
    seed: Seed of the dataset.

  Returns:
    The builder.
  """
  config = sniah_config(task, num_train=num_train, num_test=num_test, seed=seed)
  return generated_tfds.builder(SniahDataset, config, data_dir)


def load_sniah(
    task: SniahTask,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    num_train: int = 20_000,
    num_test: int = 500,
    seed: int = 0,
):
  """Returns a random-access source over a split, building it on first use.

  Args:
    task: The S-NIAH task.
    split: "train" or "test".
    data_dir: TFDS data directory; None for the TFDS default.
    num_train: Number of train examples.
    num_test: Number of test examples.
    seed: Seed of the dataset; the split's examples are
      `generate_sniah(task, n, generated_tfds.split_seed(seed, split))`.

  Returns:
    A TFDS array_record data source: `len(source)` examples, `source[i]` is
    {"inputs": int32 [context_length], "labels": int32 [context_length]}.
  """
  builder = sniah_builder(
      task, data_dir=data_dir, num_train=num_train, num_test=num_test, seed=seed
  )
  return generated_tfds.load_split(builder, split)
