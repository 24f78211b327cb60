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
carries W, S (and A) [K, Vb] on chip from chunk to chunk. The backward walks the chunks in
reverse with the cotangents of W and S on chip and the saved chunk-start W0, S0.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from memjax.kernels.delta_rule.common import mm, mm_nt, mm_tn

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


def _last(chunk, value):
  """[C] float32: `value` at the chunk's last token, zero elsewhere."""
  rows = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
  return jnp.where(rows == chunk - 1, value, 0.0)


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


def backward_chunk(x, weights, momentum, anchor, dy, dweights, dmomentum, precise):
  """The cotangents of one chunk's inputs, from those of its outputs and end state.

  Args:
    x: the chunk's values as in `forward_chunk`.
    weights, momentum, anchor: W0, S0 and A [K, Vb] float32 (saved by the forward).
    dy: [C, Vb] cotangent of the outputs.
    dweights, dmomentum: [K, Vb] float32 cotangents of W1 and S1.
    precise: float32 matmuls (float32 inputs).

  Returns:
    A dict of float32 cotangents: exact for this value block — dv [C, Vb], dweights,
    dmomentum, danchor [K, Vb] (of W0, S0 and A); partial sums over the value blocks —
    dq, dk [C, K], dcw [C, C], dd, db, dcs, de [C] (de only at the last token, the only
    E_t the chunk uses; the parts of d_last, b_last and cw_last are added to the last
    entries of dd, db and the last row of dcw).
  """
  q, k, cw = x["q"], x["k"], x["cw"]
  chunk = q.shape[0]
  dy = dy.astype(jnp.float32)
  err = _error(k, x["v"], anchor, precise)
  qk = mm_nt(q, k, precise)
  k_dweights = mm(k, dweights, precise)
  k_dmomentum = mm(k, dmomentum, precise)
  # err reaches Y through the scores, W1 through cw_last and S1 through cs.
  derr = (mm_tn(qk * cw, dy, precise) + x["cw_last"][:, None] * k_dweights
          + x["cs"][:, None] * k_dmomentum)
  dscores = mm_nt(dy, err, precise)
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  to_last_row = jnp.sum(err * k_dweights, axis=1)
  dcw = dscores * qk + jnp.where(rows == chunk - 1, to_last_row[None, :], 0.0)
  dqk = dscores * cw
  dy_d = x["d"][:, None] * dy
  dy_b = x["b"][:, None] * dy
  dd = jnp.sum(dy * mm(q, weights, precise), axis=1) + _last(chunk, jnp.sum(weights * dweights))
  db = (jnp.sum(dy * mm(q, momentum, precise), axis=1)
        + _last(chunk, jnp.sum(momentum * dweights)))
  dcs = jnp.sum(err * k_dmomentum, axis=1)
  de = _last(chunk, jnp.sum(momentum * dmomentum))
  dpred = 2.0 * derr
  dq = mm_nt(dy_d, weights, precise) + mm_nt(dy_b, momentum, precise) + mm(dqk, k, precise)
  dk = (mm_tn(dqk, q, precise) + mm_nt(x["cw_last"][:, None] * err, dweights, precise)
        + mm_nt(x["cs"][:, None] * err, dmomentum, precise) + mm_nt(dpred, anchor, precise))
  return dict(
      dv=-dpred, dq=dq, dk=dk, dcw=dcw, dd=dd, db=db, dcs=dcs, de=de,
      danchor=mm_tn(k, dpred, precise),
      dweights=mm_tn(q, dy_d, precise) + x["d_last"] * dweights,
      dmomentum=(mm_tn(q, dy_b, precise) + x["b_last"] * dweights
                 + x["e_last"] * dmomentum))
