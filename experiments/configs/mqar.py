r"""MQAR (multi-query associative recall) with a gated-delta-rule DecoderLM.

Variants: the default is the CPU main job (sequence 128, 8 key-value pairs;
measured 6-7.5 minutes on 2 cores, held-out accuracy 0.9940); `gpu` is a harder task
(sequence 256, 32 pairs, vocab 8192) and a larger model (about 2.5 minutes on one
H200; about 0.99); `tiny` is a few steps of a tiny model, for tests; `mom` is the
CPU job with Mixture-of-Memories layers (`mom,mom`; accuracy not yet measured); `lmm`
is the CPU job with Titans neural-memory layers (`lmm,lmm`; held-out 0.9978 in 10
minutes on 2 CPU cores, and in 55 s on an H100 at the former theta ceiling 0.1);
`pkm` is the CPU job with product-key memories in place of the FFNs (`gdn,gdn` mixers,
`pkm` FFNs with 256 value rows each, Memory Layers at Scale style; accuracy not yet
measured). From the repo root:

  python experiments/train.py
  python experiments/train.py --config=experiments/configs/mqar.py:gpu \
      --workdir=/tmp/memjax/mqar_gpu
  python experiments/train.py --config=experiments/configs/mqar.py:mom \
      --workdir=/tmp/memjax/mqar_mom
  python experiments/train.py --config=experiments/configs/mqar.py:lmm \
      --workdir=/tmp/memjax/mqar_lmm
  python experiments/train.py --config=experiments/configs/mqar.py:pkm \
      --workdir=/tmp/memjax/mqar_pkm
  python experiments/train.py --config.train.num_steps=3000 \
      --config.model.mixers=attn,gdn --workdir=/tmp/memjax/mqar_mixed
  python experiments/train.py --config.model.mixers=gdn,gdn,gdn,attn \
      --config.model.ffns=mlp,pkm,mlp,mlp --workdir=/tmp/memjax/mqar_hybrid

Any field can be overridden as `--config.<section>.<field>=<value>`. The
vocabulary size is shared: `--config.data.vocab_size=...` also sets the
model's. Rerunning a command with the same --workdir resumes from its newest
checkpoint; on a GPU the resumed run is bit-identical to an uninterrupted one
only with XLA_FLAGS=--xla_gpu_deterministic_ops=true.
"""

import ml_collections
from ml_collections import config_dict

from memjax.nn import titans

_VARIANTS = ("cpu", "gpu", "tiny", "mom", "lmm", "pkm")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of one variant.

  Args:
    arg: "cpu" (also None or ""), "gpu", "tiny", "mom", "lmm" or "pkm".

  Returns:
    The ConfigDict with sections `model`, `data` and `train`, and the fields
    `mesh` and `sharding_rules`.
  """
  variant = arg or "cpu"
  if variant not in _VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; expected one of {_VARIANTS}.")

  def pick(cpu, gpu, tiny):
    return {"cpu": cpu, "gpu": gpu, "tiny": tiny, "mom": cpu, "lmm": cpu, "pkm": cpu}[variant]

  # One reference for both sections: the model must embed every task token.
  vocab_size = config_dict.FieldReference(pick(256, 8192, 64))

  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(
      dict(
          vocab_size=vocab_size,
          d_model=pick(64, 256, 32),
          mixers=("mom,mom" if variant == "mom" else "lmm,lmm" if variant == "lmm"
                  else pick("gdn,gdn", "gdn,gdn", "gdn")),
          # One FFN for every layer ("mlp" or "pkm") or one per layer, e.g. "mlp,pkm".
          ffns="pkm" if variant == "pkm" else "mlp",
          num_heads=pick(2, 4, 2),
          mlp_ratio=2.0,
          tie_embeddings=True,
          chunk_size=pick(64, 64, 16),
          # Product-key memories of "pkm" FFNs: n_keys ** 2 value rows, each of the
          # query heads selects knn of them.
          pkm_n_keys=16,
          pkm_heads=2,
          pkm_knn=8,
          pkm_k_dim=32,
          pkm_shared_values=False,
          # Consecutive identical layers run as one nn.scan (compile time independent
          # of their number); False unrolls them.
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
          vocab_size=vocab_size,
          seq_len=pick(128, 256, 32),
          num_kv_pairs=pick(8, 32, 4),
          power_a=0.01,
          # With the CPU job's 256-token vocabulary, random filler would repeat the
          # context's keys about 3.5 times per example, each followed by a random token:
          # false associations that cap the reachable accuracy. Zoology's 8192 tokens
          # make that rare, so the GPU task keeps random filler.
          random_non_queries=pick(False, True, True),
          num_train=pick(20_000, 100_000, 256),
          num_test=pick(1_000, 3_000, 100),
          data_seed=0,
          # "tfds": built once under data_dir; "numpy": generated in memory.
          source="tfds",
          # None means <workdir>/tfds.
          data_dir=config_dict.placeholder(str),
      )
  )
  config.train = ml_collections.ConfigDict(
      dict(
          batch_size=pick(32, 128, 16),
          num_steps=pick(1_500, 10_000, 40),
          # Cosine horizon; None means num_steps.
          decay_steps=config_dict.placeholder(int),
          learning_rate=pick(3e-3, 1e-3, 3e-3),
          warmup_steps=pick(100, 1_000, 4),
          weight_decay=0.1,
          grad_clip=1.0,
          # "float32", or "bfloat16": the model computes on a bfloat16 copy of the
          # float32 params (mixed precision; the memory ops then take bf16 inputs).
          compute_dtype="float32",
          seed=0,
          log_every=pick(100, 500, 5),
          eval_every=pick(500, 2_500, 20),
          checkpoint_every=pick(500, 2_500, 20),
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
