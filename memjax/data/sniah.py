"""Single needle-in-a-haystack (S-NIAH) examples, generated with numpy.

The S-NIAH tasks of RULER (Hsieh et al. 2024, arXiv 2404.06654): one needle
sentence that binds a value is hidden at some depth of a long filler text, and
a question at the end asks for the value. Text is tokenized by bytes
(`memjax.data.tokenizer`), and an example is exactly `context_length` tokens:

    BOS  filler ... needle ... filler  \\n question  answer

for example, with the "passkey" needle,

    <BOS>The grass is green. The sky is blue. ... The pass key is 71432.
    Remember it. 71432 is the pass key. The sun is yellow. Here we go. Th
    What is the pass key? The pass key is 71432

The filler is cut (mid-sentence, at its end) so that the example fills the
context exactly. As in MQAR, `labels[t]` is the target of the prediction made
at position t, the token at t + 1, and is set only where that token belongs to
the answer: the model is scored on the answer alone.

Needles and their haystacks:
  "passkey": "The pass key is {value}. ..." (a 5-digit number) in one
    paragraph of five plain sentences repeated (the noise haystack of RULER).
  "number": "One of the special magic numbers for {key} is: {value}." (a
    7-digit number; the key is an adjective-noun pair such as "quiet-river")
    in an essay-like text of random sentences built from a word list.
  "word": as "number", with a word for the value.

No value occurs anywhere in the filler, the keys or the question: digits
occur only in number values, and no value word is part of any other word the
generator writes. So the value occurs in the example only inside the needle
and as the answer.
"""

import dataclasses

import numpy as np

from memjax.data import tokenizer
from memjax.data.mqar import IGNORE_INDEX

NEEDLES = ("passkey", "number", "word")

# Digits of the numeric values, by needle.
_DIGITS = {"passkey": 5, "number": 7}

_NEEDLE_TEMPLATES = {
    "passkey": "The pass key is {value}. Remember it. {value} is the pass key.",
    "number": "One of the special magic numbers for {key} is: {value}.",
    "word": "One of the special magic words for {key} is: {value}.",
}
_QUESTION_TEMPLATES = {
    "passkey": "What is the pass key? The pass key is ",
    "number": (
        "What is the special magic number for {key} mentioned in the provided "
        "text? The special magic number for {key} mentioned in the provided "
        "text is "
    ),
    "word": (
        "What is the special magic word for {key} mentioned in the provided "
        "text? The special magic word for {key} mentioned in the provided text "
        "is "
    ),
}

# The haystack of "passkey", repeated sentence by sentence.
_NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# The words of the essay-like haystack; keys are adjective-noun pairs of them.
_WORDS = {
    "det": ("the", "every", "each", "that", "this", "one"),
    "adj": (
        "quiet", "narrow", "bright", "ancient", "gentle", "heavy", "distant",
        "simple", "crowded", "silent", "golden", "patient", "careful",
        "sudden", "hidden", "empty", "modern", "humble", "steady", "honest",
        "curious", "famous", "fragile", "frozen", "hollow", "lively",
        "polished", "rapid", "rural", "sincere", "slender", "sturdy",
        "tender", "vivid", "weary", "wooden", "clever", "rusty", "noble",
    ),
    "noun": (
        "river", "road", "garden", "city", "teacher", "village", "market",
        "letter", "window", "mountain", "farmer", "bridge", "library",
        "engine", "harbor", "forest", "student", "painter", "castle",
        "kitchen", "island", "valley", "sailor", "doctor", "museum",
        "station", "orchard", "meadow", "tower", "merchant", "poet",
        "factory", "school", "desert", "candle", "basket", "ladder",
        "mirror", "lamp", "train", "ship", "bell", "field", "child",
        "neighbor", "baker", "clock", "fence", "journey", "story",
    ),
    "verb": (
        "follows", "builds", "carries", "watches", "finds", "remembers",
        "paints", "visits", "crosses", "guards", "repairs", "describes",
        "opens", "reaches", "admires", "gathers", "questions", "welcomes",
        "imagines", "measures", "shapes", "borrows", "protects", "explains",
        "passes", "studies", "chooses", "enters", "joins", "notices",
        "leaves", "covers", "praises", "divides", "forgets",
    ),
    "prep": (
        "near", "across", "beyond", "under", "behind", "along", "toward",
        "around", "through", "beside", "above", "below", "past", "within",
    ),
    "adv": (
        "slowly", "often", "rarely", "quietly", "always", "sometimes",
        "gladly", "seldom", "eagerly", "calmly", "never", "usually",
        "gently", "boldly", "patiently",
    ),
}
_SENTENCE_PATTERNS = (
    ("det", "adj", "noun", "verb", "det", "noun"),
    ("det", "noun", "verb", "det", "adj", "noun", "prep", "det", "noun"),
    ("det", "adj", "noun", "adv", "verb", "det", "noun"),
    ("det", "noun", "prep", "det", "noun", "adv", "verb", "det", "adj", "noun"),
)
# Values of "word" needles. None is part of a word above, of a template or of
# a noise sentence (tests/data/test_sniah.py checks this), so a value occurs in
# an example only where the needle and the answer put it.
_VALUE_WORDS = (
    "walrus", "quokka", "saffron", "zeppelin", "marmalade", "harpsichord",
    "nebula", "obsidian", "kumquat", "tambourine", "pelican", "cobalt",
    "lagoon", "mosaic", "juniper", "origami", "falcon", "tundra", "vortex",
    "sequoia", "glacier", "banjo", "hazelnut", "igloo", "jasmine", "kestrel",
    "lynx", "meteor", "nutmeg", "papyrus", "quartz", "raven", "sphinx",
    "toucan", "umbrella", "velvet", "wombat", "zephyr", "cactus", "mango",
    "pretzel", "turquoise", "anchovy", "bamboo", "caravan", "dolphin",
    "emerald", "flamingo", "gazelle", "hammock", "iceberg", "jellyfish",
    "koala", "lemonade", "mandolin", "narwhal", "octopus", "parsnip",
    "rhubarb", "sardine", "tulip", "vanilla", "waffle", "zucchini",
)

# The separator between the haystack and the question.
_QUESTION_PREFIX = "\n"
# Every sentence of the haystack, the needle's included, ends with this.
_SENTENCE_END = " "
# An upper bound on the sentences an essay filler of n bytes needs is
# n // _MIN_ESSAY_SENTENCE + 1: every sentence takes at least this many bytes.
_MIN_ESSAY_SENTENCE = min(
    sum(min(len(w) for w in _WORDS[kind]) + 1 for kind in pattern) + 1
    for pattern in _SENTENCE_PATTERNS
)


@dataclasses.dataclass(frozen=True)
class SniahTask:
  """The parameters of an S-NIAH task.

  Attributes:
    needle: "passkey", "number" or "word"; see the module docstring.
    context_length: Tokens per example, the model's input length: BOS,
      haystack with the needle, question and answer.
    depth: Where the needle sits, as a fraction of the filler: 0.0 before the
      first sentence, 1.0 after the last whole one (before the sentence cut
      to fit, if any); the needle goes to the sentence boundary nearest to
      `depth` times the filler length. None draws a uniform depth for each
      example.
  """

  needle: str = "passkey"
  context_length: int = 1024
  depth: float | None = None

  @property
  def min_context_length(self) -> int:
    """The shortest context that holds BOS, the longest needle, question and answer."""
    key = "-".join(max(_WORDS[kind], key=len) for kind in ("adj", "noun"))
    if self.needle == "word":
      value = max(_VALUE_WORDS, key=len)
    else:
      value = "9" * _DIGITS[self.needle]
    return 1 + sum(len(part) for part in _parts(self.needle, key, value))

  def validate(self) -> None:
    """Raises ValueError if no example of this task can exist."""
    if self.needle not in NEEDLES:
      raise ValueError(f"needle must be one of {NEEDLES}, got {self.needle!r}.")
    if self.depth is not None and not (
        np.isfinite(self.depth) and 0.0 <= self.depth <= 1.0
    ):
      raise ValueError(f"depth must be None or in [0, 1], got {self.depth}.")
    if self.context_length < self.min_context_length:
      raise ValueError(
          f"context_length={self.context_length} is too short for the "
          f"{self.needle!r} needle: BOS, the needle, the question and the answer "
          f"need context_length >= {self.min_context_length}."
      )


def generate_sniah(
    task: SniahTask, num_examples: int, seed: int
) -> dict[str, np.ndarray]:
  """Generates S-NIAH examples.

  The same (task, num_examples, seed) always gives the same arrays.

  Args:
    task: The task parameters; validated first.
    num_examples: Number of examples N.
    seed: Seed of `np.random.default_rng`.

  Returns:
    {"inputs": int32 [N, context_length], "labels": int32 [N, context_length]}.
    The answer (the needle's value) fills the last n positions of `inputs`, n
    the length of its bytes; `labels` holds it at the n positions before them
    (the predictions of the answer's tokens) and is `IGNORE_INDEX` elsewhere.

  Raises:
    ValueError: if the task is impossible or num_examples is negative.
  """
  task.validate()
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
  rng = np.random.default_rng(seed)
  length = task.context_length
  inputs = np.empty((num_examples, length), np.int32)
  labels = np.full((num_examples, length), IGNORE_INDEX, np.int32)
  for i in range(num_examples):
    num_answer = _fill_example(task, inputs[i], rng)
    labels[i, length - 1 - num_answer : length - 1] = inputs[i, length - num_answer :]
  return {"inputs": inputs, "labels": labels}


def _parts(needle: str, key: str, value: str) -> tuple[str, str, str]:
  """Returns the texts of the needle sentence, the question and the answer."""
  return (
      _NEEDLE_TEMPLATES[needle].format(key=key, value=value) + _SENTENCE_END,
      _QUESTION_PREFIX + _QUESTION_TEMPLATES[needle].format(key=key),
      value,
  )


def _fill_example(task: SniahTask, inputs: np.ndarray, rng: np.random.Generator) -> int:
  """Writes one example into `inputs` in place.

  Args:
    task: The task, validated.
    inputs: int32 [context_length], the example's row.
    rng: Random generator; draws the key, value, depth and filler in turn.

  Returns:
    The number of answer tokens, which end the example.
  """
  # The passkey needle has no key.
  key = ""
  if task.needle != "passkey":
    key = "-".join(
        _WORDS[kind][rng.integers(len(_WORDS[kind]))] for kind in ("adj", "noun")
    )
  if task.needle == "word":
    value = _VALUE_WORDS[rng.integers(len(_VALUE_WORDS))]
  else:
    digits = _DIGITS[task.needle]
    value = str(rng.integers(10 ** (digits - 1), 10**digits))
  needle, question, answer = _parts(task.needle, key, value)
  depth = rng.random() if task.depth is None else task.depth

  filler_len = task.context_length - 1 - len(needle) - len(question) - len(answer)
  if task.needle == "passkey":
    sentences = _noise_sentences(filler_len)
  else:
    sentences = _essay_sentences(filler_len, rng)
  filler = "".join(sentences)[:filler_len]
  # The needle goes between whole sentences: at a sentence start, or at the
  # end of the filler if that is the end of a sentence. So it never follows
  # the cut end of a sentence.
  bounds = np.cumsum([0] + [len(s) for s in sentences])
  bounds = bounds[bounds <= filler_len]
  at = int(bounds[np.argmin(np.abs(bounds - depth * filler_len))])

  text = filler[:at] + needle + filler[at:] + question + answer
  inputs[0] = tokenizer.BOS_ID
  inputs[1:] = tokenizer.encode(text)
  return len(answer)


def _noise_sentences(num_bytes: int) -> list[str]:
  """The noise sentences, repeated until they hold at least num_bytes bytes."""
  sentences, total = [], 0
  while total < num_bytes or not sentences:
    sentence = _NOISE_SENTENCES[len(sentences) % len(_NOISE_SENTENCES)] + _SENTENCE_END
    sentences.append(sentence)
    total += len(sentence)
  return sentences


def _essay_sentences(num_bytes: int, rng: np.random.Generator) -> list[str]:
  """Random sentences of the word list, at least num_bytes bytes of them.

  The words of all the sentences that may be needed are drawn at once, so the
  number of draws depends on num_bytes only.
  """
  count = num_bytes // _MIN_ESSAY_SENTENCE + 1
  patterns = rng.integers(len(_SENTENCE_PATTERNS), size=count)
  choices = rng.random((count, max(len(p) for p in _SENTENCE_PATTERNS)))
  sentences, total = [], 0
  for pattern, row in zip(patterns, choices):
    if total >= num_bytes and sentences:
      break
    kinds = _SENTENCE_PATTERNS[pattern]
    words = [_WORDS[kind][int(u * len(_WORDS[kind]))] for kind, u in zip(kinds, row)]
    sentence = " ".join(words).capitalize() + "." + _SENTENCE_END
    sentences.append(sentence)
    total += len(sentence)
  return sentences
