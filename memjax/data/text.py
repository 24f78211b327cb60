"""Language modelling over a TFDS text dataset: byte tokens packed into windows.

The documents of a split are byte-tokenized (`memjax.data.tokenizer`), each
opened by BOS, and laid end to end as one token stream:

    stream:   BOS d0 d0 d0 BOS d1 d1 BOS d2 d2 d2 d2 d2 ...
    window 0: [---- seq_len + 1 ----]
    window 1:                       [---- seq_len + 1 ----]

Window i is stream[i * seq_len : (i + 1) * seq_len + 1]: `inputs` its first
seq_len tokens and `labels` its last seq_len, the next token of each input.
Laid side by side, the inputs of windows 0, 1, ... are the stream and their
labels the stream shifted by one: every token but the last is an input with a
label exactly once, and every token but the first is a label exactly once.
Documents run across windows and several share one window, with nothing
between them but the BOS; the model sees the previous document as context, as
is usual for packed pretraining. The last window is padded with PAD inputs and
IGNORE_INDEX labels where the stream ends; nothing else is padded.

The packing is fixed: window i holds the same tokens in every epoch, and an
epoch of `batched_dataset` is one pass over the same windows in a new order.
The stream does not wrap around: the end of the split is not joined to its
start, and the padded last window comes once per epoch like any other.

Item i is cheap: the start of every document in the stream is computed once,
when the source is made (one read of every document), and a window reads only
the documents it overlaps.

    train = load_text("tiny_shakespeare", "train", seq_len=256)
    train[0]  # {"inputs": int32 [256], "labels": int32 [256]}
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from memjax.data import tokenizer
from memjax.data.mqar import IGNORE_INDEX


class PackedText:
  """Documents of a random-access source packed into windows of tokens.

  Implements grain's `RandomAccessDataSource` protocol; see the module
  docstring for the packing.

  Args:
    documents: Random-access source of dicts; `documents[i][feature]` is the
      text of document i, a string or UTF-8 bytes (what a TFDS `Text` feature
      reads as).
    seq_len: Tokens per window T, the model's input length.
    feature: Name of the text feature.
  """

  def __init__(self, documents, seq_len: int, *, feature: str = "text"):
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}.")
    self._documents = documents
    self._feature = feature
    self._seq_len = seq_len
    # The last document read, so that windows of a long document (a book, or
    # a whole split in one record) do not read and decode it again each time.
    self._cached = (-1, b"")
    # starts[d] is the stream position of document d's BOS; starts[-1] is the
    # length of the stream.
    sizes = [1 + len(self._text(d)) for d in range(len(documents))]
    self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    if self._starts[-1] == len(documents):
      raise ValueError(
          f"documents must hold some text in feature {feature!r}, got "
          f"{len(documents)} documents and no bytes."
      )
    # Every window but the last ends where the next begins, one token on.
    self._length = -(-int(self._starts[-1] - 1) // seq_len)

  @property
  def num_tokens(self) -> int:
    """Length of the token stream: bytes of text plus one BOS per document."""
    return int(self._starts[-1])

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Returns window `index`: {"inputs": int32 [T], "labels": int32 [T]}."""
    if not 0 <= index < self._length:
      raise IndexError(f"index must be in [0, {self._length}), got {index}.")
    start = index * self._seq_len
    stop = min(start + self._seq_len + 1, self.num_tokens)
    window = np.full(self._seq_len + 1, tokenizer.PAD_ID, np.int32)
    # The documents that overlap [start, stop).
    first = int(np.searchsorted(self._starts, start, side="right")) - 1
    last = int(np.searchsorted(self._starts, stop, side="left"))
    for d in range(first, last):
      doc_start = int(self._starts[d])
      lo, hi = max(start, doc_start), min(stop, int(self._starts[d + 1]))
      if lo == doc_start:
        window[lo - start] = tokenizer.BOS_ID
        lo += 1
      # Stream position p of document d is byte p - doc_start - 1 of its text.
      text = self._text(d)[lo - doc_start - 1 : hi - doc_start - 1]
      window[lo - start : hi - start] = tokenizer.encode(text)
    labels = window[1:].copy()
    # Positions whose next token lies past the end of the stream.
    labels[stop - start - 1 :] = IGNORE_INDEX
    return {"inputs": window[:-1], "labels": labels}

  def __repr__(self) -> str:
    return (
        f"PackedText({len(self._documents)} documents, {self.num_tokens} tokens, "
        f"{self._length} windows of {self._seq_len})"
    )

  def _text(self, d: int) -> bytes:
    """The UTF-8 bytes of document d."""
    cached_d, text = self._cached
    if cached_d != d:
      example = self._documents[d]
      if self._feature not in example:
        raise ValueError(
            f"feature must name the text of the documents, got {self._feature!r}; "
            f"document {d} has features {sorted(example)}."
        )
      text = example[self._feature]
      if isinstance(text, str):
        text = text.encode("utf-8")
      self._cached = (d, text)
    return text


def load_text(
    name: str,
    split: str,
    *,
    seq_len: int,
    data_dir: str | os.PathLike | None = None,
    feature: str = "text",
) -> PackedText:
  """Returns the packed windows of a split of a TFDS text dataset.

  Reads the dataset through TFDS's array_record data source (random access,
  no TensorFlow). A dataset not built yet in `data_dir` is built there first
  by its TFDS builder, as array_record; some catalog builders need TensorFlow
  or a download to build, never to read.

  Args:
    name: TFDS name, e.g. "tiny_shakespeare" or "my_corpus/config:1.0.0".
    split: TFDS split, slices included, e.g. "train" or "validation[:1000]".
    seq_len: Tokens per window T.
    data_dir: TFDS data directory; None for the TFDS default.
    feature: Name of the text feature.

  Returns:
    A `PackedText`: `source[i]` is {"inputs": int32 [T], "labels": int32 [T]}.
  """
  documents = tfds.data_source(
      name,
      split=split,
      data_dir=data_dir,
      # tfds.data_source picks array_record by itself only without a data_dir.
      builder_kwargs={"file_format": "array_record"},
  )
  return PackedText(documents, seq_len, feature=feature)
