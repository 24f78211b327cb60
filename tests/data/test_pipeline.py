"""Tests of the grain input pipelines."""

import numpy as np
import pytest

from memjax.data import IGNORE_INDEX
from memjax.data import ArraySource
from memjax.data import MqarTask
from memjax.data import batched_dataset
from memjax.data import eval_batches
from memjax.data import generate_mqar
from memjax.data import load_mqar
from memjax.data import split_seed

TASK = MqarTask(vocab_size=64, seq_len=16, num_kv_pairs=2)


def _source(num_examples):
  """MQAR examples plus their index, to see which examples a batch holds."""
  arrays = generate_mqar(TASK, num_examples, seed=0)
  arrays["index"] = np.arange(num_examples)
  return ArraySource(arrays)


def test_array_source():
  source = _source(10)
  assert len(source) == 10
  example = source[3]
  assert example["index"] == 3
  assert example["inputs"].shape == (TASK.seq_len,)
  with pytest.raises(ValueError, match="first dimensions"):
    ArraySource({"inputs": np.zeros((3, 2)), "labels": np.zeros((4, 2))})


def test_batch_of_a_step():
  batch = batched_dataset(_source(50), 8, seed=0)[3]
  assert batch["inputs"].shape == batch["labels"].shape == (8, TASK.seq_len)
  assert batch["inputs"].dtype == batch["labels"].dtype == np.int32


def test_same_seed_gives_same_batches_in_any_order():
  source = _source(50)
  a = batched_dataset(source, 8, seed=1)
  b = batched_dataset(source, 8, seed=1)
  steps = [0, 1, 6, 7, 1000]
  # b is read backwards: a batch depends on its step only, as on resumption.
  from_b = {step: b[step] for step in reversed(steps)}
  for step in steps:
    for name in ("inputs", "labels", "index"):
      np.testing.assert_array_equal(a[step][name], from_b[step][name])


def test_different_seeds_give_different_batches():
  source = _source(50)
  a = batched_dataset(source, 8, seed=1)[0]["index"]
  b = batched_dataset(source, 8, seed=2)[0]["index"]
  assert not np.array_equal(a, b)


@pytest.mark.parametrize("num_examples", [48, 50])
def test_every_example_once_per_epoch(num_examples):
  ds = batched_dataset(_source(num_examples), 8, seed=3)
  steps = -(-3 * num_examples // 8)
  stream = np.concatenate([ds[step]["index"] for step in range(steps)])
  epochs = [stream[e * num_examples : (e + 1) * num_examples] for e in range(3)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num_examples))
  # Each epoch has its own permutation.
  assert not np.array_equal(epochs[0], epochs[1])


def test_without_shuffle_batches_follow_the_source():
  ds = batched_dataset(_source(10), 4, seed=0, shuffle=False)
  np.testing.assert_array_equal(ds[2]["index"], [8, 9, 0, 1])


@pytest.mark.parametrize("drop_remainder, sizes", [(True, [4, 4]), (False, [4, 4, 2])])
def test_finite_epochs(drop_remainder, sizes):
  ds = batched_dataset(_source(10), 4, seed=0, num_epochs=1,
                       drop_remainder=drop_remainder)
  assert [len(batch["index"]) for batch in ds] == sizes


def test_bad_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    batched_dataset(_source(10), 0, seed=0)
  with pytest.raises(ValueError, match="seed"):
    batched_dataset(_source(10), 4, seed=-1)
  with pytest.raises(ValueError, match="source"):
    batched_dataset(ArraySource({"inputs": np.zeros((0, 4))}), 4, seed=0)


def test_eval_batches_cover_the_source_once_in_order():
  source = _source(10)
  batches = list(eval_batches(source, 4))
  assert len(batches) == 3
  for batch in batches:
    assert batch["inputs"].shape == batch["labels"].shape == (4, TASK.seq_len)
  index = np.concatenate([batch["index"] for batch in batches])
  np.testing.assert_array_equal(index[:10], np.arange(10))
  # The two padding rows carry no labels and zero inputs.
  last = batches[-1]
  assert (last["labels"][2:] == IGNORE_INDEX).all()
  assert (last["inputs"][2:] == 0).all()
  np.testing.assert_array_equal(last["labels"][:2], [source[i]["labels"] for i in (8, 9)])


def _union_over_processes(make, count, step=None):
  """The batches of `count` processes, their rows concatenated in process order."""
  shares = [make(process_index=p, process_count=count) for p in range(count)]
  if step is not None:
    shares = [[share[step]] for share in shares]
  lengths = {len(share) for share in shares}
  assert len(lengths) == 1, f"processes get different numbers of batches: {lengths}"
  return [
      {name: np.concatenate([share[i][name] for share in shares]) for name in shares[0][i]}
      for i in range(lengths.pop())
  ]


@pytest.mark.parametrize("count", [2, 4])
def test_process_shares_make_up_the_global_train_batches(count):
  # 50 examples in batches of 8: steps 6, 12 and 18 cross epoch boundaries.
  source = _source(50)
  single = batched_dataset(source, 8, seed=3)
  make = lambda **shares: batched_dataset(source, 8, seed=3, **shares)
  for step in (0, 1, 6, 12, 18, 1000):
    (union,) = _union_over_processes(make, count, step)
    assert union["inputs"].shape == (8, TASK.seq_len)
    for name in ("inputs", "labels", "index"):
      np.testing.assert_array_equal(union[name], single[step][name])
  # Process 1's rows are the second quarter (or half) of the global batch.
  np.testing.assert_array_equal(make(process_index=1, process_count=count)[6]["index"],
                                single[6]["index"][8 // count:2 * 8 // count])


def test_process_shares_of_finite_epochs_drop_the_same_batches():
  source = _source(10)
  make = lambda **shares: batched_dataset(source, 4, seed=0, num_epochs=1, **shares)
  union = _union_over_processes(make, 2)
  single = list(make())
  assert len(union) == len(single) == 2
  for got, want in zip(union, single):
    np.testing.assert_array_equal(got["index"], want["index"])


@pytest.mark.parametrize("num_examples, count", [(10, 2), (10, 4), (13, 4), (16, 4)])
def test_process_shares_make_up_the_global_eval_batches(num_examples, count):
  # 10 examples in batches of 8 over 4 processes: the last two processes' share of the
  # second batch is padding only.
  source = _source(num_examples)
  make = lambda **shares: eval_batches(source, 8, **shares)
  union = _union_over_processes(make, count)
  single = list(make())
  assert len(union) == len(single) == -(-num_examples // 8)
  for got, want in zip(union, single):
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_array_equal(got[name], want[name])


def test_bad_process_shares():
  with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by process_count=4"):
    batched_dataset(_source(10), 6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"batch_size=6 must be divisible by process_count=4"):
    eval_batches(_source(10), 6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=2, process_count=2"):
    batched_dataset(_source(10), 4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="drop_remainder=False with process_count=2"):
    batched_dataset(_source(10), 4, seed=0, num_epochs=1, drop_remainder=False,
                    process_index=0, process_count=2)


def test_tfds_source_gives_the_batches_of_the_arrays(tmp_path):
  tfds_source = load_mqar(TASK, "train", data_dir=tmp_path, num_train=32, num_test=8,
                          seed=0)
  arrays = ArraySource(generate_mqar(TASK, 32, split_seed(0, "train")))
  a = batched_dataset(tfds_source, 8, seed=5)
  b = batched_dataset(arrays, 8, seed=5)
  for step in (0, 5):
    for name in ("inputs", "labels"):
      np.testing.assert_array_equal(a[step][name], b[step][name])
