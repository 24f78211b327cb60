"""grain input pipelines: training batches by step index, and one ordered pass for eval.

A source is anything with `__len__` and `__getitem__` returning a dict of numpy
arrays: the TFDS data source of `load_mqar`, or an `ArraySource` over arrays in
memory (e.g. the output of `generate_mqar`).

Training asks for `ds[step]`; the batch of a step depends only on the source,
the batch size and the seed, so a run restarted from a checkpoint at step s
continues with exactly the batches it would have seen.

On several hosts, each of P processes reads only its share of every global
batch of B rows: process p gets rows [p * B/P, (p + 1) * B/P) (`process_index`
and `process_count` of both pipelines); the union over the processes is the
batch a single process would read.
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
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
  """Returns training batches, indexed by step.

  The source is shuffled with a fresh permutation every epoch, repeated and
  cut into batches. Batches run across epoch boundaries, so every example
  appears once in each run of `len(source)` consecutive examples of the stream.

  With P = `process_count` > 1, the stream is cut into B/P-row pieces and
  process p takes every P-th piece from piece p: its batch of a step is rows
  [p * B/P, (p + 1) * B/P) of the global batch, and it never reads the
  examples of another process.

  Args:
    source: Random-access source of N examples, each a dict of arrays.
    batch_size: Examples per global batch B, over all processes.
    seed: Shuffling seed, in [0, 2**32); ignored when `shuffle` is False.
    shuffle: Shuffle the examples; otherwise take them in source order.
    num_epochs: Number of passes over the source; None repeats forever.
    drop_remainder: With a finite `num_epochs`, drop the last batch if it has
      fewer than B examples. Must be True when `process_count` > 1 and
      `num_epochs` is finite: a short last batch has no even split.
    process_index: This process's share p, in [0, P).
    process_count: Number of processes P sharing every batch; B % P == 0.

  Returns:
    A MapDataset whose item `step` is this process's part of the batch of
    that training step, {name: [B/P, ...]}, e.g. {"inputs": int32 [B/P, T],
    "labels": int32 [B/P, T]}.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if len(source) == 0:
    raise ValueError("source must hold at least one example, got 0.")
  local_size = _local_batch_size(batch_size, process_index, process_count)
  if process_count > 1 and num_epochs is not None and not drop_remainder:
    raise ValueError(
        f"drop_remainder=False with process_count={process_count}: the short "
        "last batch of a finite stream cannot be split evenly over the "
        "processes; use drop_remainder=True or num_epochs=None."
    )
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(seed))
  ds = ds.repeat(num_epochs).batch(local_size, drop_remainder=drop_remainder)
  return _take_share(ds, process_index, process_count)


def eval_batches(
    source, batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
  """Returns one pass over the source, in order, in batches of equal size.

  The last batch is padded to B rows so that every batch has the same shape
  (one compilation, and shardable over data-parallel devices). Padding rows
  hold zeros and, in "labels", only `IGNORE_INDEX`: metrics that count
  labelled positions ignore them; per-example metrics must skip rows without
  labels.

  With P = `process_count` > 1, process p gets rows [p * B/P, (p + 1) * B/P)
  of every padded global batch (rows past the end of the source are padding,
  so a process may get batches of padding only): all processes get the same
  number of batches, as the eval step on their global array needs.

  Args:
    source: Random-access source of N examples, each a dict of arrays.
    batch_size: Examples per global batch B, over all processes.
    process_index: This process's share p, in [0, P).
    process_count: Number of processes P sharing every batch; B % P == 0.

  Returns:
    A MapDataset of ceil(N / B) batches {name: [B/P, ...]}, iterable with
    `for`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  local_size = _local_batch_size(batch_size, process_index, process_count)
  pieces = grain.MapDataset.source(source).batch(local_size, drop_remainder=False)
  # Whole global batches: the pieces past the source's end are all padding.
  num_pieces = -(-len(source) // batch_size) * process_count

  def piece(index: int) -> dict[str, np.ndarray]:
    if index < len(pieces):
      return _pad_batch(pieces[index], local_size)
    return _pad_batch({k: v[:0] for k, v in pieces[0].items()}, local_size)

  return _take_share(grain.MapDataset.range(num_pieces), process_index, process_count).map(piece)


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  """B/P, the rows of a global batch each process reads; checks the arguments."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index must be in [0, process_count) and process_count >= 1, "
        f"got process_index={process_index}, process_count={process_count}."
    )
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} must be divisible by process_count="
        f"{process_count}: every process reads an equal share of each batch."
    )
  return batch_size // process_count


def _take_share(pieces: grain.MapDataset, process_index: int, process_count: int):
  """Pieces p, p + P, p + 2P, ... of whole groups of P (one global batch each)."""
  if process_count == 1:
    return pieces
  whole = len(pieces) // process_count * process_count
  return pieces[:whole][process_index::process_count]


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
