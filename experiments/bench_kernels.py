r"""Times memjax's chunked memory ops per implementation against flash-linear-attention.

  python experiments/bench_kernels.py                                  # GPU, the issue's grid
  FLA_FLASH_QLA=0 python experiments/bench_kernels.py --anchor         # + fla 0.6.0 (torch)
  python experiments/bench_kernels.py --scaling                        # T from 2K to 64K
  python experiments/bench_kernels.py --shapes=1-128-2-64 --implementations=reference,xla \
      --repeats=2 --matmul_n=256 --copy_mib=1                          # CPU smoke run

Ops: `gdn` (gated delta rule; fla `chunk_gated_delta_rule`), `deltanet` (delta rule; fla
`chunk_delta_rule`), `gla` (gated linear attention with a per-head scalar decay; fla
`chunk_simple_gla`). Shapes are `B-T-H-D` with K = V = D. Before timing, fla's forward is
checked against memjax's on the same inputs (the relative difference is printed).

Each row: median time per call (batches of back-to-back calls, inputs rotated among three
sets), tokens/s, the ratio to fla's time for the same op, shape and pass, and the share of
the roofline: the larger of FLOPs over the measured bf16 matmul rate and bytes over the
measured copy bandwidth, divided by the time.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from memjax import ops

import benchmarking  # experiments/benchmarking.py, beside this script

_SHAPES = flags.DEFINE_list("shapes", ["8-4096-16-128", "2-16384-16-128", "4-2048-16-64"],
                            "B-T-H-D shapes (K = V = D)")
_OPS = flags.DEFINE_list("ops", ["gdn", "deltanet", "gla"], "ops to time")
_IMPLS = flags.DEFINE_list("implementations", ["reference", "xla", "pallas"],
                           "memjax implementations")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "input dtype")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "chunk length")
_REFERENCE_MAX_TOKENS = flags.DEFINE_integer(
    "reference_max_tokens", 32768,
    "B*T above which the step-by-step reference is skipped (its backward stores every "
    "token's state, and it is ~100x slower)")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed samples per row")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 8192, "size of the bf16 matmul-rate probe")
_COPY_MIB = flags.DEFINE_integer("copy_mib", 1024, "size of the copy-bandwidth probe")
_ANCHOR = flags.DEFINE_bool("anchor", False, "also time fla 0.6.0 (needs torch + fla)")
_SCALING = flags.DEFINE_bool(
    "scaling", False, "instead: the pallas gdn forward at T = 2K..64K with B*T = 64K, H=16")

_FLA_NAMES = {"gdn": "chunk_gated_delta_rule", "deltanet": "chunk_delta_rule",
              "gla": "chunk_simple_gla"}

def _parse(shape):
  b, t, h, d = (int(x) for x in shape.split("-"))
  return b, t, h, d

def _inputs(key, shape, dtype):
  """q, k (unit norm), v, beta in (0, 1) and g < 0 (float32), as fla and memjax take them."""
  b, t, h, d = shape
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, t, h, d))
  k = jax.random.normal(ks[1], (b, t, h, d))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, t, h, d))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 3.0)
  return [x.astype(dtype) for x in (q, k, v)] + [beta.astype(dtype), g]

def _memjax_fn(op, impl):
  """f(q, k, v, beta, g) -> o for one op and implementation."""
  chunk = _CHUNK.value
  if op == "gdn":
    return lambda q, k, v, beta, g: ops.delta_rule(q, k, v, beta, g, chunk_size=chunk,
                                                   implementation=impl)
  if op == "deltanet":
    return lambda q, k, v, beta, g: ops.delta_rule(q, k, v, beta, None, chunk_size=chunk,
                                                   implementation=impl)
  return lambda q, k, v, beta, g: ops.linear_attention(q, k, v, g, chunk_size=chunk,
                                                       implementation=impl)

def _with_backward(fn):
  def fwd_bwd(*args):
    o, pullback = jax.vjp(fn, *args)
    return pullback(o)  # the output as the cotangent: random, not zeros
  return fwd_bwd

def _flops_and_bytes(op, shape, itemsize, passes):
  """FLOPs of the chunkwise form and the fewest bytes it must move (DESIGN.md §3)."""
  b, t, h, d = shape
  c = _CHUNK.value
  chunks = b * h * -(-t // c)
  # Q K^T and scores @ V (C x C x D each) and Q S, K^T V (C x D x D) for every op; the delta
  # rules add K K^T, W, U (C x C x D) and W S (C x D x D).
  delta = op != "gla"
  flops = chunks * (2 * c * c * d * (5 if delta else 2) + 2 * c * d * d * (3 if delta else 2))
  bytes_ = b * t * h * (4 * d * itemsize + (2 * itemsize if delta else 4))
  if passes == "forward+backward":  # about twice the forward's matmuls again, 2x the bytes
    flops, bytes_ = 3 * flops, 2 * bytes_
  return flops, bytes_

class _Fla:
  """fla's kernels on torch tensors made from the same inputs."""

  def __init__(self):
    import torch  # pylint: disable=g-import-not-at-top
    import triton  # pylint: disable=g-import-not-at-top
    from fla import ops as fla_ops  # pylint: disable=g-import-not-at-top
    self.torch, self.triton, self.ops = torch, triton, fla_ops

  def tensors(self, arrays):
    torch = self.torch
    out = []
    for x in arrays:
      t = torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda()
      out.append(t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t)
    return out

  def fn(self, op, d):
    f = getattr(self.ops, _FLA_NAMES[op])
    scale = d ** -0.5
    if op == "gdn":
      return lambda q, k, v, beta, g: f(q, k, v, g, beta, scale=scale)[0]
    if op == "deltanet":
      return lambda q, k, v, beta, g: f(q, k, v, beta, scale=scale)[0]
    return lambda q, k, v, beta, g: f(q, k, v, g, scale=scale)[0]

  def median_ms(self, fn, sets, backward):
    counter = iter(range(10 ** 9))

    def call():
      args = sets[next(counter) % len(sets)]
      if not backward:
        return fn(*args)
      args = [a.detach().requires_grad_(a.dtype.is_floating_point) for a in args]
      o = fn(*args)
      o.backward(o.detach())
      return o

    return self.triton.testing.do_bench(call, warmup=20, rep=200, return_mode="median")

def _row(op, shape, name, passes, ms, fla_ms, roofline, dtype):
  flops, bytes_ = _flops_and_bytes(op, shape, jnp.dtype(dtype).itemsize, passes)
  floor_ms = 1e3 * max(flops / roofline[0], bytes_ / roofline[1])
  tokens = shape[0] * shape[1]
  ratio = "" if fla_ms is None or ms is None else f"{ms / fla_ms:.2f}"
  return (f"| {op} | {'-'.join(map(str, shape))} | {name} | {passes} | {ms:.3f} | "
          f"{tokens / ms / 1e3:.1f} | {ratio} | {100 * floor_ms / ms:.1f}% |")

def _time(fn, sets):
  return benchmarking.median_ms(jax.jit(fn), sets, repeats=_REPEATS.value)

def _grid(roofline):
  dtype = jnp.dtype(_DTYPE.value)
  fla = _Fla() if _ANCHOR.value else None
  rows = []
  for shape_text in _SHAPES.value:
    shape = _parse(shape_text)
    sets = [_inputs(jax.random.key(i + 1), shape, dtype) for i in range(3)]
    for op in _OPS.value:
      fla_ms = {}
      if fla is not None:
        torch_sets = [fla.tensors(s) for s in sets]
        fla_fn = fla.fn(op, shape[3])
        ours = jax.jit(_memjax_fn(op, "pallas" if "pallas" in _IMPLS.value else "xla"))(
            *sets[0])
        theirs = fla_fn(*torch_sets[0]).float().cpu().numpy()
        ours = np.asarray(ours.astype(jnp.float32))
        diff = np.linalg.norm(ours - theirs) / np.linalg.norm(ours)
        print(f"{op} {shape_text}: fla vs memjax forward, relative difference {diff:.2e}",
              flush=True)
        for passes in ("forward", "forward+backward"):
          try:
            fla_ms[passes] = fla.median_ms(fla_fn, torch_sets, passes != "forward")
          except Exception as e:  # pylint: disable=broad-except
            print(f"  fla {passes} refused: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
          rows.append(_row(op, shape, f"fla {_FLA_NAMES[op]}", passes, fla_ms[passes],
                           fla_ms[passes], roofline, dtype))
          print(rows[-1], flush=True)
      for impl in _IMPLS.value:
        if impl == "reference" and shape[0] * shape[1] > _REFERENCE_MAX_TOKENS.value:
          continue
        fn = _memjax_fn(op, impl)
        for passes, timed in (("forward", fn), ("forward+backward", _with_backward(fn))):
          ms = _time(timed, sets)
          rows.append(_row(op, shape, f"memjax {impl}", passes, ms, fla_ms.get(passes),
                           roofline, dtype))
          print(rows[-1], flush=True)
  return rows

def _scaling(roofline):
  dtype = jnp.dtype(_DTYPE.value)
  rows = []
  for t in (2048, 4096, 8192, 16384, 32768, 65536):
    shape = (65536 // t, t, 16, 128)
    sets = [_inputs(jax.random.key(i + 1), shape, dtype) for i in range(3)]
    ms = _time(_memjax_fn("gdn", "pallas"), sets)
    rows.append(_row("gdn", shape, "memjax pallas", "forward", ms, None, roofline, dtype))
    print(rows[-1], flush=True)
  return rows

def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {_DTYPE.value}, "
        f"chunk {_CHUNK.value}")
  roofline = (benchmarking.bf16_matmul_rate(_MATMUL_N.value),
              benchmarking.copy_bandwidth(_COPY_MIB.value))
  print(f"measured ceilings: bf16 matmul {roofline[0] / 1e12:.0f} TFLOP/s, "
        f"copy {roofline[1] / 1e12:.2f} TB/s", flush=True)
  rows = _scaling(roofline) if _SCALING.value else _grid(roofline)
  print("\n| op | B-T-H-D | implementation | pass | median ms | M tokens/s | vs fla | roofline |")
  print("|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))

if __name__ == "__main__":
  app.run(main)
