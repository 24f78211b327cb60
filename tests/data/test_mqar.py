"""Tests of the MQAR generator and its TFDS dataset."""

import dataclasses

import numpy as np
import pytest

from memjax.data import IGNORE_INDEX
from memjax.data import MqarTask
from memjax.data import generate_mqar
from memjax.data import load_mqar
from memjax.data import mqar_config
from memjax.data import split_seed

TASK = MqarTask(vocab_size=256, seq_len=64, num_kv_pairs=8)
NUM = 400


def _context(task, inputs):
  """Returns the keys and values of the context, each [N, num_kv_pairs]."""
  return inputs[:, 0 : task.context_len : 2], inputs[:, 1 : task.context_len : 2]


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_shapes_and_dtypes(random_non_queries):
  task = MqarTask(vocab_size=256, seq_len=64, num_kv_pairs=8,
                  random_non_queries=random_non_queries)
  data = generate_mqar(task, NUM, seed=0)
  assert set(data) == {"inputs", "labels"}
  for array in data.values():
    assert array.shape == (NUM, task.seq_len)
    assert array.dtype == np.int32


def test_zero_examples():
  data = generate_mqar(TASK, 0, seed=0)
  assert data["inputs"].shape == data["labels"].shape == (0, TASK.seq_len)


def test_context_keys_and_values_are_distinct_and_in_range():
  keys, values = _context(TASK, generate_mqar(TASK, NUM, seed=1)["inputs"])
  half = TASK.vocab_size // 2
  assert keys.min() >= 1 and keys.max() < half
  assert values.min() >= half and values.max() < TASK.vocab_size
  for row_keys, row_values in zip(keys, values):
    assert len(set(row_keys)) == TASK.num_kv_pairs
    assert len(set(row_values)) == TASK.num_kv_pairs


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_each_key_is_queried_once_and_labelled_with_its_value(random_non_queries):
  task = MqarTask(vocab_size=256, seq_len=64, num_kv_pairs=8,
                  random_non_queries=random_non_queries)
  data = generate_mqar(task, NUM, seed=2)
  inputs, labels = data["inputs"], data["labels"]
  keys, values = _context(task, inputs)
  labelled = labels != IGNORE_INDEX
  assert (labelled.sum(axis=1) == task.num_kv_pairs).all()
  assert not labelled[:, : task.context_len].any()
  assert (labels[~labelled] == IGNORE_INDEX).all()
  for row in range(NUM):
    pos = np.flatnonzero(labelled[row])
    # Queries sit on even offsets after the context.
    assert ((pos - task.context_len) % 2 == 0).all()
    binding = dict(zip(keys[row], values[row]))
    assert sorted(inputs[row, pos]) == sorted(keys[row])
    for p in pos:
      assert labels[row, p] == binding[inputs[row, p]]


def test_filler_only_outside_context_and_queries():
  plain_task = dataclasses.replace(TASK, random_non_queries=False)
  plain = generate_mqar(plain_task, NUM, seed=3)
  noisy = generate_mqar(TASK, NUM, seed=3)
  np.testing.assert_array_equal(plain["labels"], noisy["labels"])
  kept = plain["labels"] != IGNORE_INDEX
  kept[:, : TASK.context_len] = True
  filler = ~kept
  # Without random filler the non-query positions are token 0 and nothing else is.
  assert (plain["inputs"][filler] == 0).all()
  assert (plain["inputs"][kept] != 0).all()
  # Random filler changes exactly those positions, with tokens of the whole vocabulary.
  np.testing.assert_array_equal(plain["inputs"][kept], noisy["inputs"][kept])
  replaced = noisy["inputs"][filler]
  assert replaced.min() >= 0 and replaced.max() < TASK.vocab_size
  assert (replaced >= TASK.vocab_size // 2).any() and (replaced < TASK.vocab_size // 2).any()


def test_query_offsets_follow_the_power_law():
  # The first context key is queried at the first of the successive draws, so
  # its slot has exactly the power-law distribution.
  task = MqarTask(vocab_size=64, seq_len=24, num_kv_pairs=2, power_a=0.3,
                  random_non_queries=False)
  data = generate_mqar(task, 20_000, seed=4)
  first_key = data["inputs"][:, 0]
  rows, pos = np.nonzero(data["inputs"][:, task.context_len :] == first_key[:, None])
  assert len(rows) == 20_000
  slots = pos // 2
  a = task.power_a
  p = a * np.arange(1, task.num_query_slots + 1) ** (a - 1)
  p /= p.sum()
  freq = np.bincount(slots, minlength=task.num_query_slots) / len(slots)
  np.testing.assert_allclose(freq, p, atol=0.015)


def test_deterministic_per_seed():
  a = generate_mqar(TASK, NUM, seed=5)
  b = generate_mqar(TASK, NUM, seed=5)
  c = generate_mqar(TASK, NUM, seed=6)
  for name in ("inputs", "labels"):
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seq_len=31, num_kv_pairs=8), "seq_len"),
        (dict(vocab_size=16, num_kv_pairs=8), "vocab_size"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(power_a=0.0), "power_a"),
    ],
)
def test_impossible_tasks_raise(kwargs, field):
  task = MqarTask(**kwargs)
  with pytest.raises(ValueError, match=field):
    task.validate()
  with pytest.raises(ValueError, match=field):
    generate_mqar(task, 1, seed=0)


def test_smallest_possible_task():
  task = MqarTask(vocab_size=6, seq_len=8, num_kv_pairs=2)
  data = generate_mqar(task, 50, seed=0)
  assert ((data["labels"] != IGNORE_INDEX).sum(axis=1) == 2).all()


def test_config_names_follow_parameters():
  names = {
      mqar_config(task, num_train=n, num_test=m, seed=s).name
      for task, n, m, s in [
          (TASK, 64, 16, 0),
          (dataclasses.replace(TASK, power_a=1.0), 64, 16, 0),
          (dataclasses.replace(TASK, random_non_queries=False), 64, 16, 0),
          (TASK, 65, 16, 0),
          (TASK, 64, 17, 0),
          (TASK, 64, 16, 1),
      ]
  }
  assert len(names) == 6
  assert mqar_config(MqarTask(seq_len=128, num_kv_pairs=8), num_train=100_000,
                     num_test=3_000, seed=0).name == (
      "v8192_t128_kv8_a0.01_rnq1_train100000_test3000_s0")


def test_tfds_round_trip(tmp_path):
  task = MqarTask(vocab_size=64, seq_len=16, num_kv_pairs=2)
  sizes = {"train": 64, "test": 16}
  assert split_seed(7, "train") != split_seed(7, "test")
  for split, size in sizes.items():
    source = load_mqar(task, split, data_dir=tmp_path, num_train=sizes["train"],
                       num_test=sizes["test"], seed=7)
    expected = generate_mqar(task, size, split_seed(7, split))
    assert len(source) == size
    for name in ("inputs", "labels"):
      got = np.stack([source[i][name] for i in range(size)])
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, expected[name])

