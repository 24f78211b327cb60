"""Block sizes, support checks and the per-chunk math of the neural-memory kernels.

The kernels run the chunk loop of `memjax.ops.neural_memory` for the linear memory
`M(x) = x W` (W [K, V]) with the l2 loss and l2 retention (the "titans" rule). Everything
that depends on the gates only, the dual-form coefficients of each chunk (see
`memjax.ops.titans_chunked`), is computed by XLA before the kernel:

    cw [C, C]  the weight `-theta_s Q_ts` of token s's gradient in W_t (last row: in the
               chunk-end W);
    cs [C]     the weight `-theta_s P_Cs` of token s's gradient in the chunk-end S;
    d, b, e [C]  D_t, B_t and E_t (the chunk-end uses the last entries).

With those, one chunk with start weights W0, momentum S0 and anchor A (the weights at
which the chunk's gradients are taken: W0, except for a first chunk entered part way) is

    err = 2 (K A - V)                                  (d loss / d prediction, [C, V])
    Y   = diag(d) Q W0 + diag(b) Q S0 + (Q K^T * cw) err
    W1  = d_C W0 + b_C S0 + K^T diag(cw_C) err
    S1  = e_C S0 + K^T diag(cs) err

Every product is column-separable in V, so a program owns a block of V's columns and
carries W, S [K, Vb] on chip from chunk to chunk.

The backward has two passes over the saved chunk-start W0, S0 (and A, which is W0 but for
a first chunk entered part way):

1. `state_grad_chunk` (sequential over the chunks in reverse, parallel over value blocks):
   with the cotangents dW1, dS1 on chip, the cotangent of err,
   `derr = (Q K^T * cw)^T dY + diag(cw_C) K dW1 + diag(cs) K dS1` (so dV = -2 derr), and
   `dA = 2 K^T derr`, `dW0 = Q^T diag(d) dY + d_C dW1 (+ dA)`,
   `dS0 = Q^T diag(b) dY + b_C dW1 + e_C dS1`; it saves each chunk's dW1, dS1 and derr.
2. `input_grads_chunk` (parallel over chunks): dq, dk and the coefficients' cotangents,
   which sum over V.
"""

import dataclasses

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
from jax import lax

from memjax.kernels.delta_rule.common import last_token, mm, mm_nt, mm_tn

CHUNK_SIZES = (16, 32, 64)
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the neural-memory kernels.

  Attributes:
    chunk: tokens per chunk (16, 32 or 64).
    value: columns of the memory (of V) per program; a power of two >= 16 dividing V.
  """
  chunk: int = 64
  value: int = 32


def check_blocks(blocks: BlockSizes, dv: int):
  """Raises a ValueError unless `blocks` tile a value dimension of `dv`."""
  if blocks.chunk not in CHUNK_SIZES:
    raise ValueError(f"blocks.chunk must be one of {CHUNK_SIZES}, got {blocks.chunk}")
  if blocks.value < 16 or dv % blocks.value or blocks.value & (blocks.value - 1):
    raise ValueError(
        f"blocks.value must be a power of two >= 16 dividing V={dv}, got {blocks.value}")


def unsupported(q: jax.Array, v: jax.Array, depth: int, loss: str, retention: str,
                chunk_size: int):
  """Why the kernels cannot run this call, or None if they can."""
  if depth != 1:
    return f"runs the linear memory (one layer) only, got a memory of {depth} layers"
  if (loss, retention) != ("l2", "l2"):
    return f"runs loss='l2' with retention='l2' only, got {loss!r} and {retention!r}"
  if q.shape[-1] not in HEAD_DIMS or v.shape[-1] not in HEAD_DIMS:
    return f"needs head dims K and V in {HEAD_DIMS}, got q {q.shape} and v {v.shape}"
  if chunk_size not in CHUNK_SIZES:
    return f"needs chunk_size in {CHUNK_SIZES}, got {chunk_size}"
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    return f"needs float32 or bfloat16 inputs, got {q.dtype}"
  return None


def _error(k, v, anchor, precise):
  """`2 (K A - V)` [C, Vb] float32: the l2 loss's gradient at each token's prediction."""
  return 2.0 * (mm(k, anchor, precise) - v.astype(jnp.float32))


def forward_chunk(x, weights, momentum, anchor, precise):
  """Outputs of one chunk and the memory after it.

  Args:
    x: the chunk's values: q, k [C, K]; v [C, Vb]; cw [C, C]; cw_last [C] (cw's last
      row); d, b, cs [C]; d_last, b_last, e_last (scalars) — see the module docstring.
    weights, momentum: W0, S0 [K, Vb] float32 at the chunk's start.
    anchor: A [K, Vb] float32, the weights the chunk's gradients are taken at.
    precise: float32 matmuls (float32 inputs).

  Returns:
    `(y [C, Vb], W1, S1)` float32.
  """
  q, k = x["q"], x["k"]
  err = _error(k, x["v"], anchor, precise)
  scores = mm_nt(q, k, precise) * x["cw"]
  y = (x["d"][:, None] * mm(q, weights, precise) + x["b"][:, None] * mm(q, momentum, precise)
       + mm(scores, err, precise))
  new_weights = (x["d_last"] * weights + x["b_last"] * momentum
                 + mm_tn(k, x["cw_last"][:, None] * err, precise))
  new_momentum = x["e_last"] * momentum + mm_tn(k, x["cs"][:, None] * err, precise)
  return y, new_weights, new_momentum


def state_grad_chunk(x, weights, momentum, anchor, dy, dweights, dmomentum, precise):
  """Backward pass 1 for one chunk: the sequential part, what the previous chunk needs.

  Args:
    x: the chunk's values as in `forward_chunk`.
    weights, momentum, anchor: W0, S0 and A [K, Vb] float32 (saved by the forward).
    dy: [C, Vb] cotangent of the outputs.
    dweights, dmomentum: [K, Vb] float32 cotangents of W1 and S1.
    precise: float32 matmuls (float32 inputs).

  Returns:
    `(derr [C, Vb], danchor, dweights0, dmomentum0 [K, Vb])` float32: the cotangent of the
    error signal, of A, and of W0 and S0 through every path but A.
  """
  q, k = x["q"], x["k"]
  dy = dy.astype(jnp.float32)
  scores = mm_nt(q, k, precise) * x["cw"]
  # err reaches Y through the scores, W1 through cw_last and S1 through cs.
  derr = (mm_tn(scores, dy, precise) + x["cw_last"][:, None] * mm(k, dweights, precise)
          + x["cs"][:, None] * mm(k, dmomentum, precise))
  danchor = mm_tn(k, 2.0 * derr, precise)
  dweights0 = mm_tn(q, x["d"][:, None] * dy, precise) + x["d_last"] * dweights
  dmomentum0 = (mm_tn(q, x["b"][:, None] * dy, precise) + x["b_last"] * dweights
                + x["e_last"] * dmomentum)
  return derr, danchor, dweights0, dmomentum0


def input_grads_chunk(load, x, value_dim, value_block, precise):
  """Backward pass 2 for one chunk (parallel over chunks): everything that sums over V,
  one value block at a time.

  Args:
    load: `load(name, cols)` -> the column block `cols` (a `pl.ds`) of the chunk's v, dy,
      derr [C, Vb] and of its weights, momentum, anchor (W0, S0, A) and dweights,
      dmomentum (the cotangents of W1, S1) [K, Vb].
    x: the chunk's q, k [C, K]; cw [C, C]; cw_last, d, b, cs [C] (see `forward_chunk`).
    value_dim: V; value_block: Vb, dividing V.
    precise: float32 matmuls (float32 inputs).

  Returns:
    A dict of float32 cotangents: dq, dk [C, K], dcw [C, C], dd, db, dcs, de [C] (de only
    at the last token, the one E_t the chunk uses; the parts of d_last, b_last and cw_last
    are in the last entries of dd, db and the last row of dcw).
  """
  q, k, cw = x["q"], x["k"], x["cw"]
  chunk, key_dim = q.shape
  f32 = jnp.float32
  dq = jnp.zeros((chunk, key_dim), f32)
  dk = jnp.zeros((chunk, key_dim), f32)
  dscores = jnp.zeros((chunk, chunk), f32)
  to_last_row, dd, db, dcs = (jnp.zeros((chunk,), f32) for _ in range(4))
  to_last = {name: jnp.zeros((), f32) for name in ("d", "b", "e")}
  for j in range(value_dim // value_block):
    cols = pl.ds(j * value_block, value_block)
    weights, momentum = load("weights", cols), load("momentum", cols)
    anchor = load("anchor", cols)
    dweights, dmomentum = load("dweights", cols), load("dmomentum", cols)
    dy, derr = load("dy", cols).astype(f32), load("derr", cols)
    err = _error(k, load("v", cols), anchor, precise)
    k_dweights, k_dmomentum = mm(k, dweights, precise), mm(k, dmomentum, precise)
    dscores = dscores + mm_nt(dy, err, precise)
    to_last_row = to_last_row + jnp.sum(err * k_dweights, axis=1)
    dcs = dcs + jnp.sum(err * k_dmomentum, axis=1)
    dd = dd + jnp.sum(dy * mm(q, weights, precise), axis=1)
    db = db + jnp.sum(dy * mm(q, momentum, precise), axis=1)
    to_last["d"] = to_last["d"] + jnp.sum(weights * dweights)
    to_last["b"] = to_last["b"] + jnp.sum(momentum * dweights)
    to_last["e"] = to_last["e"] + jnp.sum(momentum * dmomentum)
    dq = (dq + mm_nt(x["d"][:, None] * dy, weights, precise)
          + mm_nt(x["b"][:, None] * dy, momentum, precise))
    dk = (dk + mm_nt(x["cw_last"][:, None] * err, dweights, precise)
          + mm_nt(x["cs"][:, None] * err, dmomentum, precise)
          + mm_nt(2.0 * derr, anchor, precise))
  qk = mm_nt(q, k, precise)
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  dqk = dscores * cw
  return dict(
      dq=dq + mm(dqk, k, precise), dk=dk + mm_tn(dqk, q, precise),
      dcw=dscores * qk + jnp.where(rows == chunk - 1, to_last_row[None, :], 0.0),
      dd=dd + last_token(chunk, to_last["d"]), db=db + last_token(chunk, to_last["b"]), dcs=dcs,
      de=last_token(chunk, to_last["e"]))
