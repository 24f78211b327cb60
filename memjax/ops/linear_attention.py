"""(Gated) linear attention: `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`.

Layouts follow DESIGN.md: q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] (log-decay <= 0);
state [B, H, K, V] float32.
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


def linear_attention_step(q, k, v, g=None, *, state, scale=None):
  """One token of linear attention, for decoding.

  Args:
    q: query [B, H, K].
    k: key [B, H, K].
    v: value [B, H, V].
    g: log-decay [B, H], or None for no decay.
    state: [B, H, K, V] float32.
    scale: output scale, None for `K ** -0.5`.

  Returns:
    `(o, state)`: the output [B, H, V] in the dtype of `v` and the new float32 state.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  f32 = jnp.float32
  if g is not None:
    state = jnp.exp(g.astype(f32))[..., None, None] * state
  state = state + k.astype(f32)[..., :, None] * v.astype(f32)[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q.astype(f32), state, precision=lax.Precision.HIGHEST)
  return o.astype(v.dtype), state


def _reference(q, k, v, g, scale, state, chunk_size):
  del chunk_size  # The reference goes token by token.
  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def step(s, x):
    q_t, k_t, v_t, g_t = x
    o_t, s = linear_attention_step(q_t, k_t, v_t, g_t, state=s, scale=scale)
    return s, o_t

  final, o = lax.scan(step, state, tuple(map(time_major, (q, k, v, g))))
  return jnp.moveaxis(o, 0, 1), final


def _xla(q, k, v, g, scale, state, chunk_size):
  length = q.shape[1]
  precision = chunking.matmul_precision(v.dtype)
  qc, kc, vc = (chunking.to_chunks(x.astype(jnp.float32), chunk_size) for x in (q, k, v))
  gc = None if g is None else chunking.to_chunks(g, chunk_size)
  gamma, causal = chunking.decays(gc, chunk_size, qc)
  # Intra-chunk part: causal, decay-weighted attention inside each chunk.
  scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, precision=precision) * causal
  intra = jnp.einsum("bhnij,bhnjv->bhniv", scores, vc, precision=precision)
  # Inter-chunk part: each chunk reads the state left by the chunks before it.
  q_decayed = qc * jnp.exp(gamma)[..., None]
  k_decayed = kc * jnp.exp(gamma[..., -1:] - gamma)[..., None]
  chunk_decay = jnp.exp(gamma[..., -1])

  def step(s, x):
    k_d, v_c, decay = x
    s_next = decay[..., None, None] * s + jnp.einsum("bhik,bhiv->bhkv", k_d, v_c,
                                                     precision=precision)
    return s_next, s

  # Only the state recurrence is sequential; the outputs are one batched matmul after it.
  final, starts = chunking.scan_chunks(step, state, (k_decayed, vc, chunk_decay))
  inter = jnp.einsum("bhnik,bhnkv->bhniv", q_decayed, starts, precision=precision)
  return chunking.from_chunks(scale * (inter + intra), length), final


def _pallas(q, k, v, g, scale, state, chunk_size):
  return chunked.on_default_backend(
      q, k, v, None, g, scale=scale, initial_state=state, chunk_size=chunk_size)


_IMPLEMENTATIONS = {"reference": _reference, "xla": _xla, "pallas": _pallas}


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[jax.Array] = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: Optional[str] = None,
    check_finite: bool = False,
):
  """Causal (gated) linear attention over a whole sequence.

  `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`.

  Args:
    q: queries [B, T, H, K].
    k: keys [B, T, H, K].
    v: values [B, T, H, V].
    g: log-decays [B, T, H] (<= 0), or None for no decay.
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
      q, k, v, {"g": g}, scale=scale, initial_state=initial_state, chunk_size=chunk_size,
      check_finite=check_finite)
  impl = dispatch.choose("linear_attention", implementation, _IMPLEMENTATIONS,
                         kernel_common.unsupported(k, v, chunk_size),
                         pallas_slower=kernel_common.slower_than_xla(k))
  o, final = impl(q, k, v, g, scale, state, chunk_size)
  o = o.astype(v.dtype)
  return (o, final) if return_final_state else o
