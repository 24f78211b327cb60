r"""Times memjax's neural memory op (Titans LMM) against titans-pytorch's NeuralMemory.

  python experiments/bench_titans.py                     # GPU: the DESIGN.md §4 shapes
  python experiments/bench_titans.py --shapes=4-4096-512-8-64 --memories=mlp --dtypes=float32
  python experiments/bench_titans.py --small             # CPU smoke run, under a minute

Shapes are `B-T-D-H-C`: batch, tokens, model width, heads (head dim K = D / H) and chunk.
Memories: `linear` (one matrix K x K per head) and `mlp` (the residual 2-layer MLP,
K -> memory_expansion * K -> K, GELU, LayerNorm). For each shape, memory, input dtype and
memjax implementation (`pallas`, the chunk loop as one kernel, linear memory only; `xla`,
the chunkwise dual form; `reference`, token by token, only up to --reference_max_tokens =
B*T), the forward and the forward+backward (cotangent: the output; gradients to every
input and the initial weights) are timed.

What each row computes:
* memjax rows time `memjax.ops.neural_memory` alone: q, k (unit norm), v, and per-token
  gates theta, eta, alpha are given. Every token has its own gates and its own weights
  (the retrieval of token t reads the memory after token t's write); the gradients of a
  chunk are taken at the chunk-start weights (Titans eqs 16-18).
* titans-pytorch rows (`titans_pytorch.NeuralMemory`, torch on CUDA, float32, when it is
  importable) time the whole module: its q/k/v projections, gates and output projection
  included. It takes one gradient step per chunk (its per-token learning rates weight the
  chunk's summed gradient) with chunk-level momentum and decay, and a token retrieves with
  the weights of the last completed chunk. The linear memory is matched by
  `MemoryMLP(K, depth=1)` without its residual norm; the MLP by its default
  `MemoryMLP(K, depth=2, expansion_factor)` with the residual LayerNorm.
  `vs titans-pytorch` is memjax's time over titans-pytorch's for the same shape, memory,
  pass and dtype (float32 only); `vs memjax xla` is the time over memjax xla's for the
  same shape, memory, dtype and pass.

Memory columns: `XLA peak GB` is what XLA's buffer assignment says one call of the
compiled function needs (arguments, outputs and temporaries); `device peak GB` is the
device's `peak_bytes_in_use` (jax `memory_stats`, where the backend has it) after the row:
a process-wide high-water mark, so it only grows down the table. titans-pytorch rows give
`torch.cuda.max_memory_allocated`, reset before each row.

A row that fails (out of memory, say) is reported as failed and the table goes on; rows
are printed as they complete and the whole table again at the end.
"""

import statistics
import time
import traceback

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from memjax import ops
from memjax.kernels.titans import common as titans_kernels
from memjax.kernels.titans import mlp_common as mlp_kernels
from memjax.ops import titans as titans_ops

import benchmarking  # experiments/benchmarking.py, beside this script

_SHAPES = flags.DEFINE_list("shapes", ["4-4096-512-8-64", "8-4096-1024-16-64"],
                            "B-T-D-H-C shapes (head dim K = D / H)")
_MEMORIES = flags.DEFINE_list("memories", ["linear", "mlp"], "memory models to time")
_IMPLS = flags.DEFINE_list("implementations", ["pallas", "xla", "reference"],
                           "memjax implementations of memjax.ops.neural_memory")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "input dtypes")
_EXPANSION = flags.DEFINE_float("memory_expansion", 4.0, "hidden width of the MLP over K")
_REFERENCE_MAX_TOKENS = flags.DEFINE_integer(
    "reference_max_tokens", 2048,
    "B*T above which the token-by-token reference is skipped (its backward keeps every "
    "token's weights, momentum and anchor: 3 copies of the memory per token)")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed samples per row")
_CALLS = flags.DEFINE_integer("calls_per_sample", 5, "calls timed together in one sample")
_ANCHOR = flags.DEFINE_bool("anchor", True,
                            "also time titans-pytorch's NeuralMemory when it is importable "
                            "and CUDA is available")
_SMALL = flags.DEFINE_bool("small", False,
                           "CPU smoke run: shape 2-64-128-2-16, 2 repeats of 1 call (overrides "
                           "--shapes, --repeats and --calls_per_sample)")

_HEADER = ("| memory | B-T-D-H-C | dtype | implementation | pass | median ms | M tokens/s | "
           "XLA peak GB | device peak GB | vs titans-pytorch | vs memjax xla |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|")
_PASSES = ("forward", "forward+backward")
_LEGEND = """\
memjax rows: memjax.ops.neural_memory alone (q, k, v and per-token theta, eta, alpha given);
  per-token gates and weights, gradients taken at each chunk's start weights (Titans eqs 16-18).
titans-pytorch rows: its whole NeuralMemory module (projections and gates included), float32;
  one gradient step per chunk, chunk-level momentum and decay, reads the last chunk's weights.
XLA peak GB: one call's buffers per XLA; device peak GB: process-wide high-water mark
  (titans-pytorch: torch.cuda.max_memory_allocated, reset per row).
vs titans-pytorch: memjax ms / titans-pytorch ms, same shape, memory, pass (float32).
vs memjax xla: ms / memjax xla ms, same shape, memory, dtype, pass."""


def _parse(text):
  b, t, d, h, c = (int(x) for x in text.split("-"))
  if d % h:
    raise ValueError(f"shape {text}: D = {d} must be a multiple of H = {h}")
  return b, t, d, h, c


def _layer_dims(memory, k):
  if memory == "linear":
    return [k, k]
  return [k, int(_EXPANSION.value * k), k]


def _inputs(key, shape, memory, dtype):
  """q, k (unit norm), v, theta, eta, alpha in `dtype`, then the float32 initial weights."""
  b, t, d, h, _ = shape
  k_dim = d // h
  ks = jax.random.split(key, 7)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (b, t, h, k_dim)))
  k = unit(jax.random.normal(ks[1], (b, t, h, k_dim)))
  v = jax.random.normal(ks[2], (b, t, h, k_dim))
  # The NeuralMemory layer's starting gates: theta = 0.1 sigmoid(-2), strong retention.
  theta = 0.1 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)) - 2.0)
  eta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)) + 1.0)
  alpha = jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, h)) - 4.0)
  dims = _layer_dims(memory, k_dim)
  weights = tuple(
      jax.random.normal(kw, (h, d_in, d_out)) * d_in ** -0.5
      for kw, d_in, d_out in zip(jax.random.split(ks[6], len(dims) - 1), dims[:-1], dims[1:]))
  return tuple(x.astype(dtype) for x in (q, k, v, theta, eta, alpha)) + (weights,)


def _memjax_fn(impl, chunk):
  def fn(q, k, v, theta, eta, alpha, weights):
    state = titans_ops.init_state(weights, q.shape[0])
    return ops.neural_memory(q, k, v, theta, eta, alpha, initial_state=state,
                             chunk_size=chunk, implementation=impl)
  return fn


def _with_backward(fn):
  def fwd_bwd(*args):
    o, pullback = jax.vjp(fn, *args)
    return pullback(o)  # the output as the cotangent: random, not zeros
  return fwd_bwd


def _gb(nbytes):
  return "" if nbytes is None else f"{nbytes / 1e9:.3f}"


def _xla_peak(compiled):
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None  # Not every backend reports it; the timing still stands.
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return getattr(stats, "peak_memory_in_bytes", 0) or total


def _device_peak():
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def _row(memory, shape, dtype, name, passes, ms, xla_peak, device_peak, anchor_ms,
         xla_ms=None):
  tokens = shape[0] * shape[1]
  ratio = lambda to: "" if to is None else f"{ms / to:.2f}"
  return (f"| {memory} | {'-'.join(map(str, shape))} | {dtype} | {name} | {passes} | "
          f"{ms:.3f} | {tokens / ms / 1e3:.2f} | {_gb(xla_peak)} | {_gb(device_peak)} | "
          f"{ratio(anchor_ms)} | {ratio(xla_ms)} |")


def _failed(memory, shape, dtype, name, passes, error):
  message = " ".join(f"{type(error).__name__}: {error}".split())[:160]
  return (f"| {memory} | {'-'.join(map(str, shape))} | {dtype} | {name} | {passes} | "
          f"failed: {message} | | | | | |")


class _TitansPytorch:
  """titans-pytorch's NeuralMemory on CUDA, float32, on matched shapes."""

  def __init__(self):
    import torch  # pylint: disable=g-import-not-at-top
    import titans_pytorch  # pylint: disable=g-import-not-at-top
    from titans_pytorch import memory_models  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      raise RuntimeError("torch has no CUDA device")
    self.torch, self.module, self.models = torch, titans_pytorch, memory_models

  def build(self, shape, memory):
    _, _, d, h, c = shape
    k = d // h
    if memory == "linear":
      model, extra = self.models.MemoryMLP(k, depth=1), dict(mem_model_norm_add_residual=False)
    else:
      model, extra = self.models.MemoryMLP(k, depth=2, expansion_factor=_EXPANSION.value), {}
    return self.module.NeuralMemory(dim=d, heads=h, dim_head=k, chunk_size=c, model=model,
                                    **extra).cuda()

  def time(self, layer, shape, backward):
    """(median ms, peak bytes) of one call, over --repeats samples of --calls_per_sample."""
    torch = self.torch
    b, t, d, _, _ = shape
    sets = [torch.randn(b, t, d, device="cuda") for _ in range(3)]

    def call(i):
      x = sets[i % len(sets)]
      if not backward:
        with torch.no_grad():
          return layer(x)[0]
      layer.zero_grad(set_to_none=True)
      out = layer(x.requires_grad_(True))[0]
      out.backward(out.detach())
      return out

    for i in range(len(sets)):  # Warm up.
      call(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    samples = []
    for r in range(_REPEATS.value):
      start = time.perf_counter()
      for i in range(_CALLS.value):
        call(r + i)
      torch.cuda.synchronize()
      samples.append((time.perf_counter() - start) / _CALLS.value)
    return 1e3 * statistics.median(samples), torch.cuda.max_memory_allocated()


def _anchor():
  if not _ANCHOR.value:
    return None
  try:
    return _TitansPytorch()
  except Exception as e:  # pylint: disable=broad-except
    print(f"titans-pytorch rows skipped: {type(e).__name__}: {e}", flush=True)
    return None


def _emit(rows, row):
  rows.append(row)
  print(row, flush=True)


def _anchor_rows(anchor, shape, memory, rows):
  """Times titans-pytorch; returns {pass: ms} of the rows that ran."""
  times = {}
  for passes in _PASSES:
    name = "titans-pytorch NeuralMemory"
    try:
      ms, peak = anchor.time(anchor.build(shape, memory), shape, passes != "forward")
    except Exception as e:  # pylint: disable=broad-except
      _emit(rows, _failed(memory, shape, "float32", name, passes, e))
      continue
    finally:
      anchor.torch.cuda.empty_cache()
    times[passes] = ms
    _emit(rows, _row(memory, shape, "float32", name, passes, ms, None, peak, ms))
  return times


def _kernel_unsupported(args, memory, chunk):
  q, v = args[0], args[2]
  if memory == "linear":
    return titans_kernels.unsupported(q, v, 1, "l2", "l2", chunk)
  hidden = int(_EXPANSION.value * q.shape[-1])
  return mlp_kernels.unsupported(q, v, 2, hidden, "l2", "l2", chunk)


def _memjax_rows(shape, memory, dtype, anchor_ms, rows):
  sets = [_inputs(jax.random.key(i + 1), shape, memory, jnp.dtype(dtype)) for i in range(3)]
  forward, xla_ms = {}, {}
  # xla first: the other implementations' rows give their time over its time.
  for impl in sorted(_IMPLS.value, key=lambda name: name != "xla"):
    if impl == "reference" and shape[0] * shape[1] > _REFERENCE_MAX_TOKENS.value:
      continue
    if impl == "pallas" and _kernel_unsupported(sets[0], memory, shape[4]):
      print(f"memjax pallas skipped for {memory} {'-'.join(map(str, shape))}: the kernel "
            f"{_kernel_unsupported(sets[0], memory, shape[4])}", flush=True)
      continue
    fn = _memjax_fn(impl, shape[4])
    for passes, timed in zip(_PASSES, (fn, _with_backward(fn))):
      name = f"memjax {impl}"
      try:
        compiled = jax.jit(timed).lower(*sets[0]).compile()
        if passes == "forward":
          forward[impl] = compiled(*sets[0])
        ms = benchmarking.median_ms(compiled, sets, repeats=_REPEATS.value,
                                    calls_per_sample=_CALLS.value)
        ratio_to = anchor_ms.get(passes) if dtype == "float32" else None
        if impl == "xla":
          xla_ms[passes] = ms
        row = _row(memory, shape, dtype, name, passes, ms, _xla_peak(compiled),
                   _device_peak(), ratio_to, None if impl == "xla" else xla_ms.get(passes))
      except Exception as e:  # pylint: disable=broad-except
        row = _failed(memory, shape, dtype, name, passes, e)
        traceback.print_exc()
      _emit(rows, row)
  if "xla" in forward:
    b = jnp.asarray(forward["xla"], jnp.float32)
    for impl in sorted(set(forward) - {"xla"}):
      a = jnp.asarray(forward[impl], jnp.float32)
      diff = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      print(f"{memory} {'-'.join(map(str, shape))} {dtype}: {impl} vs xla forward, "
            f"relative difference {diff:.2e}", flush=True)


def main(argv):
  del argv
  if _SMALL.value:
    shapes = ["2-64-128-2-16"]
    flags.FLAGS.repeats, flags.FLAGS.calls_per_sample = 2, 1
  else:
    shapes = _SHAPES.value
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"memory_expansion {_EXPANSION.value}", flush=True)
  anchor = _anchor()
  rows = []
  print(_HEADER, flush=True)
  for shape_text in shapes:
    shape = _parse(shape_text)
    for memory in _MEMORIES.value:
      anchor_ms = {} if anchor is None else _anchor_rows(anchor, shape, memory, rows)
      for dtype in _DTYPES.value:
        _memjax_rows(shape, memory, dtype, anchor_ms, rows)
  print("\n" + _HEADER)
  print("\n".join(rows))
  print("\n" + _LEGEND)


if __name__ == "__main__":
  app.run(main)
