r"""Train-step throughput on 1..N devices, data parallel and context parallel.

For each mode, sequence length T and device count n, times the sharded DecoderLM train
step of `memjax.train` (forward, backward and optimizer update) on the first n devices and
prints a table: median ms per step, tokens/s, tokens/s per device, and the efficiency,
tokens/s per device over that of one device in the same mode and length.

* `data`: mesh {"data": n}, `--batch_per_device` sequences per device (global batch
  grows with n).
* `seq`: mesh {"seq": n}, `--batch_per_device` sequences split along T over the n devices
  (context parallelism: the memory layers exchange their chunk-transition summaries; see
  memjax.sharding.context_parallel).

On a 4-GPU host, Gated DeltaNet at 32K-128K tokens:

  python experiments/bench_scaling.py --device_counts=1,2,4 --seq_lens=32768,65536,131072

On the CPU (checks the script; the numbers mean nothing):

  JAX_NUM_CPU_DEVICES=8 python experiments/bench_scaling.py --small
"""

import csv
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

from memjax import sharding
from memjax import train
from memjax.train import sharded
from memjax.train.steps import compute_dtype
from memjax.models import DecoderLM

_MIXERS = flags.DEFINE_string("mixers", "gdn,gdn", "DecoderLM mixer spec")
_D_MODEL = flags.DEFINE_integer("d_model", 1024, "model width")
_HEADS = flags.DEFINE_integer("num_heads", 8, "heads per mixer")
_VOCAB = flags.DEFINE_integer("vocab_size", 256, "vocabulary (byte-level LM)")
_IMPLEMENTATION = flags.DEFINE_enum(
    "implementation", None, ["reference", "xla", "pallas"],
    "implementation of the memory ops; None: memjax's default for the float32 model (on a "
    "GPU the xla form for the delta rules; see memjax.ops.dispatch)")
_COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype", "float32", ["float32", "bfloat16"],
    "dtype the model computes in (float32 params either way; see train.compute_dtype)")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["32768", "65536", "131072"], "tokens per sequence")
_COUNTS = flags.DEFINE_list("device_counts", ["1", "2", "4"], "devices to span, each a row")
_MODES = flags.DEFINE_list("modes", ["data", "seq"], "data and/or seq parallelism")
_BATCH = flags.DEFINE_integer("batch_per_device", 1,
                              "sequences per device (data) or in all (seq)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per sample")
_REPEATS = flags.DEFINE_integer("repeats", 3, "samples; the median is reported")
_SMALL = flags.DEFINE_bool("small", False, "tiny model and lengths, to check the script")
_OUTPUT = flags.DEFINE_string("output", None, "also write the rows to this CSV")

COLUMNS = ("mode", "devices", "seq_len", "global_batch", "median_ms", "tokens_per_s",
           "tokens_per_s_per_device", "efficiency")


def _model(small: bool) -> DecoderLM:
  if small:
    return DecoderLM(vocab_size=64, d_model=32, mixers=_MIXERS.value, num_heads=2,
                     chunk_size=16, implementation=_IMPLEMENTATION.value)
  return DecoderLM(vocab_size=_VOCAB.value, d_model=_D_MODEL.value, mixers=_MIXERS.value,
                   num_heads=_HEADS.value, implementation=_IMPLEMENTATION.value)


def _mesh_shape(mode: str, devices: int) -> dict[str, int]:
  if mode not in ("data", "seq"):
    raise ValueError(f"--modes takes 'data' and 'seq', got {mode!r}")
  return {mode: devices}


def time_step(model, mode: str, devices: int, seq_len: int, batch_per_device: int,
              steps: int, repeats: int) -> dict:
  """Times the train step of `model` on the first `devices` devices.

  Args:
    model: the DecoderLM.
    mode: "data" (batch over the devices) or "seq" (the sequence over them).
    devices: how many of `jax.devices()` the mesh spans.
    seq_len: tokens per sequence T.
    batch_per_device: sequences per device ("data") or in all ("seq").
    steps: steps timed back to back in one sample.
    repeats: samples; the median is taken.

  Returns:
    One row with the keys of `COLUMNS` (efficiency left to the caller).
  """
  available = len(jax.devices())
  if devices > available:
    raise ValueError(f"--device_counts asks for {devices} devices; there are {available}")
  mesh = sharding.make_mesh(_mesh_shape(mode, devices), jax.devices()[:devices])
  batch_size = batch_per_device * (devices if mode == "data" else 1)
  tokens = np.random.default_rng(0).integers(0, model.vocab_size, (batch_size, seq_len),
                                             dtype=np.int32)
  batch = {"inputs": tokens, "labels": np.roll(tokens, -1, axis=1)}
  optimizer = optax.adamw(1e-4)
  state = train.create_train_state(model, optimizer, jax.random.key(0), batch, mesh=mesh)
  step = train.make_train_step(model, optimizer, mesh=mesh, example_batch=batch,
                               dtype=compute_dtype(_COMPUTE_DTYPE.value))
  batch = jax.device_put(batch, sharded.batch_shardings(batch, mesh, sharding.DEFAULT_RULES))
  state, metrics = step(state, batch)  # Compile and warm up.
  jax.block_until_ready(metrics)
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    samples.append((time.perf_counter() - start) / steps)
  seconds = statistics.median(samples)
  tokens_per_s = batch_size * seq_len / seconds
  return {"mode": mode, "devices": devices, "seq_len": seq_len, "global_batch": batch_size,
          "median_ms": 1e3 * seconds, "tokens_per_s": tokens_per_s,
          "tokens_per_s_per_device": tokens_per_s / devices, "efficiency": float("nan")}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  small = _SMALL.value
  seq_lens = [256] if small else [int(t) for t in _SEQ_LENS.value]
  counts = [int(n) for n in _COUNTS.value]
  model = _model(small)
  print(f"{jax.devices()[0].device_kind} x {len(jax.devices())}, JAX {jax.__version__}, "
        f"mixers {model.mixers}, d_model {model.d_model}, heads {model.num_heads}, "
        f"implementation {model.implementation or 'default'}, compute {_COMPUTE_DTYPE.value}",
        flush=True)
  print(" | ".join(COLUMNS), flush=True)
  rows = []
  for mode in _MODES.value:
    for seq_len in seq_lens:
      one_device = None
      for devices in counts:
        row = time_step(model, mode, devices, seq_len, _BATCH.value, _STEPS.value,
                        _REPEATS.value)
        if devices == 1:
          one_device = row["tokens_per_s_per_device"]
        if one_device:
          row["efficiency"] = row["tokens_per_s_per_device"] / one_device
        rows.append(row)
        print(f"{mode} | {devices} | {seq_len} | {row['global_batch']} | "
              f"{row['median_ms']:.1f} | {row['tokens_per_s']:,.0f} | "
              f"{row['tokens_per_s_per_device']:,.0f} | {row['efficiency']:.2f}", flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=COLUMNS)
      writer.writeheader()
      writer.writerows(rows)


if __name__ == "__main__":
  app.run(main)
