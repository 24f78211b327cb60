"""Tests of the packed text source, on a tiny TFDS text dataset built locally."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from memjax.data import IGNORE_INDEX
from memjax.data import PackedText
from memjax.data import batched_dataset
from memjax.data import eval_batches
from memjax.data import load_text
from memjax.data import tokenizer

# Documents of every size that matters: empty, shorter and longer than a
# window, and characters of several bytes.
DOCUMENTS = {
    "train": [
        "The first document.",
        "",
        "Short.",
        "A much longer document that runs over several windows of the packed "
        "stream, so that windows start and stop inside it. " * 3,
        "Naïve café — ünïcödé bytes.",
        "x",
        "The last one\nhas two lines.",
    ],
    "test": ["Held-out text.", "And a second held-out document, a little longer."],
}


class TinyText(tfds.core.GeneratorBasedBuilder):
  """`DOCUMENTS` as a TFDS dataset with a "text" feature, built without a download."""

  VERSION = tfds.core.Version("1.0.0")
  # No download; see memjax.data.mqar_tfds.MqarDataset.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in DOCUMENTS}

  def _generate_examples(self, split):
    for i, text in enumerate(DOCUMENTS[split]):
      yield i, {"text": text}


def build_tiny_text(data_dir) -> str:
  """Builds `TinyText` as array_record in data_dir; returns its TFDS name."""
  TinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return TinyText.name


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  build_tiny_text(data_dir)
  return data_dir


def _stream(texts):
  """The token stream of documents: each one's BOS and bytes."""
  return np.concatenate(
      [np.concatenate([[tokenizer.BOS_ID], tokenizer.encode(t)]) for t in texts]
  ).astype(np.int32)


def _in_memory(split, seq_len):
  return PackedText([{"text": t} for t in DOCUMENTS[split]], seq_len)


# The train stream has 449 tokens: 448 labels fill whole windows of 1 and 32
# and leave the last window of 5 and 1000 padded.
@pytest.mark.parametrize("seq_len", [1, 5, 32, 1000])
def test_windows_cover_the_stream_once(seq_len):
  source = _in_memory("train", seq_len)
  stream = _stream(DOCUMENTS["train"])
  assert source.num_tokens == len(stream) == 449
  assert len(source) == -(-(len(stream) - 1) // seq_len)
  windows = [source[i] for i in range(len(source))]
  for w in windows:
    assert w["inputs"].shape == w["labels"].shape == (seq_len,)
    assert w["inputs"].dtype == w["labels"].dtype == np.int32
  inputs = np.concatenate([w["inputs"] for w in windows])
  labels = np.concatenate([w["labels"] for w in windows])
  # Side by side, the inputs are the stream and the labels the stream shifted
  # by one: no token is lost or repeated. Only the end of the last window is
  # padding.
  np.testing.assert_array_equal(inputs[: len(stream) - 1], stream[:-1])
  np.testing.assert_array_equal(labels[: len(stream) - 1], stream[1:])
  if len(inputs) >= len(stream):
    # A padded last window also holds the last token, as an input without label.
    assert inputs[len(stream) - 1] == stream[-1]
  assert (inputs[len(stream) :] == tokenizer.PAD_ID).all()
  assert (labels[len(stream) - 1 :] == IGNORE_INDEX).all()
  assert len(inputs) - len(stream) < seq_len
  # Documents are separated by BOS, one per document, nothing else.
  assert (inputs == tokenizer.BOS_ID).sum() == len(DOCUMENTS["train"])
  # Within each window the labels are the next inputs.
  for w in windows:
    np.testing.assert_array_equal(
        w["labels"][:-1][w["labels"][:-1] != IGNORE_INDEX],
        w["inputs"][1:][w["labels"][:-1] != IGNORE_INDEX],
    )


def test_random_access_in_any_order():
  source = _in_memory("train", 16)
  forward = [source[i] for i in range(len(source))]
  for i in reversed(range(len(source))):
    for name in ("inputs", "labels"):
      np.testing.assert_array_equal(source[i][name], forward[i][name])


def test_tfds_source_matches_the_documents(data_dir):
  for split in DOCUMENTS:
    source = load_text(TinyText.name, split, seq_len=16, data_dir=data_dir)
    expected = _in_memory(split, 16)
    assert len(source) == len(expected)
    for i in range(len(source)):
      for name in ("inputs", "labels"):
        np.testing.assert_array_equal(source[i][name], expected[i][name])


def test_slices_of_a_split(data_dir):
  source = load_text(TinyText.name, "train[2:4]", seq_len=16, data_dir=data_dir)
  assert source.num_tokens == len(_stream(DOCUMENTS["train"][2:4]))


def test_epochs_see_the_same_windows_in_new_orders(data_dir):
  source = load_text(TinyText.name, "train", seq_len=12, data_dir=data_dir)
  n = len(source)
  assert (source[n - 1]["labels"] == IGNORE_INDEX).any()
  windows = [tuple(source[i]["inputs"]) + tuple(source[i]["labels"]) for i in range(n)]
  ds = batched_dataset(source, 4, seed=0)
  stream = [
      tuple(inputs) + tuple(labels)
      for step in range(-(-3 * n // 4))
      for inputs, labels in zip(ds[step]["inputs"], ds[step]["labels"])
  ]
  epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
  for epoch in epochs:
    # Each window once, the padded last one included; none is cut differently.
    assert sorted(epoch) == sorted(windows)
  assert epochs[0] != epochs[1]


def test_eval_batches_of_windows():
  source = _in_memory("test", 8)
  batches = list(eval_batches(source, 4))
  labels = np.concatenate([b["labels"] for b in batches])
  np.testing.assert_array_equal(
      labels[labels != IGNORE_INDEX], _stream(DOCUMENTS["test"])[1:]
  )


def test_bad_arguments(data_dir):
  with pytest.raises(ValueError, match="seq_len"):
    _in_memory("train", 0)
  with pytest.raises(ValueError, match="documents"):
    PackedText([{"text": ""}, {"text": b""}], 8)
  with pytest.raises(ValueError, match="documents"):
    PackedText([], 8)
  with pytest.raises(ValueError, match="feature"):
    load_text(TinyText.name, "train", seq_len=8, data_dir=data_dir, feature="body")
  source = _in_memory("train", 8)
  for index in (-1, len(source)):
    with pytest.raises(IndexError, match="index"):
      source[index]
