"""The chunkwise-parallel ("xla") form of the neural memory: the dual form.

Inside a chunk whose gradients are all taken at the chunk-start weights, the gradient of
token s with respect to a layer is a rank-1 outer product `G_s = x_s^T delta_s`. With decay
`a_t = 1 - alpha_t`, the per-token update

    S_t = eta_t S_{t-1} - theta_t G_t,        W_t = a_t W_{t-1} + m_t S_t

(m_t = 1 for real tokens; padding tokens have m = theta = 0 and eta = a = 1, so they change
nothing) unrolls from the chunk's starting (W0, S0) to

    S_t = E_t S0 - sum_{s<=t} theta_s P_ts G_s,
    W_t = D_t W0 + B_t S0 - sum_{s<=t} theta_s Q_ts G_s,

    P_ts = prod_{s<i<=t} eta_i,              E_t = prod_{i<=t} eta_i,
    Q_ts = sum_{s<=r<=t} (prod_{r<i<=t} a_i) m_r P_rs,
    B_t  = sum_{r<=t} (prod_{r<i<=t} a_i) m_r E_r,      D_t = prod_{i<=t} a_i.

The coefficients are range products of the gates, exponentiated differences of cumulative
log gates with a count of zero gates (`_range_products`), and one matmul (`_coefficients`):
elementwise work and a [C, C] product per chunk, also in the backward.
A layer's output for an input h_t is then
`h_t W_t = D_t h_t W0 + B_t h_t S0 - sum_s theta_s Q_ts (h_t . x_s) delta_s`: matmuls, and
the per-token weights are never built. The chunk-end (W, S) are the same sums at t = C.
Only the carry from chunk to chunk is sequential; the retrieval runs batched afterwards.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from memjax.ops import chunking
from memjax.ops import miras
from memjax.ops import titans_memory


def _align(x: jax.Array, offset: Optional[jax.Array], length: int, fill: float) -> jax.Array:
  """Places x [B, T, ...] at [offset, offset + T) of a [B, length, ...] array filled with `fill`.

  `offset` (the tokens already seen of the current chunk) is a traced value, so the
  placement is a dynamic slice of a padded array; None means 0.
  """
  t = x.shape[1]
  if offset is None:
    return _pad_time(x, 0, length - t, fill)
  room = length - t  # >= chunk_size - 1 >= offset
  padded = _pad_time(x, room, length - t, fill)
  return lax.dynamic_slice_in_dim(padded, room - offset, length, axis=1)


def _pad_time(x, front, back, fill):
  pad = [(0, 0)] * x.ndim
  pad[1] = (front, back)
  return jnp.pad(x, pad, constant_values=fill)


@jax.custom_vjp
def _range_products(gate):
  """The products of gates over token ranges, exact where a gate is 0.

  Args:
    gate: [..., C] float32 in [0, 1].

  Returns:
    `(P, E)`: P [..., C, C] with `P_ts = prod_{s<i<=t} gate_i` (1 on the diagonal, 0 above
    it); E [..., C] with `E_t = prod_{i<=t} gate_i`.
  """
  return _range_products_fwd(gate)[0]


def _range_products_fwd(gate):
  # A range holds a zero gate where the count of zeros changes over it: its product is 0.
  # Elsewhere it is exp of a difference of cumulative logs of the nonzero gates, taken
  # only where the range is causal and zero-free, so nothing overflows. Gates below the
  # smallest normal float32 count as 0 (GPUs flush them to 0, whose log is -inf). One
  # elementwise pass over [C, C]: a cumulative product down its columns lowers to a scan
  # of about a dozen passes, forward and backward.
  c = gate.shape[-1]
  zero = gate < jnp.finfo(jnp.float32).tiny
  logs = jnp.log(jnp.where(zero, 1.0, gate))
  hi = jnp.cumsum(logs, axis=-1)
  # What the float32 sums rounded away, summed apart: after a small gate the sums are
  # large, and their plain differences lose a range's product to cancellation (gates of
  # 1e-30 among gates in (0.5, 1), C = 64: relative errors up to 8e-5; with `lo` 2e-6,
  # the cumulative product's 7e-7).
  steps = hi - jnp.pad(hi[..., :-1], [(0, 0)] * (hi.ndim - 1) + [(1, 0)])
  lo = jnp.cumsum(logs - steps, axis=-1)
  zeros = jnp.cumsum(zero.astype(jnp.int32), axis=-1)
  causal = jnp.tril(jnp.ones((c, c), bool))
  live = causal & (zeros[..., :, None] == zeros[..., None, :])
  diff = (hi[..., :, None] - hi[..., None, :]) + (lo[..., :, None] - lo[..., None, :])
  p = jnp.exp(jnp.where(live, diff, -jnp.inf))
  e = jnp.where(zeros == 0, jnp.exp(hi + lo), 0.0)
  return (p, e), (p, e)


def _range_products_bwd(res, cotangents):
  # d P_ts / d gate_j = P_tj P_{j-1,s} for s < j <= t: the range split around j, without
  # gate j, so a gate of 0 gets the product of the others, as in the token-by-token
  # recurrence (the log differences alone would give it 0). E is the column s = -1
  # (E_{-1} = 1). Summed over t and s: one [C, C] matmul.
  p, e = res
  g_p, g_e = cotangents
  pad = [(0, 0)] * (p.ndim - 2)
  p_before = jnp.pad(p[..., :-1, :], pad + [(1, 0), (0, 0)])  # row j: P_{j-1,s}; row 0: 0
  e_before = jnp.pad(e[..., :-1], pad + [(1, 0)], constant_values=1.0)  # E_{j-1}
  split = jnp.einsum("...ts,...js->...tj", g_p, p_before, precision=lax.Precision.HIGHEST)
  split = split + g_e[..., :, None] * e_before[..., None, :]
  return (jnp.sum(p * split, axis=-2),)


_range_products.defvjp(_range_products_fwd, _range_products_bwd)


def _coefficients(eta, decay, mask):
  """The dual-form coefficients of every chunk (see the module docstring).

  Products over token ranges come from `_range_products`, so a gate of exactly 0 (eta =
  None is all zeros; alpha = 1) cuts every range that holds it, and the gradient of that
  gate is the product of the others, as in the token-by-token recurrence. Q and B are one
  matmul each: `Q = A diag(m) P`, `B = A (m * E)` with `A_tr = prod_{r<i<=t} a_i`.

  Args:
    eta, decay, mask: [B, H, N, C] momentum, 1 - alpha and the real-token mask.

  Returns:
    `(P, Q, E, B, D)`: P, Q [B, H, N, C, C] (rows t, columns s); E, B, D [B, H, N, C].
  """
  hi = lax.Precision.HIGHEST
  p, e = _range_products(eta)
  a, d = _range_products(decay)
  q = jnp.einsum("...tr,...rs->...ts", a, mask[..., None] * p, precision=hi)
  b = jnp.einsum("...tr,...r->...t", a, mask * e, precision=hi)
  return p, q, e, b, d


class Chunks(NamedTuple):
  """A sequence placed in chunks, with the dual-form coefficients of every chunk.

  Attributes:
    q, k: [B, H, N, C, K] and v [B, H, N, C, V], in the inputs' dtype (zeros where no
      token is).
    huber_delta: [B, H, N, C] float32 (ones where unused).
    mask: [B, H, N, C] float32, 1 for real tokens.
    coef_w: [B, H, N, C, C] float32, `-theta_s Q_ts`: the weight of token s's gradient in
      W_t (row t, column s); its last row is the weight in the chunk-end W.
    coef_s_end: [B, H, N, C] float32, `-theta_s P_Cs`: the weight in the chunk-end S.
    e, b, d: [B, H, N, C] float32, `E_t`, `B_t`, `D_t` of the module docstring.
    complete: [B, H, N] bool, the chunk's last token is real (the chunk ends in the
      sequence).
    offset: tokens of the first chunk already seen before this call (a traced int32), or
      None when the state is known to sit at a chunk start.
    length: the placed length N * C.
  """
  q: jax.Array
  k: jax.Array
  v: jax.Array
  huber_delta: jax.Array
  mask: jax.Array
  coef_w: jax.Array
  coef_s_end: jax.Array
  e: jax.Array
  b: jax.Array
  d: jax.Array
  complete: jax.Array
  offset: Optional[jax.Array]
  length: int


def to_chunks(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, fresh) -> Chunks:
  """Places the sequence in chunks (after the state's partly seen chunk, if any) and
  computes every chunk's coefficients. Arguments as in `chunked`."""
  b, t, h, _ = q.shape
  c = chunk_size
  f32 = jnp.float32
  offset = None if fresh else state.position
  length = c * -(-(t if fresh else t + c - 1) // c)
  align = lambda x, fill: chunking.to_chunks(_align(x, offset, length, fill), c)
  gate = lambda x, default, fill: align(
      jnp.full((b, t, h), default, f32) if x is None else x.astype(f32), fill)
  mask = gate(None, 1.0, 0.0)
  theta_c = gate(theta, 0.0, 0.0)
  decay = align(1.0 - (jnp.zeros((b, t, h)) if alpha is None else alpha.astype(f32)), 1.0)
  p, qq, e, bb, d = _coefficients(gate(eta, 0.0, 1.0), decay, mask)
  return Chunks(
      q=align(q, 0.0), k=align(k, 0.0), v=align(v, 0.0),
      huber_delta=gate(huber_delta, 1.0, 1.0), mask=mask,
      coef_w=-theta_c[..., None, :] * qq, coef_s_end=-theta_c * p[..., -1, :],
      e=e, b=bb, d=d, complete=mask[..., -1] > 0, offset=offset, length=length)


def from_chunks(y: jax.Array, chunks: Chunks, t: int) -> jax.Array:
  """The outputs [B, H, N, C, V] of the placed sequence back as [B, T, H, V]."""
  y = chunking.from_chunks(y, chunks.length)
  if chunks.offset is not None:
    y = lax.dynamic_slice_in_dim(y, chunks.offset, t, axis=1)
  return y


def next_position(chunks: Chunks, t: int, chunk_size: int) -> jax.Array:
  """int32 []: tokens seen of the current chunk after this call's t tokens."""
  if chunks.offset is None:
    return jnp.asarray(t % chunk_size, jnp.int32)
  return (chunks.offset + t) % chunk_size


def chunked(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, rule, activation,
            fresh):
  """The neural memory over a sequence in the dual form.

  Arguments as in `_reference` of `memjax.ops.titans`, plus `fresh`: the state is known to
  sit at a chunk start (position 0), so no room for a partly seen chunk is needed.

  Returns:
    `(y [B, T, H, V] float32, (weights, momentum, anchor, accumulator, position))`.
  """
  t = q.shape[1]
  precision = chunking.matmul_precision(v.dtype)
  chunks = to_chunks(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, fresh)
  f32 = jnp.float32
  qc, kc, vc = (x.astype(f32) for x in (chunks.q, chunks.k, chunks.v))
  coef_w, d, bb = chunks.coef_w, chunks.d, chunks.b
  complete = chunks.complete

  def step(carry, xs):
    weights, momentum, anchor, acc = carry
    k_n, v_n, delta_n, cw_end, cs_end, e_end, b_end, d_end, done = xs
    error = lambda pred: miras.error_signal(rule, pred, v_n, delta_n)
    inputs, deltas = titans_memory.gradient_factors(anchor, k_n, error, activation, precision)
    scale = lambda x: x[..., None, None]
    new_w, new_s, new_acc = [], [], []
    for i, (x_i, g_i) in enumerate(zip(inputs, deltas)):
      to_w = jnp.einsum("bhsd,bhse->bhde", x_i, cw_end[..., None] * g_i, precision=precision)
      to_s = jnp.einsum("bhsd,bhse->bhde", x_i, cs_end[..., None] * g_i, precision=precision)
      new_s.append(scale(e_end) * momentum[i] + to_s)
      new_w.append(scale(d_end) * weights[i] + scale(b_end) * momentum[i] + to_w)
      if acc is not None:
        new_acc.append(scale(d_end) * acc[i] + scale(b_end) * momentum[i] + to_w)
    if acc is not None:
      # The non-linear retention is applied where a chunk ends.
      new_w = [jnp.where(scale(done), miras.retention_map(rule, a), w)
               for a, w in zip(new_acc, new_w)]
    new_anchor = [jnp.where(scale(done), w, a) for w, a in zip(new_w, anchor)]
    carry = (tuple(new_w), tuple(new_s), tuple(new_anchor),
             None if acc is None else tuple(new_acc))
    return carry, (weights, momentum, inputs, deltas)

  xs = (kc, vc, chunks.huber_delta, coef_w[..., -1, :], chunks.coef_s_end,
        chunks.e[..., -1], bb[..., -1], d[..., -1], complete)
  carry = (state.weights, state.momentum, state.anchor, state.accumulator)
  # Rematerialised: the backward keeps only each chunk's starting carry and redoes the
  # chunk's memory forward and vjp, instead of storing their per-chunk intermediates
  # (B4-T4096-dim512-heads8 MLP memory, fp32: XLA's forward+backward buffers 6.3 -> 3.9 GB).
  (weights, momentum, anchor, acc), (w0, s0, inputs, deltas) = lax.scan(
      jax.checkpoint(step), carry, tuple(jnp.moveaxis(x, 2, 0) for x in xs))
  to_chunk_axis = lambda x: jnp.moveaxis(x, 0, 2)
  w0, s0, inputs, deltas = jax.tree.map(to_chunk_axis, (w0, s0, inputs, deltas))

  def apply_layer(i, x):
    mm = lambda a, bmat: jnp.matmul(a, bmat, precision=precision)
    base = d[..., None] * mm(x, w0[i]) + bb[..., None] * mm(x, s0[i])
    scores = mm(x, jnp.swapaxes(inputs[i], -1, -2)) * coef_w
    return base + mm(scores, deltas[i])

  y, _ = titans_memory.compose(apply_layer, qc, len(w0), activation)
  if acc is not None:
    # The last token of a finished chunk reads the mapped weights that the next chunk
    # starts from (so chunk_size = 1 is the per-token rule W_t = phi(A_t)).
    next_start = [jnp.concatenate([w[:, :, 1:], f[:, :, None]], axis=2)
                  for w, f in zip(w0, weights)]
    y_last, _ = titans_memory.forward(next_start, qc[..., -1:, :], activation, precision)
    y = y.at[..., -1, :].set(jnp.where(complete[..., None], y_last[..., 0, :], y[..., -1, :]))

  y = from_chunks(y, chunks, t)
  return y, (weights, momentum, anchor, acc, next_position(chunks, t, chunk_size))
