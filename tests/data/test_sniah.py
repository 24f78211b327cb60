"""Tests of the S-NIAH generator, its TFDS dataset and the byte tokenizer."""

import dataclasses
import re

import numpy as np
import pytest

from memjax.data import IGNORE_INDEX
from memjax.data import SniahTask
from memjax.data import generate_sniah
from memjax.data import load_sniah
from memjax.data import sniah_config
from memjax.data import sniah
from memjax.data import split_seed
from memjax.data import tokenizer

NUM = 60
# The needle sentence of each kind; the value is the last group.
NEEDLE_PATTERNS = {
    "passkey": r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\. ",
    "number": r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\. ",
    "word": r"One of the special magic words for ([a-z]+-[a-z]+) is: ([a-z]+)\. ",
}
# How often the needle sentence states its value.
VALUES_PER_NEEDLE = {"passkey": 2, "number": 1, "word": 1}


def _task(needle, **kwargs):
  """A task of the needle kind with room for about ten sentences of filler."""
  task = SniahTask(needle=needle, context_length=1)
  return dataclasses.replace(task, context_length=task.min_context_length + 300, **kwargs)


def _split(row):
  """Returns (haystack, question, answer) texts of an example's inputs and labels."""
  assert row["inputs"][0] == tokenizer.BOS_ID
  text = tokenizer.decode(row["inputs"])
  answer = tokenizer.decode(row["labels"][row["labels"] != IGNORE_INDEX])
  haystack, question = text.split("\n")
  assert question.endswith(" is " + answer)
  return haystack, question[: -len(answer)], answer


def _rows(data):
  """The examples of generated arrays, one dict each."""
  return [dict(zip(data, row)) for row in zip(*data.values())]


@pytest.mark.parametrize("needle", sniah.NEEDLES)
def test_shapes_length_and_labels(needle):
  task = _task(needle)
  data = generate_sniah(task, NUM, seed=0)
  assert set(data) == {"inputs", "labels"}
  length = task.context_length
  for array in data.values():
    assert array.shape == (NUM, length) and array.dtype == np.int32
  for row in _rows(data):
    inputs, labels = row["inputs"], row["labels"]
    assert inputs.min() >= 0 and inputs.max() < tokenizer.VOCAB_SIZE
    # Only BOS is special: the example is all text, with no padding.
    assert (inputs[1:] < 256).all()
    # The labels are the answer's tokens, predicted from the position before each.
    n = int((labels != IGNORE_INDEX).sum())
    assert n > 0
    np.testing.assert_array_equal(
        labels[length - 1 - n : length - 1], inputs[length - n :]
    )
    assert (labels[: length - 1 - n] == IGNORE_INDEX).all()
    assert labels[-1] == IGNORE_INDEX


@pytest.mark.parametrize("needle", sniah.NEEDLES)
def test_needle_once_and_value_only_there(needle):
  data = generate_sniah(_task(needle), NUM, seed=1)
  values = set()
  for row in _rows(data):
    haystack, question, answer = _split(row)
    needles = list(re.finditer(NEEDLE_PATTERNS[needle], haystack))
    assert len(needles) == 1, haystack
    assert needles[0].groups()[-1] == answer
    # The value appears in the haystack only where the needle states it, and
    # not at all in the question.
    assert haystack.count(answer) == VALUES_PER_NEEDLE[needle]
    assert answer not in question
    outside = haystack[: needles[0].start()] + haystack[needles[0].end() :]
    assert not re.search(r"\d", outside)
    if needle != "passkey":
      # The question asks for the key of the needle.
      assert question.count(needles[0].group(1)) == 2
    if needle == "word":
      assert answer in sniah._VALUE_WORDS
    values.add(answer)
  assert len(values) > NUM // 3


def test_value_words_occur_nowhere_else():
  words = [w for kind in sniah._WORDS.values() for w in kind]
  texts = (
      list(sniah._NOISE_SENTENCES)
      + list(sniah._NEEDLE_TEMPLATES.values())
      + list(sniah._QUESTION_TEMPLATES.values())
  )
  for value in sniah._VALUE_WORDS:
    assert value.isalpha() and value.islower()
    assert not any(value in w for w in words), value
    assert not any(value in t.lower() for t in texts), value
  assert not any(c.isdigit() for t in texts + words for c in t)
  # One byte per character: string lengths are token counts.
  assert all(t.isascii() for t in texts + words + list(sniah._VALUE_WORDS))


@pytest.mark.parametrize("needle", sniah.NEEDLES)
def test_haystack_kinds(needle):
  haystack, _, _ = _split(_rows(generate_sniah(_task(needle), 1, seed=2))[0])
  filler = re.sub(NEEDLE_PATTERNS[needle], "", haystack)
  if needle == "passkey":
    # The noise paragraph, repeated and cut.
    noise = " ".join(sniah._NOISE_SENTENCES) + " "
    assert (noise * 100).startswith(filler)
  else:
    words = re.findall(r"[a-z]+", filler.lower())
    vocabulary = {w for kind in sniah._WORDS.values() for w in kind}
    # Every word but the one cut at the end comes from the word list.
    assert set(words[:-1]) <= vocabulary


@pytest.mark.parametrize("needle", sniah.NEEDLES)
def test_fixed_depth(needle):
  for depth in (0.0, 0.5, 1.0):
    task = _task(needle, depth=depth)
    data = generate_sniah(task, 8, seed=3)
    for row in _rows(data):
      haystack, _, _ = _split(row)
      found = re.search(NEEDLE_PATTERNS[needle], haystack)
      filler_len = len(haystack) - (found.end() - found.start())
      if depth == 0.0:
        assert found.start() == 0
      elif depth == 1.0:
        # Only the last, cut sentence follows the needle.
        assert haystack[found.end() :].count(". ") == 0
      else:
        # The sentence start nearest to the middle.
        assert abs(found.start() - filler_len / 2) < 60
        assert haystack[found.start() - 2 : found.start()] == ". "


def test_uniform_depth_spreads_the_needle():
  task = _task("passkey")
  data = generate_sniah(task, 300, seed=4)
  depths = []
  for row in _rows(data):
    haystack, _, _ = _split(row)
    found = re.search(NEEDLE_PATTERNS["passkey"], haystack)
    depths.append(found.start() / (len(haystack) - (found.end() - found.start())))
  depths = np.array(depths)
  assert depths.min() < 0.05 and depths.max() > 0.8
  assert abs(depths.mean() - 0.5) < 0.1


@pytest.mark.parametrize("needle", sniah.NEEDLES)
def test_smallest_context(needle):
  task = SniahTask(needle=needle, context_length=1)
  task = dataclasses.replace(task, context_length=task.min_context_length)
  data = generate_sniah(task, 20, seed=5)
  for row in _rows(data):
    haystack, _, answer = _split(row)
    assert re.search(NEEDLE_PATTERNS[needle], haystack)
    assert answer
  with pytest.raises(ValueError, match="context_length"):
    shorter = dataclasses.replace(task, context_length=task.context_length - 1)
    generate_sniah(shorter, 1, seed=0)


def test_deterministic_per_seed():
  for needle in sniah.NEEDLES:
    task = _task(needle)
    a = generate_sniah(task, 20, seed=6)
    b = generate_sniah(task, 20, seed=6)
    c = generate_sniah(task, 20, seed=7)
    for name in ("inputs", "labels"):
      np.testing.assert_array_equal(a[name], b[name])
      assert not np.array_equal(a[name], c[name])


def test_zero_examples():
  data = generate_sniah(SniahTask(context_length=128), 0, seed=0)
  assert data["inputs"].shape == data["labels"].shape == (0, 128)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(needle="uuid"), "needle"),
        (dict(depth=1.5), "depth"),
        (dict(depth=float("nan")), "depth"),
        (dict(context_length=64), "context_length"),
        (dict(needle="number", context_length=128), "context_length"),
    ],
)
def test_impossible_tasks_raise(kwargs, field):
  task = SniahTask(**kwargs)
  with pytest.raises(ValueError, match=field):
    task.validate()
  with pytest.raises(ValueError, match=field):
    generate_sniah(task, 1, seed=0)


def test_negative_num_examples_raises():
  with pytest.raises(ValueError, match="num_examples"):
    generate_sniah(SniahTask(context_length=128), -1, seed=0)


def test_config_names_follow_parameters():
  task = SniahTask(context_length=256)
  names = {
      sniah_config(t, num_train=n, num_test=m, seed=s).name
      for t, n, m, s in [
          (task, 64, 16, 0),
          (dataclasses.replace(task, needle="word"), 64, 16, 0),
          (dataclasses.replace(task, context_length=512), 64, 16, 0),
          (dataclasses.replace(task, depth=0.5), 64, 16, 0),
          (dataclasses.replace(task, depth=1.0), 64, 16, 0),
          (task, 65, 16, 0),
          (task, 64, 17, 0),
          (task, 64, 16, 1),
      ]
  }
  assert len(names) == 8
  assert sniah_config(SniahTask(), num_train=20_000, num_test=500, seed=0).name == (
      "passkey_t1024_duniform_train20000_test500_s0")


@pytest.mark.parametrize("needle", ["passkey", "word"])
def test_tfds_round_trip(tmp_path, needle):
  task = SniahTask(needle=needle, context_length=320)
  sizes = {"train": 24, "test": 8}
  for split, size in sizes.items():
    source = load_sniah(task, split, data_dir=tmp_path, num_train=sizes["train"],
                        num_test=sizes["test"], seed=3)
    expected = generate_sniah(task, size, split_seed(3, split))
    assert len(source) == size
    for name in ("inputs", "labels"):
      got = np.stack([source[i][name] for i in range(size)])
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, expected[name])
  with pytest.raises(ValueError, match="split"):
    load_sniah(task, "validation", data_dir=tmp_path)


def test_tokenizer_round_trip():
  text = "Pass key: 71432 — naïve\n"
  tokens = tokenizer.encode(text)
  assert tokens.dtype == np.int32 and len(tokens) == len(text.encode("utf-8"))
  np.testing.assert_array_equal(tokens, tokenizer.encode(text.encode("utf-8")))
  assert tokenizer.decode(tokens) == text
  # Special ids are left out of the text.
  assert tokenizer.decode([tokenizer.BOS_ID, *tokens, tokenizer.PAD_ID]) == text
  with pytest.raises(ValueError, match="tokens"):
    tokenizer.decode([65, tokenizer.VOCAB_SIZE])
  with pytest.raises(ValueError, match="tokens"):
    tokenizer.decode([IGNORE_INDEX])
