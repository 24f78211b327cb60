"""Modern Hopfield retrieval (Ramsauer et al., "Hopfield Networks is All You Need").

With stored patterns `X` (one per row, [S, K] per head) and a state pattern `xi` [K], one
update is `xi_new = X^T p`, `p = normalize(beta X xi)`; the retrieval returns `p` applied to
the pattern projection (the values) `V` [S, V]. Several updates iterate `xi` in the Hopfield
space (the space of `X`), and only the last association meets `V`, as in hflayers.

Layouts follow DESIGN.md: state patterns [B, L, H, K] (like q), stored patterns [B, S, H, K]
(like k), pattern projections [B, S, H, V] (like v); associations are [B, H, L, S] float32.

Update steps (hflayers' meaning): step 0 always runs; `update_steps_max = n >= 0` allows n
more; after step t >= 1 a head stops once `||p_t - p_{t-1}||_F <= update_steps_eps` (norm
over [L, S]). Stopping is per batch element and head, so one example never changes the
result of another (hflayers stops a head when all batch elements have converged).

Differentiation. With a finite `update_steps_max` the loop is a `lax.scan` of n steps that
keeps a per-(batch, head) "active" mask; a stopped head carries its association unchanged,
so reverse mode differentiates exactly the steps that ran. With `update_steps_max=None`
(until convergence) the forward pass is a `lax.while_loop` that ends when every head has
stopped, and the gradient comes from the implicit function theorem at the fixed point
`xi* = f(xi*)`: the adjoint `u = g + (df/dxi)^T u` is solved by the same kind of iteration.
The fixed point does not depend (locally) on the state it started from, so the initial state
pattern gets a zero gradient there; train with a finite `update_steps_max` when the state
patterns must learn through the retrieval.
"""

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from memjax.ops import dispatch
from memjax.ops import normalizers
from memjax.ops import validation

# Guards against a loop that never meets update_steps_eps in finite precision.
_UNTIL_CONVERGENCE_STEPS_MAX = 1000


def _per_head(name: str, value, num_heads: int) -> jax.Array:
  """A float or an [H] array as float32 [H] (hflayers: "one entry per head")."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return jnp.full((num_heads,), value)
  if value.shape != (num_heads,):
    raise ValueError(
        f"{name} must be a scalar or have shape [H] = ({num_heads},), got {value.shape}")
  return value


def _steps_per_head(update_steps_max, num_heads: int) -> Optional[np.ndarray]:
  """update_steps_max as an int array [H], or None for "until convergence"."""
  if update_steps_max is None:
    return None
  if isinstance(update_steps_max, (int, np.integer)) and not isinstance(update_steps_max, bool):
    return None if update_steps_max < 0 else np.full((num_heads,), int(update_steps_max))
  steps = np.asarray(update_steps_max)
  if steps.shape != (num_heads,) or not np.issubdtype(steps.dtype, np.integer) or np.any(
      steps < 0):
    raise ValueError(
        f"update_steps_max must be None, an int, or {num_heads} non-negative ints (one per "
        f"head; use None to run every head until convergence), got {update_steps_max!r}")
  return steps.astype(np.int32)


def _check_patterns(state, stored, projection):
  for name, x in (("state", state), ("stored", stored), ("projection", projection)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have 4 dims [B, *, H, *], got shape {tuple(x.shape)}")
    validation.check_floating(name, x)
  b, l, h, k = state.shape
  s = stored.shape[1]
  if l < 1 or s < 1:
    raise ValueError(
        f"state and stored need at least one pattern, got shapes {tuple(state.shape)} and "
        f"{tuple(stored.shape)}")
  validation.check_shape("stored", stored, (b, s, h, k), "[B, S, H, K] with B, H, K of state")
  validation.check_shape("projection", projection, (b, s, h, projection.shape[-1]),
                         "[B, S, H, V] with B, H of state and S of stored")


def hopfield_masks(
    stored_pattern_padding_mask: Optional[jax.Array],
    association_mask: Optional[jax.Array],
    shape: Sequence[int],
):
  """Turns hflayers-style masks into the `valid` / `bias` pair of the normalisers.

  Args:
    stored_pattern_padding_mask: None or bool [B, S]; True marks padding (never attended).
    association_mask: None, or [L, S] (every batch element and head) or [B, H, L, S]; bool
      True blocks an association, a float mask is added to the scores (-inf blocks).
    shape: `(B, H, L, S)` of the association.

  Returns:
    `(valid, bias)`: None or bool broadcastable to [B, H, L, S] (True = may be attended),
    and None or a finite float32 bias broadcastable to [B, H, L, S].
  """
  b, h, l, s = shape
  valid, bias = None, None
  if stored_pattern_padding_mask is not None:
    m = jnp.asarray(stored_pattern_padding_mask)
    validation.check_shape("stored_pattern_padding_mask", m, (b, s), "[B, S]")
    if m.dtype != jnp.bool_:
      raise ValueError(f"stored_pattern_padding_mask must be bool, got {m.dtype}")
    valid = jnp.logical_not(m)[:, None, None, :]
  if association_mask is not None:
    m = jnp.asarray(association_mask)
    if m.shape == (l, s):
      m = m[None, None]
    elif m.shape != (b, h, l, s):
      raise ValueError(
          f"association_mask must have shape [L, S] = {(l, s)} or [B, H, L, S] = "
          f"{(b, h, l, s)}, got {tuple(m.shape)}")
    if m.dtype == jnp.bool_:
      allowed = jnp.logical_not(m)
    else:
      validation.check_floating("association_mask", m)
      allowed = m > -jnp.inf
      bias = jnp.where(allowed, m, 0.0).astype(jnp.float32)
    valid = allowed if valid is None else jnp.logical_and(valid, allowed)
  return valid, bias


def _scores(xi, stored, beta, bias):
  """beta * <xi, x_s> (+ bias): [B, L, H, K] x [B, S, H, K] -> [B, H, L, S] float32."""
  scores = jnp.einsum("blhk,bshk->bhls", xi, stored, preferred_element_type=jnp.float32)
  scores = beta[:, None, None] * scores
  return scores if bias is None else scores + bias


def _association(xi, stored, beta, alpha, valid, bias, normalizer):
  return normalizer.normalize(_scores(xi, stored, beta, bias), valid, alpha[:, None, None])


def _retrieve(p, patterns):
  """[B, H, L, S] x [B, S, H, D] -> [B, L, H, D] float32."""
  return jnp.einsum("bhls,bshd->blhd", p, patterns.astype(jnp.float32))


def _change(p_new, p):
  """Frobenius norm of the change of each head's association: [B, H]."""
  return jnp.sqrt(jnp.sum(jnp.square(p_new - p), axis=(-2, -1)))


def _iterate_finite(xi0, stored, beta, alpha, valid, bias, normalizer, steps, eps):
  """Step 0 and up to `steps[h]` more, as a scan of max(steps) with a per-head active mask."""
  p = _association(xi0, stored, beta, alpha, valid, bias, normalizer)
  active = jnp.broadcast_to(jnp.asarray(steps > 0), p.shape[:2])

  def step(carry, t):
    p, active = carry
    p_new = _association(_retrieve(p, stored), stored, beta, alpha, valid, bias, normalizer)
    change = _change(p_new, p)
    p = jnp.where(active[..., None, None], p_new, p)
    active = active & (change > eps) & (t < jnp.asarray(steps))
    return (p, active), None

  n = int(np.max(steps))
  if n > 0:
    (p, _), _ = lax.scan(step, (p, active), jnp.arange(1, n + 1))
  return p


def _solve_fixed_point(normalizer_name, eps, xi0, stored, beta, alpha, bias, valid):
  """Runs the update until every head stops; returns the state whose association is final."""
  normalizer = normalizers.get(normalizer_name)
  assoc = lambda xi: _association(xi, stored, beta, alpha, valid, bias, normalizer)
  b, _, h, _ = xi0.shape

  def cond(carry):
    step, _, _, active = carry
    return jnp.any(active) & (step < _UNTIL_CONVERGENCE_STEPS_MAX)

  def body(carry):
    step, xi, p, active = carry
    xi_new = _retrieve(p, stored)
    p_new = assoc(xi_new)
    change = _change(p_new, p)
    xi = jnp.where(active[:, None, :, None], xi_new, xi)
    p = jnp.where(active[..., None, None], p_new, p)
    return step + 1, xi, p, active & (change > eps)

  xi0 = xi0.astype(jnp.float32)
  carry = (0, xi0, assoc(xi0), jnp.ones((b, h), bool))
  return lax.while_loop(cond, body, carry)[1]


def _update_map(normalizer_name, stored, beta, alpha, bias, valid):
  normalizer = normalizers.get(normalizer_name)
  return lambda xi: _retrieve(
      _association(xi, stored, beta, alpha, valid, bias, normalizer), stored)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))  # The normaliser's name.
def _fixed_point(normalizer_name, eps, xi0, stored, beta, alpha, bias, valid):
  return _solve_fixed_point(normalizer_name, eps, xi0, stored, beta, alpha, bias, valid)


def _fixed_point_fwd(normalizer_name, eps, xi0, stored, beta, alpha, bias, valid):
  xi = _solve_fixed_point(normalizer_name, eps, xi0, stored, beta, alpha, bias, valid)
  return xi, (eps, xi0, xi, stored, beta, alpha, bias, valid)


def _fixed_point_bwd(normalizer_name, residuals, g):
  eps, xi0, xi, stored, beta, alpha, bias, valid = residuals
  f_of_xi = lambda x: _update_map(normalizer_name, stored, beta, alpha, bias, valid)(x)
  _, vjp_xi = jax.vjp(f_of_xi, xi)
  scale = jnp.maximum(jnp.max(jnp.abs(g)), 1e-30)

  # u = g + (df/dxi)^T u by fixed-point iteration: it converges where the forward did, since
  # the forward's fixed point is attracting (spectral radius of df/dxi below one).
  def cond(carry):
    step, _, delta = carry
    return (delta > jnp.min(eps) * scale) & (step < _UNTIL_CONVERGENCE_STEPS_MAX)

  def body(carry):
    step, u, _ = carry
    u_new = g + vjp_xi(u)[0]
    return step + 1, u_new, jnp.max(jnp.abs(u_new - u))

  _, u, _ = lax.while_loop(cond, body, (0, g, jnp.inf))

  def f_of_params(stored, beta, alpha, bias):
    return _update_map(normalizer_name, stored, beta, alpha, bias, valid)(xi)

  _, vjp_params = jax.vjp(f_of_params, stored, beta, alpha, bias)
  d_stored, d_beta, d_alpha, d_bias = vjp_params(u)
  return (None, jnp.zeros_like(xi0), d_stored, d_beta, d_alpha, d_bias, None)


_fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


def _iterate(state, stored, beta, alpha, valid, bias, normalizer_name, steps, eps):
  """The association after the update steps: [B, H, L, S] float32."""
  normalizer = normalizers.get(normalizer_name)
  if steps is None:
    xi = _fixed_point(normalizer_name, eps, state, stored, beta, alpha, bias, valid)
    return _association(xi, stored, beta, alpha, valid, bias, normalizer)
  return _iterate_finite(state, stored, beta, alpha, valid, bias, normalizer, steps, eps)


def _dropout(p, rate, key):
  if rate == 0.0:
    return p
  keep = jax.random.bernoulli(key, 1.0 - rate, p.shape)
  return jnp.where(keep, p / (1.0 - rate), 0.0)


def _reference(args, options):
  """Materialises every association, iterates, applies dropout and the projection."""
  state, stored, projection, beta, alpha, valid, bias = args
  p = _iterate(state, stored, beta, alpha, valid, bias, options["normalizer"],
               options["steps"], options["eps"])
  out = _retrieve(_dropout(p, options["dropout_rate"], options["dropout_key"]), projection)
  return out, p


def _blocked_softmax(q, k, v, valid, bias, block):
  """One softmax retrieval over key blocks (online softmax), never holding [L, S].

  Args:
    q: scaled state patterns [B, L, H, K]; k: [B, S, H, K]; v: [B, S, H, V].
    valid, bias: as from `hopfield_masks` (None or broadcastable to [B, H, L, S]).
    block: key block size.

  Returns:
    [B, L, H, V] float32; rows without a valid stored pattern are zero.
  """
  b, l, h, _ = q.shape
  s = k.shape[1]
  n = -(-s // block)
  pad = n * block - s
  valid = jnp.ones((1, 1, 1, s), bool) if valid is None else valid
  bias = jnp.zeros((1, 1, 1, s), jnp.float32) if bias is None else bias
  valid = jnp.pad(jnp.broadcast_to(valid, valid.shape[:3] + (s,)),
                  [(0, 0)] * 3 + [(0, pad)])  # Padding keys are invalid.
  bias = jnp.pad(jnp.broadcast_to(bias, bias.shape[:3] + (s,)), [(0, 0)] * 3 + [(0, pad)])
  to_blocks = lambda x: jnp.moveaxis(
      jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, n, block, h, x.shape[-1]), 1, 0)
  mask_blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[:3] + (n, block)), 3, 0)

  @jax.checkpoint  # The backward pass recomputes each block instead of storing [L, S].
  def step(carry, xs):
    m, total, acc = carry
    k_blk, v_blk, valid_blk, bias_blk = xs
    scores = jnp.einsum("blhk,bshk->bhls", q, k_blk, preferred_element_type=jnp.float32)
    scores = scores + bias_blk
    blk_max = jnp.max(jnp.where(valid_blk, scores, -jnp.inf), axis=-1, keepdims=True)
    m_new = lax.stop_gradient(jnp.maximum(m, blk_max))  # A shift; its gradient cancels.
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    e = jnp.where(valid_blk, jnp.exp(jnp.where(valid_blk, scores - m_safe, 0.0)), 0.0)
    correction = jnp.exp(m - m_safe)
    total = correction * total + jnp.sum(e, axis=-1, keepdims=True)
    acc = correction * acc + jnp.einsum("bhls,bshv->bhlv", e, v_blk.astype(jnp.float32))
    return (m_new, total, acc), None

  init = (jnp.full((b, h, l, 1), -jnp.inf), jnp.zeros((b, h, l, 1)),
          jnp.zeros((b, h, l, v.shape[-1])))
  xs = (to_blocks(k), to_blocks(v), mask_blocks(valid), mask_blocks(bias))
  (_, total, acc), _ = lax.scan(step, init, xs)
  out = acc / jnp.where(total > 0, total, 1.0)
  return jnp.moveaxis(out, 1, 2)


def _fast_path_allowed(args, options):
  return (options["normalizer"] == "softmax" and options["steps"] is not None
          and int(np.max(options["steps"])) == 0 and options["dropout_rate"] == 0.0
          and not options["return_association"])


def _xla(args, options):
  """One-step softmax without the association: `jax.nn.dot_product_attention` (cuDNN on
  GPUs where it applies) up to `key_block_size` stored patterns, key blocks beyond."""
  if not _fast_path_allowed(args, options):
    return _reference(args, options)
  state, stored, projection, beta, _, valid, bias = args
  q = (state.astype(jnp.float32) * beta[:, None]).astype(state.dtype)
  block = options["key_block_size"]
  s = stored.shape[1]
  if block is not None and s > block:
    return _blocked_softmax(q, stored, projection, valid, bias, block), None
  if projection.shape[-1] != stored.shape[-1] or projection.dtype != stored.dtype:
    return _blocked_softmax(q, stored, projection, valid, bias, s), None
  out = jax.nn.dot_product_attention(q, stored, projection, bias=bias, mask=valid, scale=1.0)
  if valid is not None:
    # dot_product_attention spreads a fully masked row evenly; here such a row retrieves 0.
    any_valid = jnp.any(valid, axis=-1)  # [B|1, H|1, L|1]
    out = jnp.where(jnp.moveaxis(any_valid, 1, 2)[..., None], out, 0.0)
  return out.astype(jnp.float32), None


_IMPLEMENTATIONS = {"reference": _reference, "xla": _xla}


def hopfield_retrieval(
    state: jax.Array,
    stored: jax.Array,
    projection: jax.Array,
    *,
    scaling: Union[float, jax.Array] = 1.0,
    update_steps_max: Optional[Union[int, Sequence[int]]] = 0,
    update_steps_eps: Union[float, jax.Array] = 1e-4,
    normalizer: str = "softmax",
    alpha: Union[float, jax.Array] = 1.5,
    stored_pattern_padding_mask: Optional[jax.Array] = None,
    association_mask: Optional[jax.Array] = None,
    dropout_rate: float = 0.0,
    dropout_key: Optional[jax.Array] = None,
    return_association: bool = False,
    key_block_size: Optional[int] = 1024,
    implementation: Optional[str] = None,
    check_finite: bool = False,
):
  """Modern Hopfield retrieval: `normalize(beta xi X^T)` iterated, then applied to `V`.

  Args:
    state: state patterns xi [B, L, H, K] (the queries).
    stored: stored patterns X [B, S, H, K] (the keys).
    projection: pattern projections V [B, S, H, V] (the values).
    scaling: beta, a float or one per head [H]; may be traced (learnable).
    update_steps_max: 0 = one step; n = up to n more steps; None or negative = until
      convergence; or one non-negative int per head.
    update_steps_eps: > 0, a float or one per head [H]: a head stops once its association
      changes by at most this much (Frobenius norm over [L, S]).
    normalizer: "softmax", "sparsemax", "entmax" or "softmax1" (see `memjax.ops.normalizers`).
    alpha: entmax's alpha in (1, 2], a float or one per head [H]; may be traced (learnable).
      Ignored by the other normalisers.
    stored_pattern_padding_mask: None or bool [B, S]; True marks padding.
    association_mask: None, [L, S] or [B, H, L, S]; bool True blocks, float is added.
    dropout_rate: dropout on the final association (needs `dropout_key` when > 0).
    dropout_key: PRNG key for the dropout.
    return_association: also return the final association (before dropout).
    key_block_size: the fast path runs over key blocks of this size when S exceeds it
      (None: never in blocks).
    implementation: "reference" (materialises every association), "xla" (fast path where
      the options allow: one softmax step, no dropout, no association returned) or None.
    check_finite: raise a ValueError if an input holds NaN or inf (outside jit only).

  Returns:
    The retrieved patterns [B, L, H, V] in the dtype of `projection`, and, if
    `return_association`, the association [B, H, L, S] float32. Rows of the association
    without any valid stored pattern are zero, and so is their retrieval.
  """
  _check_patterns(state, stored, projection)
  b, l, h, _ = state.shape
  s = stored.shape[1]
  norm = normalizers.get(normalizer)
  beta = _per_head("scaling", scaling, h)
  alpha = _per_head("alpha", alpha, h)
  if norm.uses_alpha and not isinstance(alpha, jax.core.Tracer) and not bool(
      jnp.all((alpha > 1.0) & (alpha <= 2.0))):
    raise ValueError(f"alpha must lie in (1, 2], got {alpha}")
  eps = _per_head("update_steps_eps", update_steps_eps, h)
  if not isinstance(eps, jax.core.Tracer) and not bool(jnp.all(eps > 0)):
    raise ValueError(f"update_steps_eps must be positive, got {update_steps_eps!r}")
  steps = _steps_per_head(update_steps_max, h)
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must lie in [0, 1), got {dropout_rate!r}")
  if dropout_rate > 0.0 and dropout_key is None:
    raise ValueError("dropout_rate > 0 needs a dropout_key")
  if key_block_size is not None:
    validation.check_chunk_size(key_block_size)
  valid, bias = hopfield_masks(stored_pattern_padding_mask, association_mask, (b, h, l, s))
  if check_finite:
    validation.check_all_finite(state=state, stored=stored, projection=projection)
  impl = dispatch.choose("hopfield_retrieval", implementation, _IMPLEMENTATIONS)
  options = dict(normalizer=normalizer, steps=steps, eps=eps, dropout_rate=dropout_rate,
                 dropout_key=dropout_key, return_association=return_association,
                 key_block_size=key_block_size)
  out, p = impl((state, stored, projection, beta, alpha, valid, bias), options)
  out = out.astype(projection.dtype)
  return (out, p) if return_association else out


def hopfield_energy(
    state: jax.Array,
    stored: jax.Array,
    *,
    scaling: Union[float, jax.Array] = 1.0,
    normalizer: str = "softmax",
    alpha: Union[float, jax.Array] = 1.5,
    stored_pattern_padding_mask: Optional[jax.Array] = None,
    association_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """The energy that the retrieval update lowers, per state pattern and head.

  `E(xi) = -Psi*(beta X xi) / beta + xi^T xi / 2 + log(N) / beta + M^2 / 2`, where `Psi*` is
  the convex conjugate of the normaliser (softmax: log-sum-exp, which gives the paper's
  `-lse(beta, X xi)`; entmax: the Tsallis conjugate of STanHop; softmax1: lse with an extra
  zero score), N the number of valid stored patterns and M the largest stored-pattern norm.
  The update `xi <- X^T normalize(beta X xi)` is the concave-convex procedure on E, so each
  step lowers it. The constants do not change the dynamics; they make the softmax energy
  non-negative, as in the paper.

  Args:
    state: state patterns [B, L, H, K].
    stored: stored patterns [B, S, H, K].
    scaling, normalizer, alpha, stored_pattern_padding_mask, association_mask: as in
      `hopfield_retrieval`.

  Returns:
    The energy [B, L, H] float32.
  """
  _check_patterns(state, stored, stored)
  b, l, h, _ = state.shape
  s = stored.shape[1]
  norm = normalizers.get(normalizer)
  beta = _per_head("scaling", scaling, h)
  alpha = _per_head("alpha", alpha, h)
  valid, bias = hopfield_masks(stored_pattern_padding_mask, association_mask, (b, h, l, s))
  scores = _scores(state, stored, beta, bias)
  conj = norm.conjugate(scores, valid, alpha[:, None, None])  # [B, H, L]
  xi = state.astype(jnp.float32)
  x = stored.astype(jnp.float32)
  valid_full = jnp.ones(scores.shape, bool) if valid is None else jnp.broadcast_to(
      valid, scores.shape)
  count = jnp.sum(valid_full, axis=-1)
  norms = jnp.where(valid_full, jnp.moveaxis(jnp.sum(x * x, axis=-1), 1, 2)[:, :, None, :], 0.0)
  radius2 = jnp.max(norms, axis=-1)
  b_ = beta[:, None]
  energy = -conj / b_ + jnp.log(jnp.maximum(count, 1)) / b_ + 0.5 * radius2
  return jnp.moveaxis(energy, 1, 2) + 0.5 * jnp.sum(xi * xi, axis=-1)
