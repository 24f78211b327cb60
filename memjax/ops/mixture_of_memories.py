"""Mixture-of-Memories (MoM, arXiv 2502.13685) over gated-delta-rule memories.

E memories share the read query but have their own keys, values and gates. Token t writes
memory e only when its routing weight `w_te` is nonzero, and reads the mixture of the
memories it is routed to:

    S^e_t = S^e_{t-1}                                                   if w_te = 0,
    S^e_t = exp(g_te) S^e_{t-1} + beta_te k_te (v_te - exp(g_te) S^e_{t-1}^T k_te)^T   else,
    o_t   = sum_e w_te * scale * S^e_t^T q_t.

An always-on shared memory is one more memory whose weight is 1 at every token.

Layouts: q [B, T, H, K]; k [B, T, E, H, K]; v [B, T, E, H, V]; beta, g [B, T, E, H];
weights [B, T, E]; state [B, E, H, K, V] float32.

The fast form needs no gather of each memory's tokens: with `beta = 0` and `g = 0` the
gated delta rule leaves the state exactly unchanged, so the E memories run as E * H heads of
one `delta_rule` call with the gates of unrouted tokens zeroed. It computes every memory at
every token (cost E times one memory, independent of top-k), in exchange for no padding,
no capacity limit and no dropped tokens. The reference is a token-by-token scan that keeps
the old state of unrouted memories explicitly.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from memjax.ops import dispatch
from memjax.ops import validation
from memjax.ops.delta_rule import delta_rule
from memjax.ops.delta_rule import delta_rule_step


def top_k_routing(logits: jax.Array, top_k: int) -> jax.Array:
  """MoM's router: softmax over memories, keep the top k, renormalise them to sum to 1.

  Args:
    logits: router logits [..., M].
    top_k: memories per token, 1 <= top_k <= M.

  Returns:
    float32 weights [..., M]: nonzero exactly at the top_k selected memories (unless a
    softmax probability underflows to 0, in which case that memory is left out), summing
    to 1. With top_k = M they are the softmax itself.
  """
  num_memories = logits.shape[-1]
  if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_memories:
    raise ValueError(f"top_k must be an int in [1, M={num_memories}] (logits shape "
                     f"{tuple(logits.shape)}), got {top_k!r}")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  best, chosen = lax.top_k(probs, top_k)
  best = best / jnp.sum(best, axis=-1, keepdims=True)
  return jnp.sum(jax.nn.one_hot(chosen, num_memories) * best[..., None], axis=-2)


def _check(q, k, v, beta, g, weights, state, lead, state_name):
  """Validates the layouts of the module docstring.

  `lead` names the leading axes: "B, T" for a sequence, "B" for one decoding step;
  `state_name` is the state argument's name in the caller.
  """
  n = len(lead.split(", "))
  if q.ndim != n + 2:
    raise ValueError(f"q must have shape [{lead}, H, K], got {tuple(q.shape)}")
  if k.ndim != n + 3:
    raise ValueError(f"k must have shape [{lead}, E, H, K], got {tuple(k.shape)}")
  for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("weights", weights)):
    validation.check_floating(name, x)
  dims = q.shape[:n]
  h, dk = q.shape[n:]
  if 0 in dims:
    raise ValueError(f"q must hold at least one token, got shape {tuple(q.shape)}")
  e = k.shape[n]
  validation.check_shape("k", k, (*dims, e, h, dk), f"[{lead}, E, H, K] with H, K of q")
  dv = v.shape[-1]
  validation.check_shape("v", v, (*dims, e, h, dv), f"[{lead}, E, H, V] with E, H of k")
  validation.check_shape("beta", beta, (*dims, e, h), f"[{lead}, E, H]")
  if g is not None:
    validation.check_floating("g", g)
    validation.check_shape("g", g, (*dims, e, h), f"[{lead}, E, H]")
  validation.check_shape("weights", weights, (*dims, e), f"[{lead}, E]")
  if state is not None:
    validation.check_shape(state_name, state, (dims[0], e, h, dk, dv), "[B, E, H, K, V]")
    if state.dtype != jnp.float32:
      raise ValueError(f"{state_name} must be float32 (the state is always float32), got "
                       f"{state.dtype}")


def _step(q, k, v, beta, g, weights, state, scale):
  """One token, no checks: q [B, H, K], k [B, E, H, K], ..., state [B, E, H, K, V]."""
  b, e, h, dk = k.shape
  dv = v.shape[-1]
  merge = lambda x: None if x is None else x.reshape(b, e * h, *x.shape[3:])
  q_all = jnp.broadcast_to(q[:, None], k.shape)
  _, written = delta_rule_step(merge(q_all), merge(k), merge(v), merge(beta), merge(g),
                               state=state.reshape(b, e * h, dk, dv), scale=scale)
  # Memories the token is not routed to keep their state, whatever their gates say.
  routed = (weights != 0)[:, :, None, None, None]
  state = jnp.where(routed, written.reshape(state.shape), state)
  reads = scale * jnp.einsum("bhk,behkv->behv", q.astype(jnp.float32), state,
                             precision=lax.Precision.HIGHEST)
  o = jnp.einsum("be,behv->bhv", weights.astype(jnp.float32), reads,
                 precision=lax.Precision.HIGHEST)
  return o.astype(v.dtype), state


def _reference(q, k, v, beta, g, weights, scale, state, chunk_size):
  del chunk_size  # The reference goes token by token.
  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def step(s, x):
    q_t, k_t, v_t, beta_t, g_t, w_t = x
    o_t, s = _step(q_t, k_t, v_t, beta_t, g_t, w_t, s, scale)
    return s, o_t

  final, o = lax.scan(step, state, tuple(map(time_major, (q, k, v, beta, g, weights))))
  return jnp.moveaxis(o, 0, 1), final


def _gated(q, k, v, beta, g, weights, scale, state, chunk_size, implementation):
  """All memories as E * H heads of one delta_rule call, unrouted tokens' gates zeroed."""
  b, t, e, h, dk = k.shape
  dv = v.shape[-1]
  routed = (weights != 0)[..., None]  # [B, T, E, 1]
  beta = jnp.where(routed, beta, 0)
  # g = 0 is no decay: with beta = 0 too, S_t = S_{t-1} exactly.
  g = jnp.zeros(beta.shape, jnp.float32) if g is None else jnp.where(routed, g, 0)
  merge = lambda x: x.reshape(b, t, e * h, *x.shape[4:])
  q_all = jnp.broadcast_to(q[:, :, None], k.shape)
  reads, final = delta_rule(
      merge(q_all), merge(k), merge(v), merge(beta), merge(g), scale=scale,
      initial_state=state.reshape(b, e * h, dk, dv), return_final_state=True,
      chunk_size=chunk_size, implementation=implementation)
  reads = reads.reshape(b, t, e, h, dv).astype(jnp.float32)
  o = jnp.einsum("bte,btehv->bthv", weights.astype(jnp.float32), reads,
                 precision=lax.Precision.HIGHEST)
  return o, final.reshape(state.shape)


# The gated form runs delta_rule with the same implementation name.
_IMPLEMENTATIONS = {"reference": _reference,
                    "xla": functools.partial(_gated, implementation="xla"),
                    "pallas": functools.partial(_gated, implementation="pallas")}


def mixture_of_memories(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: Optional[jax.Array],
    weights: jax.Array,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[jax.Array] = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: Optional[str] = None,
    check_finite: bool = False,
):
  """Routed gated-delta-rule memories over a whole sequence; see the module docstring.

  Args:
    q: read queries [B, T, H, K], shared by the memories.
    k: keys [B, T, E, H, K] (usually L2-normalised).
    v: values [B, T, E, H, V].
    beta: write strengths [B, T, E, H].
    g: log-decays [B, T, E, H] (<= 0), or None for delta-rule memories.
    weights: read weights [B, T, E]; a token writes a memory exactly where its weight is
      nonzero (e.g. `top_k_routing`, plus a column of ones for a shared memory).
    scale: output scale, None for `K ** -0.5`.
    initial_state: [B, E, H, K, V] float32, zeros when None.
    return_final_state: also return the state after the last token.
    chunk_size: chunk length of the chunkwise form.
    implementation: "reference" (token-by-token scan); "xla", "pallas" or None run the
      gated form with that implementation of `delta_rule` (None: its fastest for the
      shapes).
    check_finite: raise a ValueError if an input holds NaN or inf (outside jit only).

  Returns:
    The outputs [B, T, H, V] in the dtype of `v`, and, if `return_final_state`, the final
    state [B, E, H, K, V] float32.
  """
  _check(q, k, v, beta, g, weights, initial_state, "B, T", "initial_state")
  validation.check_chunk_size(chunk_size)
  if check_finite:
    validation.check_all_finite(q=q, k=k, v=v, beta=beta, g=g, weights=weights,
                                initial_state=initial_state)
  b, _, e, h, dk = k.shape
  if scale is None:
    scale = dk ** -0.5
  if initial_state is None:
    initial_state = jnp.zeros((b, e, h, dk, v.shape[-1]), jnp.float32)
  if implementation is None:
    # delta_rule knows which of its implementations takes these shapes fastest.
    impl = functools.partial(_gated, implementation=None)
  else:
    impl = dispatch.choose("mixture_of_memories", implementation, _IMPLEMENTATIONS)
  o, final = impl(q, k, v, beta, g, weights, scale, initial_state, chunk_size)
  o = o.astype(v.dtype)
  return (o, final) if return_final_state else o


def mixture_of_memories_step(q, k, v, beta, g, weights, *, state, scale=None):
  """One token of `mixture_of_memories`, for decoding.

  Args:
    q: query [B, H, K].
    k: keys [B, E, H, K].
    v: values [B, E, H, V].
    beta: write strengths [B, E, H].
    g: log-decays [B, E, H], or None.
    weights: read weights [B, E] (nonzero: the token writes that memory).
    state: [B, E, H, K, V] float32.
    scale: output scale, None for `K ** -0.5`.

  Returns:
    `(o, state)`: the output [B, H, V] in the dtype of `v` and the new float32 state.
  """
  _check(q, k, v, beta, g, weights, state, "B", "state")
  if scale is None:
    scale = q.shape[-1] ** -0.5
  return _step(q, k, v, beta, g, weights, state, scale)
