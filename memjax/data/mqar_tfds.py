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

import numpy as np
import tensorflow_datasets as tfds

from memjax.data.mqar import MqarTask
from memjax.data.mqar import generate_mqar

SPLITS = ("train", "test")


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


def split_seed(seed: int, split: str) -> int:
  """Returns the `generate_mqar` seed of a split of a dataset with `seed`.

  The seeds of the splits are hashed from (seed, split) rather than offset
  from seed, so no split of one dataset repeats a split of another seed.

  Args:
    seed: Seed of the dataset.
    split: "train" or "test".

  Returns:
    A seed in [0, 2**32).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


class MqarDataset(tfds.core.GeneratorBasedBuilder):
  """Multi-query associative recall (Zoology, arXiv 2312.04927)."""

  name = "mqar"
  # Bump when `generate_mqar` changes the examples of a given seed.
  VERSION = tfds.core.Version("1.0.0")
  # Nothing is downloaded, so there are no URL checksums. Saying so also keeps
  # TFDS from looking for a checksums file through `importlib_resources`, which
  # it imports but does not install on Python >= 3.9 (tensorflow/datasets#11212).
  url_infos = None
  BUILDER_CONFIGS = [
      mqar_config(MqarTask(), num_train=100_000, num_test=3_000, seed=0)
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    seq = (self.builder_config.task.seq_len,)
    # DatasetInfo directly rather than `dataset_info_from_configs`, which
    # reads metadata files next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=seq, dtype=np.int32),
            "labels": tfds.features.Tensor(shape=seq, dtype=np.int32),
        }),
        homepage="https://arxiv.org/abs/2312.04927",
        # Keep the generator's order so that example i of a split is example i
        # of `generate_mqar` with the split's seed.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    sizes = {"train": config.num_train, "test": config.num_test}
    return {split: self._generate_examples(split, sizes[split]) for split in SPLITS}

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    arrays = generate_mqar(config.task, num_examples, split_seed(config.seed, split))
    for i in range(num_examples):
      yield i, {"inputs": arrays["inputs"][i], "labels": arrays["labels"][i]}


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
  # TFDS refuses a custom config that shares the name of a predefined one.
  config = MqarDataset.builder_configs.get(config.name, config)
  return MqarDataset(data_dir=data_dir, config=config)


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
      `generate_mqar(task, n, split_seed(seed, split))`.

  Returns:
    A TFDS array_record data source: `len(source)` examples, `source[i]` is
    {"inputs": int32 [seq_len], "labels": int32 [seq_len]}.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  builder = mqar_builder(
      task, data_dir=data_dir, num_train=num_train, num_test=num_test, seed=seed
  )
  # A no-op when this config is already built.
  builder.download_and_prepare(file_format="array_record")
  return builder.as_data_source()[split]
