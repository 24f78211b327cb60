"""Byte-level tokenizer: a token is one byte of UTF-8 text, or a special id.

Ids 0-255 are the bytes themselves, so any text encodes without a vocabulary
file and decodes back exactly; the special ids follow them:

    PAD_ID = 256   fills the unused end of a packed sequence
    BOS_ID = 257   opens every document (and every S-NIAH example)

    encode("Hi")          # int32 [72, 105]
    decode([BOS_ID, 72, 105])  # "Hi"
"""

from collections.abc import Iterable

import numpy as np

PAD_ID = 256
BOS_ID = 257
# Number of token ids; a model must embed at least this many.
VOCAB_SIZE = 258


def encode(text: str | bytes) -> np.ndarray:
  """Returns the tokens of a text.

  Args:
    text: A string, encoded as UTF-8, or bytes, taken as they are (TFDS text
      features read as UTF-8 bytes).

  Returns:
    int32 [number of bytes].
  """
  if isinstance(text, str):
    text = text.encode("utf-8")
  return np.frombuffer(text, np.uint8).astype(np.int32)


def decode(tokens: Iterable[int]) -> str:
  """Returns the text of tokens, leaving out the special ids.

  Args:
    tokens: Token ids in [0, VOCAB_SIZE), e.g. a row of a batch.

  Returns:
    The UTF-8 text of the byte tokens; a byte sequence that is not UTF-8 (a
    character cut at the edge of a sequence) becomes U+FFFD.

  Raises:
    ValueError: if a token is outside [0, VOCAB_SIZE).
  """
  tokens = np.asarray(tokens).ravel()
  bad = (tokens < 0) | (tokens >= VOCAB_SIZE)
  if bad.any():
    raise ValueError(
        f"tokens must be in [0, {VOCAB_SIZE}), got {tokens[bad][0]} at index "
        f"{np.flatnonzero(bad)[0]}."
    )
  return bytes(tokens[tokens < 256].astype(np.uint8)).decode("utf-8", errors="replace")
