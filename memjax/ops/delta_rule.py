"""The gated delta rule (Gated DeltaNet) and, with `g=None`, the delta rule (DeltaNet).

`S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T`,
`o_t = scale * S_t^T q_t`.

Layouts follow DESIGN.md: q, k [B, T, H, K]; v [B, T, H, V]; beta, g [B, T, H];
state [B, H, K, V] float32.

The chunkwise form ("xla") follows the WY / UT-transform formulation of the DeltaNet and
Gated DeltaNet papers. Inside a chunk with state S0 at its start and cumulative log-decay
gamma_t, the state is `S_t = exp(gamma_t) S0 + sum_{j<=t} exp(gamma_t - gamma_j) k_j u_j^T`
with pseudo-values u that solve the unit lower-triangular system

    (I + L) U = diag(beta) (V - diag(exp(gamma)) K S0),
    L_tj = beta_t exp(gamma_t - gamma_j) k_t . k_j   for j < t.

Writing `U = U_pre - W S0` with `U_pre = (I + L)^-1 diag(beta) V` and
`W = (I + L)^-1 diag(beta exp(gamma)) K` leaves only matmuls once S0 is known, and S0 is
carried across chunks by a short scan.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from memjax.kernels.delta_rule import chunked
from memjax.kernels.delta_rule import common as kernel_common
from memjax.ops import chunking
from memjax.ops import dispatch
from memjax.ops import validation


def delta_rule_step(q, k, v, beta, g=None, *, state, scale=None):
  """One token of the (gated) delta rule, for decoding.

  Args:
    q: query [B, H, K].
    k: key [B, H, K].
    v: value [B, H, V].
    beta: write strength [B, H].
    g: log-decay [B, H], or None for the plain delta rule.
    state: [B, H, K, V] float32.
    scale: output scale, None for `K ** -0.5`.

  Returns:
    `(o, state)`: the output [B, H, V] in the dtype of `v` and the new float32 state.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  f32 = jnp.float32
  hi = lax.Precision.HIGHEST
  k32, v32 = k.astype(f32), v.astype(f32)
  if g is not None:
    state = jnp.exp(g.astype(f32))[..., None, None] * state
  prediction = jnp.einsum("bhk,bhkv->bhv", k32, state, precision=hi)
  delta = beta.astype(f32)[..., None] * (v32 - prediction)
  state = state + k32[..., :, None] * delta[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q.astype(f32), state, precision=hi)
  return o.astype(v.dtype), state


def _reference(q, k, v, beta, g, scale, state, chunk_size):
  del chunk_size  # The reference goes token by token.
  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def step(s, x):
    q_t, k_t, v_t, beta_t, g_t = x
    o_t, s = delta_rule_step(q_t, k_t, v_t, beta_t, g_t, state=s, scale=scale)
    return s, o_t

  final, o = lax.scan(step, state, tuple(map(time_major, (q, k, v, beta, g))))
  return jnp.moveaxis(o, 0, 1), final


def _xla(q, k, v, beta, g, scale, state, chunk_size):
  length = q.shape[1]
  precision = chunking.matmul_precision(v.dtype)
  qc, kc, vc = (chunking.to_chunks(x.astype(jnp.float32), chunk_size) for x in (q, k, v))
  bc = chunking.to_chunks(beta.astype(jnp.float32), chunk_size)
  gc = None if g is None else chunking.to_chunks(g, chunk_size)
  gamma, causal = chunking.decays(gc, chunk_size, qc)

  # UT transform: one inverse of the unit lower-triangular I + L gives U_pre and W.
  strictly_causal = causal * (1.0 - jnp.eye(chunk_size, dtype=causal.dtype))
  kk = jnp.einsum("bhnik,bhnjk->bhnij", kc, kc, precision=precision)
  inverse = chunking.invert_unit_lower(bc[..., :, None] * kk * strictly_causal)
  u_pre = jnp.einsum("bhnij,bhnjv->bhniv", inverse, bc[..., None] * vc, precision=precision)
  w = jnp.einsum("bhnij,bhnjk->bhnik", inverse, (bc * jnp.exp(gamma))[..., None] * kc,
                 precision=precision)

  q_decayed = qc * jnp.exp(gamma)[..., None]
  k_decayed = kc * jnp.exp(gamma[..., -1:] - gamma)[..., None]
  chunk_decay = jnp.exp(gamma[..., -1])

  def step(s, x):
    u_p, w_c, k_d, decay = x
    u = u_p - jnp.einsum("bhik,bhkv->bhiv", w_c, s, precision=precision)
    s_next = decay[..., None, None] * s + jnp.einsum("bhik,bhiv->bhkv", k_d, u,
                                                     precision=precision)
    return s_next, (s, u)

  # Only the state recurrence is sequential; the outputs are one batched matmul after it.
  final, (starts, u) = chunking.scan_chunks(step, state, (u_pre, w, k_decayed, chunk_decay))
  inter = jnp.einsum("bhnik,bhnkv->bhniv", q_decayed, starts, precision=precision)
  scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, precision=precision) * causal
  intra = jnp.einsum("bhnij,bhnjv->bhniv", scores, u, precision=precision)
  return chunking.from_chunks(scale * (inter + intra), length), final


def _pallas(q, k, v, beta, g, scale, state, chunk_size):
  return chunked.on_default_backend(
      q, k, v, beta, g, scale=scale, initial_state=state, chunk_size=chunk_size)


_IMPLEMENTATIONS = {"reference": _reference, "xla": _xla, "pallas": _pallas}


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[jax.Array] = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: Optional[str] = None,
    check_finite: bool = False,
):
  """The gated delta rule over a whole sequence (`g=None`: the delta rule).

  Args:
    q: queries [B, T, H, K].
    k: keys [B, T, H, K] (usually L2-normalised, which keeps the update stable).
    v: values [B, T, H, V].
    beta: write strengths [B, T, H], usually in (0, 1).
    g: log-decays [B, T, H] (<= 0), or None for DeltaNet.
    scale: output scale, None for `K ** -0.5`.
    initial_state: [B, H, K, V] float32, zeros when None.
    return_final_state: also return the state after the last token.
    chunk_size: chunk length of the chunkwise form (any positive int; T need not be a
      multiple of it).
    implementation: "reference", "xla", "pallas" or None (the kernel on GPU/TPU for the
      shapes it supports, except float32 inputs on a GPU, else "xla").
    check_finite: raise a ValueError if an input holds NaN or inf (outside jit only).

  Returns:
    The outputs [B, T, H, V] in the dtype of `v`, and, if `return_final_state`, the final
    state [B, H, K, V] float32.
  """
  scale, state = validation.prepare_memory_call(
      q, k, v, {"beta": beta, "g": g}, scale=scale, initial_state=initial_state,
      chunk_size=chunk_size, check_finite=check_finite)
  impl = dispatch.choose("delta_rule", implementation, _IMPLEMENTATIONS,
                         kernel_common.unsupported(k, v, chunk_size),
                         pallas_slower=kernel_common.slower_than_xla(k))
  o, final = impl(q, k, v, beta, g, scale, state, chunk_size)
  o = o.astype(v.dtype)
  return (o, final) if return_final_state else o
