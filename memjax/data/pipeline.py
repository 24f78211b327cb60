"""grain input pipelines: training batches by step index, and one ordered pass for eval.

A source is anything with `__len__` and `__getitem__` returning a dict of numpy
arrays: the TFDS data source of `load_mqar`, or an `ArraySource` over arrays in
memory (e.g. the output of `generate_mqar`).

Training asks for `ds[step]`; the batch of a step depends only on the source,
the batch size and the seed, so a run restarted from a checkpoint at step s
continues with exactly the batches it would have seen.
"""

from collections.abc import Mapping
import functools

import grain
import numpy as np

from memjax.data.mqar import IGNORE_INDEX


class ArraySource:
  """A random-access source over arrays in memory, split along their first axis.

  Implements grain's `RandomAccessDataSource` protocol.

  Args:
    arrays: Arrays with equal first dimension N, e.g. the output of
      `generate_mqar`.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    if not arrays:
      raise ValueError("arrays must hold at least one array, got none.")
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays must have equal first dimensions, got {lengths}.")
    self._arrays = {name: np.asarray(array) for name, array in arrays.items()}
    self._length = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Returns example `index`: {name: array[index]}."""
    return {name: array[index] for name, array in self._arrays.items()}

  def __repr__(self) -> str:
    shapes = {name: array.shape for name, array in self._arrays.items()}
    return f"ArraySource({shapes})"


def batched_dataset(
    source,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> grain.MapDataset:
  """Returns training batches, indexed by step.

  The source is shuffled with a fresh permutation every epoch, repeated and
  cut into batches. Batches run across epoch boundaries, so every example
  appears once in each run of `len(source)` consecutive examples of the stream.

  Args:
    source: Random-access source of N examples, each a dict of arrays.
    batch_size: Examples per batch B.
    seed: Shuffling seed, in [0, 2**32); ignored when `shuffle` is False.
    shuffle: Shuffle the examples; otherwise take them in source order.
    num_epochs: Number of passes over the source; None repeats forever.
    drop_remainder: With a finite `num_epochs`, drop the last batch if it has
      fewer than B examples.

  Returns:
    A MapDataset whose item `step` is the batch {name: [B, ...]} of that
    training step, e.g. {"inputs": int32 [B, T], "labels": int32 [B, T]}.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if len(source) == 0:
    raise ValueError("source must hold at least one example, got 0.")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat(num_epochs)
  return ds.batch(batch_size, drop_remainder=drop_remainder)


def eval_batches(source, batch_size: int) -> grain.MapDataset:
  """Returns one pass over the source, in order, in batches of equal size.

  The last batch is padded to B rows so that every batch has the same shape
  (one compilation, and shardable over data-parallel devices). Padding rows
  hold zeros and, in "labels", only `IGNORE_INDEX`: metrics that count
  labelled positions ignore them; per-example metrics must skip rows without
  labels.

  Args:
    source: Random-access source of N examples, each a dict of arrays.
    batch_size: Examples per batch B.

  Returns:
    A MapDataset of ceil(N / B) batches {name: [B, ...]}, iterable with `for`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  ds = grain.MapDataset.source(source).batch(batch_size, drop_remainder=False)
  return ds.map(functools.partial(_pad_batch, batch_size=batch_size))


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads every array of the batch to batch_size rows; see `eval_batches`."""
  padded = {}
  for name, array in batch.items():
    fill = IGNORE_INDEX if name == "labels" else 0
    rows = [(0, batch_size - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    padded[name] = np.pad(array, rows, constant_values=fill)
  return padded


def _shuffle_seed(seed: int) -> int:
  """Maps the user's seed to the seed of grain's shuffle.

  grain shuffles epoch e with seed + e, so seeds s and s + 1 would see the
  same permutations one epoch apart; hashing the seed first keeps runs with
  nearby seeds unrelated.
  """
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
  return int(np.random.SeedSequence(seed).generate_state(1)[0])
