"""What the TFDS builders of the generated tasks (MQAR, S-NIAH) share.

A generated task's builder config holds the task, the size of each split and a seed; each
split is the task's numpy generator run with a seed hashed from (seed, split), so example i
of a split is example i of the generator. Nothing is downloaded and nothing needs
TensorFlow; splits are stored as array_record for random access.
"""

import os
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "test")


def split_seed(seed: int, split: str) -> int:
  """Returns the generator seed of a split of a dataset with `seed`.

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


class GeneratedSplits:
  """Mixin of a `tfds.core.GeneratorBasedBuilder` whose splits come from a generator.

  The builder class sets `generate` (a staticmethod `(task, num_examples, seed) ->
  {"inputs", "labels": int32 [N, length]}`), `length_field` (the task attribute with the
  sequence length) and `homepage`; its configs have `task`, `num_train`, `num_test` and
  `seed`.
  """

  generate: Callable[..., dict]
  length_field: str
  homepage: str
  # Nothing is downloaded, so there are no URL checksums. Saying so also keeps
  # TFDS from looking for a checksums file through `importlib_resources`, which
  # it imports but does not install on Python >= 3.9 (tensorflow/datasets#11212).
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    seq = (getattr(self.builder_config.task, self.length_field),)
    # DatasetInfo directly rather than `dataset_info_from_configs`, which
    # reads metadata files next to the builder's module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=seq, dtype=np.int32),
            "labels": tfds.features.Tensor(shape=seq, dtype=np.int32),
        }),
        homepage=self.homepage,
        # Keep the generator's order so that example i of a split is example i
        # of the generator with the split's seed.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    sizes = {"train": config.num_train, "test": config.num_test}
    return {split: self._generate_examples(split, sizes[split]) for split in SPLITS}

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    arrays = self.generate(config.task, num_examples, split_seed(config.seed, split))
    for i in range(num_examples):
      yield i, {"inputs": arrays["inputs"][i], "labels": arrays["labels"][i]}


def builder(builder_class, config, data_dir: str | os.PathLike | None):
  """The builder of `config` (not built yet); TFDS refuses a custom config that shares
  the name of a predefined one, so a predefined config of that name is used instead."""
  config = builder_class.builder_configs.get(config.name, config)
  return builder_class(data_dir=data_dir, config=config)


def load_split(dataset_builder, split: str):
  """A random-access source over a split of the builder's dataset, built on first use."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  # A no-op when this config is already built.
  dataset_builder.download_and_prepare(file_format="array_record")
  return dataset_builder.as_data_source()[split]
