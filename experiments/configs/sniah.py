r"""Single needle-in-a-haystack (RULER S-NIAH) with a gated-delta-rule DecoderLM.

Each example is `data.seq_len` byte tokens: a haystack with one needle, then a
question whose answer, the needle's value, ends the example; the model is
trained and scored on the answer tokens only (see memjax/data/sniah.py).
`eval/exact_match` is the RULER score: the fraction of held-out examples whose
whole value is predicted right. Variants: the default is a 1024-token context
with the "passkey" needle (not measured as is; RESULTS.md scores 4-layer
d_model-256 models); `tiny` is a few steps of a tiny model on 128-token
contexts, for tests. From the repo root:

  python experiments/train.py --config=experiments/configs/sniah.py \
      --workdir=/tmp/memjax/sniah
  python experiments/train.py --config=experiments/configs/sniah.py \
      --config.data.needle=number --workdir=/tmp/memjax/sniah_number
  python experiments/train.py --config=experiments/configs/sniah.py \
      --config.data.needle=word --config.data.seq_len=4096 \
      --config.data.depth=0.5 --workdir=/tmp/memjax/sniah_word_4k
  python experiments/train.py --config=experiments/configs/sniah.py:tiny \
      --workdir=/tmp/memjax/sniah_tiny

The Titans LMM with its MLP memory (`--config.model.mixers=lmm,lmm,lmm,lmm`) learnt the
passkey only at `--config.train.learning_rate=5e-4` (RESULTS.md: 1e-3 and 3e-4 stayed on
the ln 10 plateau for 3,000 steps), and at that rate the word needle with
`--config.train.num_steps=5000` (not in 3,000 steps), but not the number needle even in
5,000; Gated DeltaNet and the linear-memory LMM learnt the passkey at the default 1e-3.

Any field can be overridden as `--config.<section>.<field>=<value>`. The
dataset is built once per set of data parameters under `data.data_dir`
(default `<workdir>/tfds`). Rerunning a command with the same --workdir
resumes from its newest checkpoint.
"""

import ml_collections
from ml_collections import config_dict

from memjax.data import tokenizer
from memjax.nn import titans

_VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of one variant.

  Args:
    arg: "default" (also None or "") or "tiny".

  Returns:
    The ConfigDict with sections `model`, `data` and `train`, and the fields
    `mesh` and `sharding_rules`.
  """
  variant = arg or "default"
  if variant not in _VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; expected one of {_VARIANTS}.")

  def pick(default, tiny):
    return {"default": default, "tiny": tiny}[variant]

  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(
      dict(
          # Byte tokens and the special ids of memjax.data.tokenizer.
          vocab_size=tokenizer.VOCAB_SIZE,
          d_model=pick(128, 32),
          mixers=pick("gdn,gdn", "gdn"),
          ffns="mlp",
          num_heads=2,
          mlp_ratio=2.0,
          tie_embeddings=True,
          chunk_size=pick(64, 16),
          scan_layers=True,
          # "reference" | "xla" | "pallas"; None picks the fastest available.
          implementation=config_dict.placeholder(str),
          # Span of "swa" (sliding-window attention) layers; None for other mixers.
          attention_window=config_dict.placeholder(int),
          # Ceiling of the Titans memories' inner learning rate theta (lmm, titans_*).
          memory_learning_rate=titans.DEFAULT_MAX_LEARNING_RATE,
      )
  )
  config.data = ml_collections.ConfigDict(
      dict(
          task="sniah",
          # "passkey" | "number" | "word".
          needle="passkey",
          # The context length: tokens per example (SniahTask.context_length),
          # named as in every task's config.
          seq_len=pick(1024, 128),
          # Needle depth as a fraction of the haystack; None draws a uniform
          # depth for each example.
          depth=config_dict.placeholder(float),
          num_train=pick(20_000, 64),
          num_test=pick(500, 16),
          data_seed=0,
          # "tfds": built once under data_dir; "numpy": generated in memory.
          source="tfds",
          # None means <workdir>/tfds.
          data_dir=config_dict.placeholder(str),
      )
  )
  config.train = ml_collections.ConfigDict(
      dict(
          batch_size=pick(16, 8),
          num_steps=pick(2_000, 4),
          # Cosine horizon; None means num_steps.
          decay_steps=config_dict.placeholder(int),
          learning_rate=pick(1e-3, 3e-3),
          warmup_steps=pick(100, 1),
          weight_decay=0.1,
          grad_clip=1.0,
          # "float32", or "bfloat16": the model computes on a bfloat16 copy of the
          # float32 params (mixed precision; the memory ops then take bf16 inputs).
          compute_dtype="float32",
          seed=0,
          log_every=pick(100, 2),
          eval_every=pick(500, 4),
          checkpoint_every=pick(500, 4),
          keep_checkpoints=3,
      )
  )
  # The device mesh: size by axis of memjax.sharding.MESH_AXES; -1 takes the devices
  # the other axes leave. The default puts every device on "data" (data parallel).
  # Every axis is listed so that each can be set from the command line, e.g.
  # --config.mesh.data=2 --config.mesh.fsdp=4 (FSDP: weights split along "embed") or
  # --config.mesh.model=2 (tensor parallel: heads and MLP units split). train.batch_size
  # must be divisible by data * fsdp.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, seq=1))
  # (logical axis, mesh axes) pairs overriding memjax.sharding.DEFAULT_RULES, e.g.
  # (("memory_slots", None),) keeps product-key value tables whole on every device.
  config.sharding_rules = ()
  return config
