r"""Times memjax's gated delta rule against the step-by-step reference and, when installed,
flash-linear-attention's Triton kernel (the anchor), and prints a table.

  python experiments/bench_delta_rule.py                       # the anchors' shape
  python experiments/bench_delta_rule.py --seq_len=1024 --dtypes=float32
  python experiments/bench_delta_rule.py --batch=1 --seq_len=128 --heads=2 --head_dim=16 \
      --repeats=2 --matmul_n=256 --copy_mib=1                 # CPU smoke run
  FLA_FLASH_QLA=0 python experiments/bench_delta_rule.py --anchor   # + fla 0.6.0

Each row: median time per call over `--repeats` samples of back-to-back calls (after
warm-up, inputs rotated among `--input_sets` sets so caches do not flatter), tokens/s, the
ratio to the reference path measured in the same run, and the share of the roofline: the
larger of FLOPs over the measured bf16 matmul rate and bytes over the measured copy
bandwidth, divided by the time.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from memjax import ops

import benchmarking  # experiments/benchmarking.py, beside this script

_B = flags.DEFINE_integer("batch", 8, "B")
_T = flags.DEFINE_integer("seq_len", 4096, "T")
_H = flags.DEFINE_integer("heads", 16, "H")
_K = flags.DEFINE_integer("head_dim", 128, "K = V")
_C = flags.DEFINE_integer("chunk_size", 64, "chunk length of the xla form")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "input dtypes")
_IMPLS = flags.DEFINE_list("implementations", ["reference", "xla"], "memjax implementations")
_BACKWARD_MAX_T = flags.DEFINE_integer(
    "reference_backward_max_len", 1024,
    "the reference's backward stores the state of every token (B*T*H*K*V*4 bytes); above "
    "this T it is timed forward only")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed runs per row")
_SETS = flags.DEFINE_integer("input_sets", 3, "input sets rotated between runs")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 8192, "size of the bf16 matmul-rate probe")
_COPY_MIB = flags.DEFINE_integer("copy_mib", 1024, "size of the copy-bandwidth probe")
_ANCHOR = flags.DEFINE_bool("anchor", False, "also time fla's chunk_gated_delta_rule (torch)")


def _inputs(key, dtype):
  b, t, h, k = _B.value, _T.value, _H.value, _K.value
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, t, h, k))
  kk = jax.random.normal(ks[1], (b, t, h, k))
  kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, t, h, k))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  g = -jax.nn.softplus(jax.random.normal(ks[4], (b, t, h)) - 2.0)
  return [x.astype(dtype) for x in (q, kk, v)] + [beta.astype(dtype), g.astype(jnp.float32)]


def _flops_and_bytes(itemsize):
  """FLOPs of the chunkwise form and the fewest bytes it must move (DESIGN.md §3)."""
  b, t, h, k, c = _B.value, _T.value, _H.value, _K.value, _C.value
  chunks = b * h * -(-t // c)
  # K K^T, Q K^T, U_pre, W, scores @ U (C x C x K each), and W S, Q S, K^T U (C x K x V).
  flops = chunks * (2 * c * c * k * 5 + 2 * c * k * k * 3)
  tokens = b * t * h
  bytes_ = tokens * (4 * k * itemsize + 2 * itemsize)  # q, k, v in, o out, beta and g in
  return flops, bytes_


def _fla_forward_ms(dtype_name):
  """Median forward time of fla's chunk_gated_delta_rule on the same shapes."""
  import torch  # pylint: disable=g-import-not-at-top
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=g-import-not-at-top
  import triton  # pylint: disable=g-import-not-at-top

  dtype = getattr(torch, dtype_name)
  b, t, h, k = _B.value, _T.value, _H.value, _K.value
  gen = torch.Generator(device="cuda").manual_seed(0)
  make = lambda *s: torch.randn(*s, device="cuda", generator=gen)
  sets = []
  for _ in range(_SETS.value):
    kk = torch.nn.functional.normalize(make(b, t, h, k), dim=-1)
    sets.append((make(b, t, h, k).to(dtype), kk.to(dtype), make(b, t, h, k).to(dtype),
                 torch.nn.functional.logsigmoid(make(b, t, h)).float(),
                 torch.sigmoid(make(b, t, h)).to(dtype)))
  counter = iter(range(10 ** 9))

  def fwd():
    q, kk, v, g, beta = sets[next(counter) % len(sets)]
    return chunk_gated_delta_rule(q, kk, v, g, beta, scale=k ** -0.5)[0]

  return triton.testing.do_bench(fwd, warmup=50, rep=200, return_mode="median")


def _row(name, dtype_name, mode, ms, ref_ms, flops_bytes, roofline):
  flops, bytes_ = flops_bytes
  if mode != "forward":
    # The backward does about twice the forward's matmuls and moves about as many bytes.
    flops, bytes_ = 3 * flops, 2 * bytes_
  floor_ms = 1e3 * max(flops / roofline[0], bytes_ / roofline[1])
  tokens = _B.value * _T.value
  return (f"| {name} | {dtype_name} | {mode} | {ms:.3f} | {tokens / ms / 1e3:.2f} | "
          f"{'' if ref_ms is None else f'{ref_ms / ms:.1f}x'} | {100 * floor_ms / ms:.1f}% |")


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"B={_B.value} T={_T.value} H={_H.value} K=V={_K.value} chunk={_C.value}")
  roofline = (benchmarking.bf16_matmul_rate(_MATMUL_N.value),
              benchmarking.copy_bandwidth(_COPY_MIB.value))
  print(f"measured ceilings: bf16 matmul {roofline[0] / 1e12:.0f} TFLOP/s, "
        f"copy {roofline[1] / 1e12:.2f} TB/s")
  rows = []
  for dtype_name in _DTYPES.value:
    dtype = jnp.dtype(dtype_name)
    sets = [_inputs(jax.random.key(i + 1), dtype) for i in range(_SETS.value)]
    flops_bytes = _flops_and_bytes(dtype.itemsize)
    ref = {}
    for impl in _IMPLS.value:
      run = lambda q, k, v, beta, g, impl=impl: ops.delta_rule(
          q, k, v, beta, g, chunk_size=_C.value, implementation=impl)
      fwd = jax.jit(run)

      def fwd_bwd(q, k, v, beta, g, run=run):
        o, pullback = jax.vjp(run, q, k, v, beta, g)
        return pullback(o)  # the output as the cotangent: random, not zeros

      modes = [("forward", jax.jit(fwd))]
      if impl != "reference" or _T.value <= _BACKWARD_MAX_T.value:
        modes.append(("forward+backward", jax.jit(fwd_bwd)))
      for mode, fn in modes:
        ms = benchmarking.median_ms(fn, sets, repeats=_REPEATS.value)
        if impl == "reference":
          ref[mode] = ms
        rows.append(_row(f"memjax {impl}", dtype_name, mode, ms, ref.get(mode), flops_bytes,
                         roofline))
        print(rows[-1], flush=True)
    if _ANCHOR.value and dtype_name in ("bfloat16", "float16", "float32"):
      ms = _fla_forward_ms(dtype_name)
      rows.append(_row("fla 0.6.0 chunk_gated_delta_rule", dtype_name, "forward", ms,
                       ref.get("forward"), flops_bytes, roofline))
      print(rows[-1], flush=True)
  print("\n| implementation | dtype | pass | median ms | M tokens/s | vs reference | roofline |")
  print("|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
