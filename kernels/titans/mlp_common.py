"""The per-chunk math of the MLP-memory kernels, and which sizes they take.

The MLP memory `M(x) = x + LN(sigma(x W_1) ... W_L)` (`memjax.ops.titans_memory`) with the
"titans" rule. One chunk with start weights W0_i, momentum S0_i and anchor A_i (the
weights its gradients are taken at) is, with the coefficients of
`memjax.kernels.titans.common` (cw [C, C], d, b, cs, e [C]; the chunk end takes the last
row of cw and the last entries of d, b and e):

    (x_i, g_i) = per-token inputs and output gradients of layer i at A, for the loss
                 ||M_A(k) - v||^2                            ([C, d_in_i], [C, d_out_i])
    W1_i = d_C W0_i + b_C S0_i + x_i^T diag(cw_C) g_i
    S1_i = e_C S0_i + x_i^T diag(cs) g_i
    Y    = M(Q) with layer i applied as
           h -> diag(d) h W0_i + diag(b) h S0_i + (h x_i^T * cw) g_i.

Unlike the linear memory, the layers couple every column (the LayerNorm, and g_1 needs
all of W_2), so one program owns a whole head: its W and S of every layer stay on chip
from chunk to chunk. The backward walks the chunks in reverse with the cotangents of W
and S on chip and differentiates `forward_chunk` itself (`jax.vjp` at trace time, inside
the kernel), recomputing each chunk from its saved start; the second derivatives through
the per-token gradients come out of the same trace.

On chip, per head: W, S and A of every layer, float32, i.e. 3 * 4 bytes * sum(d_in * d_out)
(K = 64 with a 4x hidden layer: 384 KiB; K = 128: 1.5 MiB). That fits a TPU core's VMEM;
on a GPU it is more than an SM's 228 KiB of shared memory at Titans' 4x hidden layer
(K = 64 with a 2x hidden layer already needs 192 KiB before any activations). Measured on
an H100 (BENCHMARKS.md), the GPU body compiles forward and backward only for small states
(`GPU_STATE_LIMIT`), and its bfloat16 forward at 4x hidden takes 2.7x the xla form's time:
it is the reference layout for a GPU design yet to come (the hidden units split over
programs).
"""

import jax
import jax.numpy as jnp
from jax import lax

from memjax.kernels.titans import common
from memjax.ops import titans_memory

# Inputs of one chunk that the outputs are differentiated in, by name.
CHUNK_INPUTS = ("q", "k", "v", "cw", "d", "b", "cs", "e")
# The backward kernels' per-token outputs, in order; the per-layer ones follow them.
GRADS = ("dq", "dk", "dv", "dcw", "dd", "db", "dcs", "de")


def layer_names(depth, *prefixes):
  """Ref names of per-layer arrays: each prefix followed by every layer index."""
  return tuple(f"{p}{i}" for p in prefixes for i in range(depth))


def by_layer(arrays, depth):
  """Flat per-layer kernel outputs (group after group) -> a tuple of per-layer tuples."""
  return tuple(tuple(arrays[g * depth:(g + 1) * depth]) for g in range(len(arrays) // depth))


def backward_grads(out, depth):
  """The backward kernels' outputs as the dict `chunked` expects: `GRADS`, then
  dweights0, dmomentum0 and danchor0 as tuples per layer."""
  grads = dict(zip(GRADS, out[:len(GRADS)]))
  grads.update(zip(("dweights0", "dmomentum0", "danchor0"), by_layer(out[len(GRADS):], depth)))
  return grads


# The largest per-head state (W, S and A of every layer, float32, see above) with which
# the GPU body compiled forward and backward, by input dtype. Measured on an H100 at K = 64
# (Triton's shared memory there: 227 KiB): bfloat16 with a 64-wide hidden layer (96 KiB of
# state) compiled and matched the xla form; with a 256-wide one (384 KiB) the forward
# compiled but the backward asked for 464 KiB of shared memory. float32 at 64 wide: the
# forward compiled, the backward asked for 352 KiB. Sizes between were not tried.
GPU_STATE_LIMIT = {jnp.dtype(jnp.bfloat16): 96 * 1024}


def state_bytes(k: int, hidden: int, depth: int) -> int:
  """Bytes of W, S and A of every layer of one head in float32 (K -> hidden -> ... -> K)."""
  widths = (k,) + (hidden,) * (depth - 1) + (k,)
  return 3 * 4 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def unsupported(q, v, depth: int, hidden: int, loss: str, retention: str, chunk_size: int):
  """Why the MLP-memory kernels cannot run this call, or None if they can."""
  if depth < 2:
    return f"runs the MLP memory (two or more layers) only, got a memory of {depth} layer"
  if (loss, retention) != ("l2", "l2"):
    return f"runs loss='l2' with retention='l2' only, got {loss!r} and {retention!r}"
  if q.shape[-1] not in common.HEAD_DIMS or v.shape[-1] != q.shape[-1]:
    return f"needs K == V in {common.HEAD_DIMS}, got q {q.shape} and v {v.shape}"
  if hidden % 16 or hidden & (hidden - 1):
    return f"needs a power-of-two hidden width >= 16, got {hidden}"
  if chunk_size not in common.CHUNK_SIZES:
    return f"needs chunk_size in {common.CHUNK_SIZES}, got {chunk_size}"
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    return f"needs float32 or bfloat16 inputs, got {q.dtype}"
  size, limit = state_bytes(q.shape[-1], hidden, depth), GPU_STATE_LIMIT.get(q.dtype, 0)
  if jax.default_backend() == "gpu" and size > limit:
    return (f"keeps {size // 1024} KiB of state per head on chip (K {q.shape[-1]}, hidden "
            f"{hidden}, {depth} layers); its GPU body compiled forward and backward with "
            f"at most {limit // 1024} KiB for {q.dtype} inputs")
  return None


_CONTRACT = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}


def _dot(a, b, precise, layout):
  """A 2-D product accumulated in float32: "nn" a b, "nt" a b^T, "tn" a^T b.

  Unlike `memjax.kernels.delta_rule.common.mm`, both operands stay float32 (rounded to
  bfloat16 values when `precise` is False), so the products that differentiating it
  traces (the backward kernel differentiates twice) also multiply two float32 arrays:
  Triton refuses a float32 cotangent times a bfloat16 operand. A float32 product at
  default precision runs on the tensor cores (TF32 on a GPU, which holds bfloat16 values
  exactly; bfloat16 passes on a TPU).
  """
  f32 = jnp.float32
  if precise is False:
    a, b = a.astype(jnp.bfloat16).astype(f32), b.astype(jnp.bfloat16).astype(f32)
    precision = lax.Precision.DEFAULT
  else:
    precision = lax.Precision.HIGHEST if precise is True else precise
  return lax.dot_general(a.astype(f32), b.astype(f32), (_CONTRACT[layout], ((), ())),
                         precision=precision, preferred_element_type=f32)


def _last(vector):
  """The last entry of a [C] vector, as a masked sum: its cotangent is a masked
  broadcast, which every backend lowers (slicing a value is not one of those ops)."""
  rows = lax.broadcasted_iota(jnp.int32, vector.shape, 0)
  return jnp.sum(jnp.where(rows == vector.shape[0] - 1, vector, 0.0))


def _last_row(matrix):
  """The last row [C] of a [C, C] matrix, as a masked sum (see `_last`)."""
  rows = lax.broadcasted_iota(jnp.int32, matrix.shape, 0)
  return jnp.sum(jnp.where(rows == matrix.shape[0] - 1, matrix, 0.0), axis=0)


def _gradient_factors(anchor, k, v, activation, precise):
  """Per-token `(inputs, deltas)` of every layer at the anchor weights (see
  `memjax.ops.titans_memory.gradient_factors`), with the kernels' matmuls."""
  zeros = [jnp.zeros((k.shape[0], a.shape[1]), jnp.float32) for a in anchor]

  def run(shifts):
    apply_layer = lambda i, h: _dot(h, anchor[i], precise, "nn") + shifts[i]
    return titans_memory.compose(apply_layer, k.astype(jnp.float32), len(anchor), activation)

  prediction, pullback, inputs = jax.vjp(run, zeros, has_aux=True)
  (deltas,) = pullback(2.0 * (prediction - v.astype(jnp.float32)))
  return inputs, deltas


def forward_chunk(x, weights, momentum, anchor, activation, precise):
  """Outputs of one chunk and the memory after it.

  Args:
    x: dict of `CHUNK_INPUTS`: q, k, v [C, K]; cw [C, C]; d, b, cs, e [C] (float32 but
      q, k, v).
    weights, momentum, anchor: tuples of float32 [d_in_i, d_out_i], one per layer.
    activation: sigma's name in `memjax.ops.titans_memory.ACTIVATIONS`.
    precise: the `mm` precision (float32 inputs).

  Returns:
    `(y [C, K], new weights, new momentum)` float32.
  """
  cw = x["cw"]
  inputs, deltas = _gradient_factors(anchor, x["k"], x["v"], activation, precise)
  cw_last, d_last, b_last, e_last = _last_row(cw), _last(x["d"]), _last(x["b"]), _last(x["e"])
  new_weights, new_momentum = [], []
  for x_i, g_i, w, s in zip(inputs, deltas, weights, momentum):
    new_weights.append(d_last * w + b_last * s + _dot(x_i, cw_last[:, None] * g_i, precise, "tn"))
    new_momentum.append(e_last * s + _dot(x_i, x["cs"][:, None] * g_i, precise, "tn"))

  def apply_layer(i, h):
    scores = _dot(h, inputs[i], precise, "nt") * cw
    return (x["d"][:, None] * _dot(h, weights[i], precise, "nn")
            + x["b"][:, None] * _dot(h, momentum[i], precise, "nn")
            + _dot(scores, deltas[i], precise, "nn"))

  y, _ = titans_memory.compose(apply_layer, x["q"].astype(jnp.float32), len(weights),
                               activation)
  return y, tuple(new_weights), tuple(new_momentum)


def backward_chunk(x, weights, momentum, anchor, dy, dweights, dmomentum, activation,
                   precise):
  """Cotangents of one chunk's inputs, start state and anchor, recomputing the chunk.

  Args:
    x, weights, momentum, anchor, activation, precise: as in `forward_chunk`.
    dy: [C, K] cotangent of y; dweights, dmomentum: cotangents of the new weights and
      momentum (tuples like `weights`).

  Returns:
    `(dx, dweights0, dmomentum0, danchor)`: dx a dict like x (float32), the rest tuples.
  """
  run = lambda x_, w, s, a: forward_chunk(x_, w, s, a, activation, precise)
  _, pullback = jax.vjp(run, x, weights, momentum, anchor)
  return pullback((dy.astype(jnp.float32), tuple(dweights), tuple(dmomentum)))
