r"""Byte-level language modelling on TFDS text with a gated-delta-rule DecoderLM.

The documents of `data.dataset` are byte-tokenized, joined with BOS and packed
into windows of `data.seq_len` tokens (see memjax/data/text.py); the loss is
next-byte cross-entropy over every token. The dataset is read through TFDS's
array_record data source and built on first use under `data.data_dir` (None:
the TFDS default, usually ~/tensorflow_datasets), as array_record. Some catalog
builders need TensorFlow and a download to build, tiny_shakespeare among
them; reading needs neither. Variants: the default (tiny_shakespeare,
256-token windows; loss not yet measured); `tiny` is a few steps of a tiny
model, for tests. From the repo root:

  python experiments/train.py --config=experiments/configs/lm.py \
      --workdir=/tmp/memjax/lm
  python experiments/train.py --config=experiments/configs/lm.py \
      --config.data.dataset=my_corpus --config.data.data_dir=/data/tfds \
      --config.data.eval_split="validation[:1000]" --workdir=/tmp/memjax/lm_corpus
  python experiments/train.py --config=experiments/configs/lm.py:tiny \
      --config.data.dataset=my_corpus --config.data.data_dir=/data/tfds \
      --workdir=/tmp/memjax/lm_tiny

Any field can be overridden as `--config.<section>.<field>=<value>`; a dataset
whose text feature is not "text" needs `--config.data.feature=<name>`. The
loss is in nats per byte (divide by ln 2 for bits per byte). Rerunning a
command with the same --workdir resumes from its newest checkpoint.
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
          d_model=pick(256, 32),
          mixers=pick("gdn,gdn,gdn,gdn", "gdn"),
          ffns="mlp",
          num_heads=pick(4, 2),
          mlp_ratio=pick(4.0, 2.0),
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
          task="lm",
          # A TFDS name, optionally with config and version ("name/config:1.0.0").
          dataset="tiny_shakespeare",
          # TFDS splits; slices such as "validation[:1000]" bound the eval cost.
          train_split="train",
          eval_split="validation",
          # The feature that holds the text of a document.
          feature="text",
          seq_len=pick(256, 32),
          # None means the TFDS default data directory.
          data_dir=config_dict.placeholder(str),
      )
  )
  config.train = ml_collections.ConfigDict(
      dict(
          batch_size=pick(32, 8),
          num_steps=pick(5_000, 4),
          # Cosine horizon; None means num_steps.
          decay_steps=config_dict.placeholder(int),
          learning_rate=pick(1e-3, 3e-3),
          warmup_steps=pick(200, 1),
          weight_decay=0.1,
          grad_clip=1.0,
          # "float32", or "bfloat16": the model computes on a bfloat16 copy of the
          # float32 params (mixed precision; the memory ops then take bf16 inputs).
          compute_dtype="float32",
          seed=0,
          log_every=pick(100, 2),
          eval_every=pick(1_000, 4),
          checkpoint_every=pick(1_000, 4),
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
