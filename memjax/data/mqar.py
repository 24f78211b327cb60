"""Multi-query associative recall (MQAR) examples, generated with numpy.

MQAR is the recall task of Zoology (Arora et al. 2023, arXiv 2312.04927). An
example opens with `num_kv_pairs` key-value pairs and then queries every key
once; the model must emit the value bound to each key right after seeing it:

    position:  0   1   2   3   4   5   6   7   8   9  10  11
    inputs:    k1  v1  k2  v2  .   .   k2  .   .   .   k1  .
    labels:    -   -   -   -   -   -   v2  -   -   -   v1  -

Token 0 is the filler (".") and `-` is `IGNORE_INDEX`. Keys come from
`[1, vocab_size // 2)` and values from `[vocab_size // 2, vocab_size)`. The
distance of a query from the context follows a power law, so that, as with
repeated bigrams in text, near queries are more likely than far ones.
"""

import dataclasses

import numpy as np

IGNORE_INDEX = -100

# Token that fills non-query positions before `random_non_queries` replaces it.
_FILLER = 0

# Examples are generated in blocks of about this many tokens to bound the size
# of the temporaries (the power-law sampling holds a float per query slot).
# The block size fixes the order of the random draws: changing it changes the
# examples of every seed, and so the version of the TFDS dataset.
_BLOCK_TOKENS = 1 << 22


@dataclasses.dataclass(frozen=True)
class MqarTask:
  """The parameters of an MQAR task.

  Attributes:
    vocab_size: Number of token ids. The lower half (minus token 0) holds the
      keys, the upper half the values.
    seq_len: Length of the model's input (and label) sequence.
    num_kv_pairs: Key-value pairs per example; each key is queried once.
    power_a: Exponent of the power law over query offsets; 1.0 is uniform,
      small values favour queries close to the context.
    random_non_queries: Replace the filler tokens of the inputs by tokens drawn
      uniformly from the whole vocabulary.
  """

  vocab_size: int = 8192
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  random_non_queries: bool = True

  @property
  def context_len(self) -> int:
    """Number of leading positions that hold the key-value pairs."""
    return 2 * self.num_kv_pairs

  @property
  def num_query_slots(self) -> int:
    """Number of even offsets after the context where a query may sit."""
    return (self.seq_len - self.context_len) // 2

  def validate(self) -> None:
    """Raises ValueError if no example of this task can exist."""
    if self.num_kv_pairs < 1:
      raise ValueError(f"num_kv_pairs must be >= 1, got {self.num_kv_pairs}.")
    num_keys = self.vocab_size // 2 - 1
    if num_keys < self.num_kv_pairs:
      raise ValueError(
          f"vocab_size={self.vocab_size} leaves {max(num_keys, 0)} key tokens "
          f"in [1, vocab_size // 2) but num_kv_pairs={self.num_kv_pairs} "
          f"distinct keys are needed; use vocab_size >= "
          f"{2 * (self.num_kv_pairs + 1)}."
      )
    if self.num_query_slots < self.num_kv_pairs:
      raise ValueError(
          f"seq_len={self.seq_len} is too short for num_kv_pairs="
          f"{self.num_kv_pairs}: the context and the queries need seq_len >= "
          f"4 * num_kv_pairs = {4 * self.num_kv_pairs}."
      )
    if not (np.isfinite(self.power_a) and self.power_a > 0):
      raise ValueError(f"power_a must be finite and > 0, got {self.power_a}.")


def generate_mqar(
    task: MqarTask, num_examples: int, seed: int
) -> dict[str, np.ndarray]:
  """Generates MQAR examples.

  The same (task, num_examples, seed) always gives the same arrays.

  Args:
    task: The task parameters; validated first.
    num_examples: Number of examples N.
    seed: Seed of `np.random.default_rng`.

  Returns:
    {"inputs": int32 [N, seq_len], "labels": int32 [N, seq_len]}. `labels` is
    `IGNORE_INDEX` except where `inputs` holds a query key, where it is the
    value bound to that key in the context.

  Raises:
    ValueError: if the task is impossible or num_examples is negative.
  """
  task.validate()
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
  rng = np.random.default_rng(seed)
  inputs = np.empty((num_examples, task.seq_len), np.int32)
  labels = np.empty((num_examples, task.seq_len), np.int32)
  block = max(1, _BLOCK_TOKENS // task.seq_len)
  for start in range(0, num_examples, block):
    stop = min(start + block, num_examples)
    _fill_block(task, inputs[start:stop], labels[start:stop], rng)
  return {"inputs": inputs, "labels": labels}


def _fill_block(
    task: MqarTask, inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> None:
  """Writes examples into `inputs` and `labels` (int32 [n, seq_len]) in place."""
  n = inputs.shape[0]
  kv = task.num_kv_pairs
  half = task.vocab_size // 2
  keys = 1 + _sample_distinct(rng, n, half - 1, kv)
  values = half + _sample_distinct(rng, n, task.vocab_size - half, kv)
  slots = _sample_power_law(rng, n, task.num_query_slots, kv, task.power_a)

  inputs[:] = _FILLER
  inputs[:, 0 : task.context_len : 2] = keys
  inputs[:, 1 : task.context_len : 2] = values
  # Queries sit on even offsets after the context, so the position after a
  # query, where the answer belongs, never holds another query.
  query_pos = task.context_len + 2 * slots
  rows = np.arange(n)[:, None]
  inputs[rows, query_pos] = keys

  # The target at a position is the next token of the example; after a query
  # key that next token is its value, everywhere else nothing is learnable.
  labels[:] = IGNORE_INDEX
  labels[rows, query_pos] = values

  if task.random_non_queries:
    filler = inputs == _FILLER
    inputs[filler] = rng.integers(
        0, task.vocab_size, size=int(filler.sum()), dtype=np.int32
    )


def _sample_distinct(
    rng: np.random.Generator, n: int, population: int, k: int
) -> np.ndarray:
  """Draws k distinct ints from [0, population) per row, in uniform order.

  Floyd's algorithm, vectorised over rows: its cost grows with k**2 rather
  than with the population (half the vocabulary).

  Args:
    rng: Random generator.
    n: Number of rows.
    population: Size of the range to draw from; >= k.
    k: Draws per row.

  Returns:
    int64 [n, k].
  """
  out = np.empty((n, k), np.int64)
  for i, top in enumerate(range(population - k, population)):
    draw = rng.integers(0, top + 1, size=n)
    taken = (out[:, :i] == draw[:, None]).any(axis=1)
    out[:, i] = np.where(taken, top, draw)
  # Floyd's algorithm gives a uniform set but not a uniform order.
  return rng.permuted(out, axis=1)


def _sample_power_law(
    rng: np.random.Generator, n: int, num_slots: int, k: int, power_a: float
) -> np.ndarray:
  """Draws k distinct slots per row with P(slot i) ~ a * (i + 1)**(a - 1).

  Sampling is successive, without replacement (each draw renormalises over
  the slots left), done for all rows at once by the exponential-race method
  of Efraimidis and Spirakis: the k largest of log(u) / weight, in descending
  order, are distributed as k successive weighted draws.

  Args:
    rng: Random generator.
    n: Number of rows.
    num_slots: Number of slots; >= k.
    k: Draws per row.
    power_a: Power-law exponent a > 0.

  Returns:
    int64 [n, k]; column j is the j-th draw.
  """
  weights = power_a * np.arange(1, num_slots + 1) ** (power_a - 1.0)
  # 1 - random() lies in (0, 1], so the log is finite.
  race = np.log1p(-rng.random((n, num_slots))) / weights
  top = np.argpartition(-race, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(race, top, axis=1), axis=1)
  return np.take_along_axis(top, order, axis=1)
