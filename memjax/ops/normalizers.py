"""Normalisers of the Hopfield association: scores [..., S] -> weights [..., S].

* ``"softmax"``: the modern Hopfield network of Ramsauer et al. (arXiv 2008.02217).
* ``"sparsemax"``: the Euclidean projection onto the simplex (alpha-entmax at alpha = 2).
* ``"entmax"``: alpha-entmax, the generalized sparse Hopfield model of STanHop, for alpha in
  (1, 2]; alpha may be a traced value and is differentiable, so it can be learned.
* ``"softmax1"``: OutEffHop's `exp(z_i) / (1 + sum_j exp(z_j))` (arXiv 2404.03828), softmax
  with an extra score fixed at zero, so a query can attend to (almost) nothing.

Every normaliser `p = argmax_p <p, z> - Psi(p)` comes with its convex conjugate
`Psi*(z) = <p, z> - Psi(p)`, whose gradient is `p`; the Hopfield energy uses it
(`memjax.ops.hopfield.hopfield_energy`).

Masking: `valid` (True = may be attended) takes entries out of the normalisation; a row with
no valid entry gets all-zero weights (not NaN), so padded queries or fully masked rows give a
zero retrieval. Scores equal to -inf count as invalid too.

All computations run in float32; the weights come back in float32.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

# Bisection halves an interval of width <= 1 each step; 32 steps reach float32 resolution.
_BISECTION_STEPS = 32


def _prepare(z: jax.Array, valid: Optional[jax.Array]):
  """float32 scores, the valid mask (with -inf scores removed) and the max of the valid."""
  z = z.astype(jnp.float32)
  finite = z > -jnp.inf
  valid = finite if valid is None else jnp.logical_and(valid, finite)
  z_max = jnp.max(jnp.where(valid, z, -jnp.inf), axis=-1, keepdims=True)
  # Rows without any valid entry: any finite reference point will do, their weights are 0.
  z_max = jnp.where(jnp.isfinite(z_max), z_max, 0.0)
  return z, valid, z_max


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  return num / jnp.where(den > 0, den, 1.0)


def softmax(z: jax.Array, valid: Optional[jax.Array] = None, alpha=None) -> jax.Array:
  """`exp(z_i) / sum_j exp(z_j)` over the valid entries of the last axis."""
  del alpha
  z, valid, z_max = _prepare(z, valid)
  e = jnp.where(valid, jnp.exp(jnp.where(valid, z - z_max, 0.0)), 0.0)
  return _safe_divide(e, jnp.sum(e, axis=-1, keepdims=True))


def softmax1(z: jax.Array, valid: Optional[jax.Array] = None, alpha=None) -> jax.Array:
  """`exp(z_i) / (1 + sum_j exp(z_j))`: softmax with an extra zero score (OutEffHop)."""
  del alpha
  z, valid, z_max = _prepare(z, valid)
  shift = jnp.maximum(z_max, 0.0)  # The implicit zero score takes part in the max.
  e = jnp.where(valid, jnp.exp(jnp.where(valid, z - shift, 0.0)), 0.0)
  return e / (jnp.exp(-shift) + jnp.sum(e, axis=-1, keepdims=True))


def _entmax_tangent(p, alpha, dz, dalpha):
  """Tangent of alpha-entmax: the Jacobian in z and the derivative in alpha.

  On the support, `p_i^(alpha-1) = (alpha-1) z_i - tau`, so with `s_i = p_i^(2-alpha)`:
  `dp/dz = diag(s) - s s^T / sum(s)` and
  `dp_i/dalpha = (-p_i log p_i + (p_i - s_i / sum(s)) / (alpha-1) - s_i H / sum(s)) / (alpha-1)`
  with `H = -sum_j p_j log p_j` (Correia et al., "Adaptively Sparse Transformers", App. B).
  """
  support = p > 0
  safe_p = jnp.where(support, p, 1.0)
  s = jnp.where(support, safe_p ** (2.0 - alpha), 0.0)
  s_sum = jnp.sum(s, axis=-1, keepdims=True)
  s_hat = _safe_divide(s, s_sum)
  dp = s * dz - s_hat * jnp.sum(s * dz, axis=-1, keepdims=True)
  if dalpha is not None:
    p_log_p = jnp.where(support, p * jnp.log(safe_p), 0.0)
    entropy = -jnp.sum(p_log_p, axis=-1, keepdims=True)
    am1 = alpha - 1.0
    dp_dalpha = (-p_log_p + (p - s_hat) / am1 - s_hat * entropy) / am1
    dp = dp + jnp.where(support, dp_dalpha, 0.0) * dalpha
  return dp


def _entmax_bisect(z, valid, alpha):
  """alpha-entmax of float32 `z` by bisection on the threshold tau (forward only)."""
  _, valid, z_max = _prepare(z, valid)
  am1 = alpha - 1.0
  # Entries below z_max - 1/(alpha-1) are never in the support; filling invalid ones with a
  # value below that keeps every number finite.
  x = am1 * (jnp.where(valid, z, z_max - 2.0 / am1) - z_max)  # max valid entry: 0
  inv = 1.0 / am1
  count = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1).astype(jnp.float32)
  # sum_i [x_i - tau]_+^(1/(alpha-1)) = 1 has its root in [-1, -(1/count)^(alpha-1)].
  lo = jnp.full_like(x[..., :1], -1.0)
  hi = -(1.0 / count) ** am1

  def mass(tau):
    return jnp.sum(jnp.maximum(x - tau, 0.0) ** inv, axis=-1, keepdims=True)

  def bisect(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    too_much = mass(mid) >= 1.0
    return jnp.where(too_much, mid, lo), jnp.where(too_much, hi, mid)

  lo, hi = lax.fori_loop(0, _BISECTION_STEPS, bisect, (lo, hi))
  p = jnp.where(valid, jnp.maximum(x - lo, 0.0) ** inv, 0.0)
  return _safe_divide(p, jnp.sum(p, axis=-1, keepdims=True))


@jax.custom_jvp
def _entmax(z, valid, alpha):
  return _entmax_bisect(z, valid, alpha)


@_entmax.defjvp
def _entmax_jvp(primals, tangents):
  z, valid, alpha = primals
  dz, _, dalpha = tangents
  p = _entmax(z, valid, alpha)
  return p, _entmax_tangent(p, alpha, dz, dalpha)


def entmax(z: jax.Array, valid: Optional[jax.Array] = None, alpha=1.5) -> jax.Array:
  """alpha-entmax: `p_i = [(alpha-1) z_i - tau]_+^(1/(alpha-1))` with `sum_i p_i = 1`.

  Args:
    z: scores [..., S].
    valid: None or a bool mask broadcastable to `z` (True = may be attended).
    alpha: in (1, 2], a float or an array broadcastable to `z[..., :1]`; differentiable.
      alpha -> 1 tends to softmax, alpha = 2 is sparsemax.

  Returns:
    Weights [..., S] float32, each valid row summing to one.
  """
  z = z.astype(jnp.float32)
  valid = jnp.ones(z.shape, bool) if valid is None else jnp.broadcast_to(valid, z.shape)
  alpha = jnp.asarray(alpha, jnp.float32)
  return _entmax(z, valid, alpha)


@jax.custom_jvp
def _sparsemax(z, valid):
  z, valid, z_max = _prepare(z, valid)
  # Entries at or below z_max - 1 never enter the support (tau >= z_max - 1).
  z = jnp.where(valid, z, z_max - 2.0)
  z_sorted = -jnp.sort(-z, axis=-1)
  k = jnp.arange(1, z.shape[-1] + 1, dtype=jnp.float32)
  cumsum = jnp.cumsum(z_sorted, axis=-1)
  in_support = 1.0 + k * z_sorted > cumsum
  size = jnp.sum(in_support, axis=-1, keepdims=True)
  tau = (jnp.take_along_axis(cumsum, size - 1, axis=-1) - 1.0) / size
  return jnp.where(valid, jnp.maximum(z - tau, 0.0), 0.0)


@_sparsemax.defjvp
def _sparsemax_jvp(primals, tangents):
  z, valid = primals
  p = _sparsemax(z, valid)
  return p, _entmax_tangent(p, 2.0, tangents[0], None)


def sparsemax(z: jax.Array, valid: Optional[jax.Array] = None, alpha=None) -> jax.Array:
  """The Euclidean projection of `z` onto the probability simplex (exact, by sorting)."""
  del alpha
  z = z.astype(jnp.float32)
  valid = jnp.ones(z.shape, bool) if valid is None else jnp.broadcast_to(valid, z.shape)
  return _sparsemax(z, valid)


def _tsallis_conjugate(p, z, alpha):
  """`<p, z> - Psi_alpha(p)` with the Tsallis negentropy `(sum p^alpha - 1) / (alpha (alpha-1))`."""
  support = p > 0
  z = jnp.where(support, z.astype(jnp.float32), 0.0)  # 0 * (-inf) would be NaN.
  powered = jnp.sum(jnp.where(support, jnp.where(support, p, 1.0) ** alpha, 0.0), axis=-1,
                    keepdims=True)
  negentropy = (powered - 1.0) / (alpha * (alpha - 1.0))
  return (jnp.sum(p * z, axis=-1, keepdims=True) - negentropy)[..., 0]


def _logsumexp(z, valid):
  z, valid, z_max = _prepare(z, valid)
  total = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, z - z_max, 0.0)), 0.0), axis=-1)
  return jnp.log(total) + z_max[..., 0]


class Normalizer(NamedTuple):
  """A normaliser and its convex conjugate.

  Attributes:
    normalize: `(z [..., S], valid, alpha) -> p [..., S]`.
    conjugate: `(z [..., S], valid, alpha) -> Psi*(z) [...]`, with gradient `p` in `z`.
    uses_alpha: whether `alpha` means anything to it.
  """
  normalize: Callable
  conjugate: Callable
  uses_alpha: bool


NORMALIZERS = {
    "softmax": Normalizer(softmax, lambda z, valid, alpha: _logsumexp(z, valid), False),
    "softmax1": Normalizer(
        softmax1, lambda z, valid, alpha: jnp.logaddexp(0.0, _logsumexp(z, valid)), False),
    "sparsemax": Normalizer(
        sparsemax, lambda z, valid, alpha: _tsallis_conjugate(sparsemax(z, valid), z, 2.0),
        False),
    "entmax": Normalizer(
        entmax, lambda z, valid, alpha: _tsallis_conjugate(entmax(z, valid, alpha), z, alpha),
        True),
}


def get(name: str) -> Normalizer:
  """The normaliser called `name`; a ValueError lists the known names otherwise."""
  if name not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {tuple(NORMALIZERS)}, got {name!r}")
  return NORMALIZERS[name]
