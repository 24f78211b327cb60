"""Hopfield retrieval and its normalisers: retrieval of stored patterns, metastable states,
energy descent, sparse normalisers, softmax1, masks, fast paths, gradients and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import ops
from memjax.ops import normalizers
from tests.conftest import assert_close

NORMALIZERS = ("softmax", "sparsemax", "entmax", "softmax1")


def _retrieval(*patterns, **kwargs):
  """`ops.hopfield_retrieval` under one jit (eager dispatch of its many small ops is slow)."""
  return jax.jit(functools.partial(ops.hopfield_retrieval, **kwargs))(*patterns)


def _energy(*patterns, **kwargs):
  return jax.jit(functools.partial(ops.hopfield_energy, **kwargs))(*patterns)


def _patterns(key, b=2, l=3, s=11, h=2, k=8, v=5):
  ks = jax.random.split(key, 3)
  return (jax.random.normal(ks[0], (b, l, h, k)), jax.random.normal(ks[1], (b, s, h, k)),
          jax.random.normal(ks[2], (b, s, h, v)))


def _association_float64(state, stored, beta, valid=None):
  """softmax(beta xi X^T) in float64 numpy, [B, H, L, S]."""
  scores = beta * np.einsum("blhk,bshk->bhls", np.asarray(state, np.float64),
                            np.asarray(stored, np.float64))
  if valid is None:
    valid = np.ones(scores.shape, bool)
  shift = np.where(valid, scores, -np.inf).max(-1, keepdims=True)
  e = np.where(valid, np.exp(np.where(valid, scores - np.where(np.isfinite(shift), shift, 0), 0)), 0)
  total = e.sum(-1, keepdims=True)
  return e / np.where(total > 0, total, 1)  # Rows without a valid pattern are zero.


def test_one_step_matches_float64(key):
  state, stored, projection = _patterns(key)
  out, p = _retrieval(state, stored, projection, scaling=0.7,
                                  return_association=True)
  p64 = _association_float64(state, stored, 0.7)
  assert_close(p, p64, 1e-5, "association")
  assert_close(out, np.einsum("bhls,bshv->blhv", p64, np.asarray(projection, np.float64)),
               1e-5, "retrieval")


def test_large_beta_retrieves_the_nearest_stored_pattern(key):
  k1, k2, k3 = jax.random.split(key, 3)
  # Binary patterns far apart by construction: 16 random rows of a 64 x 64 Hadamard matrix
  # with random column signs, pairwise overlap 0. (Independent random signs came within
  # reach of each other now and then, and exact retrieval then failed on its own.)
  hadamard = np.ones((1, 1))
  while hadamard.shape[0] < 64:
    hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
  rows = jax.random.permutation(k1, 64)[:16]
  signs = jnp.sign(jax.random.normal(k2, (64,)))
  stored = (jnp.asarray(hadamard, jnp.float32)[rows] * signs)[None, :, None, :]
  # Each query is its stored pattern with 8 of 64 signs flipped: overlap 48 with it, at
  # most 16 with any other.
  flipped = jax.vmap(lambda k: jax.random.permutation(k, 64)[:8])(jax.random.split(k3, 16))
  flips = jnp.zeros((16, 64), bool).at[jnp.arange(16)[:, None], flipped].set(True)
  state = jnp.where(flips[None, :, None, :], -stored, stored)
  out = _retrieval(state, stored, stored, scaling=8.0)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(stored))


def test_small_beta_gives_a_metastable_mixture(key):
  stored = jnp.sign(jax.random.normal(key, (1, 16, 1, 64)))
  state = stored[:, :1]
  out, p = _retrieval(state, stored, stored, scaling=1e-3, update_steps_max=5,
                                  return_association=True)
  # Near the mean of all patterns, far from the queried one, with nearly even weights.
  assert float(jnp.max(p)) < 2.0 / 16
  assert_close(out[0, 0, 0], jnp.mean(stored[0, :, 0], axis=0), 0.2, "mixture")
  assert float(jnp.linalg.norm(out[0, 0, 0] - stored[0, 0, 0])) > 5.0


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_each_update_lowers_the_energy(key, normalizer):
  state, stored, _ = _patterns(key, s=20, k=6)
  beta = jnp.array([0.5, 2.0])
  kwargs = dict(scaling=beta, normalizer=normalizer, alpha=1.5)
  step = jax.jit(lambda xi: (ops.hopfield_energy(xi, stored, **kwargs),
                             ops.hopfield_retrieval(xi, stored, stored, **kwargs)))
  energies = []
  for _ in range(6):
    energy, state = step(state)
    energies.append(energy)
  steps = np.diff(np.stack(energies), axis=0)
  assert np.all(steps <= 1e-4), f"energy rose by {steps.max()}"
  assert np.any(steps < -1e-3), "the energy never moved"


def test_softmax_energy_is_the_papers(key):
  state, stored, _ = _patterns(key, b=1, l=1, h=1)
  x, xi = np.asarray(stored[0, :, 0], np.float64), np.asarray(state[0, 0, 0], np.float64)
  beta = 0.8
  z = beta * x @ xi
  lse = (np.log(np.exp(z - z.max()).sum()) + z.max()) / beta
  want = -lse + 0.5 * xi @ xi + np.log(len(x)) / beta + 0.5 * np.max(np.sum(x * x, 1))
  got = _energy(state, stored, scaling=beta)
  assert_close(got[0, 0, 0], want, 1e-5, "energy")


def test_until_convergence_reaches_a_fixed_point(key):
  state, stored, _ = _patterns(key, s=20)
  xi = _retrieval(state, stored, stored, scaling=0.5, update_steps_max=None,
                              update_steps_eps=1e-6)
  again = _retrieval(xi, stored, stored, scaling=0.5)
  assert_close(again, xi, 1e-4, "fixed point")
  one_step = _retrieval(state, stored, stored, scaling=0.5)
  assert float(jnp.max(jnp.abs(one_step - xi))) > 1e-3  # The iteration did something.


def test_heads_stop_separately(key):
  state, stored, _ = _patterns(key, b=1, h=2, s=20)
  # Head 0 may take 4 more steps, head 1 none: head 1 equals a one-step retrieval.
  out = _retrieval(state, stored, stored, scaling=0.5, update_steps_max=[4, 0],
                               update_steps_eps=1e-9)
  one = _retrieval(state, stored, stored, scaling=0.5)
  five = _retrieval(state, stored, stored, scaling=0.5, update_steps_max=4,
                                update_steps_eps=1e-9)
  assert_close(out[:, :, 1], one[:, :, 1], 1e-6, "head 1")
  assert_close(out[:, :, 0], five[:, :, 0], 1e-6, "head 0")
  # A loose eps stops after step 1: the same as update_steps_max=1.
  loose = _retrieval(state, stored, stored, scaling=0.5, update_steps_max=4,
                                 update_steps_eps=1e3)
  two = _retrieval(state, stored, stored, scaling=0.5, update_steps_max=1)
  assert_close(loose, two, 1e-6, "eps stop")


@pytest.mark.parametrize("alpha", [1.3, 2.0])
def test_sparse_normalizers_are_sparse_and_sum_to_one(key, alpha):
  z = 3.0 * jax.random.normal(key, (4, 6, 32))
  for p in (normalizers.entmax(z, alpha=alpha), normalizers.sparsemax(z)):
    assert_close(jnp.sum(p, -1), jnp.ones((4, 6)), 1e-5, "row sums")
    assert float(jnp.min(p)) >= 0.0
    assert float(jnp.mean(p == 0.0)) > 0.3, "not sparse"
  assert float(jnp.mean(jax.nn.softmax(z) == 0.0)) == 0.0  # softmax is dense.


def test_entmax_tends_to_softmax_and_is_sparsemax_at_two(key):
  z = 2.0 * jax.random.normal(key, (5, 17))
  errors = [float(jnp.max(jnp.abs(normalizers.entmax(z, alpha=a) - jax.nn.softmax(z))))
            for a in (1.1, 1.01, 1.001)]
  assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors
  assert_close(normalizers.entmax(z, alpha=2.0), normalizers.sparsemax(z), 1e-5, "alpha=2")


def test_sparsemax_matches_a_projection_onto_the_simplex(key):
  z = np.asarray(jax.random.normal(key, (6, 9)), np.float64)
  p = np.asarray(normalizers.sparsemax(jnp.asarray(z, jnp.float32)))
  for row, prow in zip(z, p):
    # The projection is the unique p with p = max(z - tau, 0) summing to one.
    taus = np.sort(row)[::-1]
    for k in range(1, len(row) + 1):
      tau = (taus[:k].sum() - 1) / k
      if np.maximum(row - tau, 0).sum() <= 1 + 1e-12 and (k == len(row) or taus[k] <= tau):
        break
    np.testing.assert_allclose(prow, np.maximum(row - tau, 0), atol=1e-6)


def test_entmax_gradients_match_finite_differences(key):
  k1, k2 = jax.random.split(key)
  z = 2.0 * jax.random.normal(k1, (3, 10))
  w = jax.random.normal(k2, (3, 10))
  f = lambda z, a: jnp.sum(w * normalizers.entmax(z, alpha=a))
  gz, ga = jax.grad(f, argnums=(0, 1))(z, 1.4)
  h = 1e-2
  dz = jax.random.normal(jax.random.fold_in(key, 7), z.shape)
  fd_z = (f(z + h * dz, 1.4) - f(z - h * dz, 1.4)) / (2 * h)
  fd_a = (f(z, 1.4 + h) - f(z, 1.4 - h)) / (2 * h)
  assert abs(float(jnp.sum(gz * dz)) - float(fd_z)) < 2e-2 * (1 + abs(float(fd_z)))
  assert abs(float(ga) - float(fd_a)) < 2e-2 * (1 + abs(float(fd_a)))


def test_softmax1_can_attend_to_nothing(key):
  z = jax.random.normal(key, (4, 8))
  assert_close(normalizers.softmax1(z),
               jax.nn.softmax(jnp.concatenate([z, jnp.zeros((4, 1))], -1))[:, :-1], 1e-6,
               "extra zero score")
  p = normalizers.softmax1(z - 20.0)  # Every score far below zero.
  assert float(jnp.max(jnp.sum(p, -1))) < 1e-7
  state, stored, projection = _patterns(key)
  out = _retrieval(-100 * jnp.abs(state), jnp.abs(stored), projection,
                               normalizer="softmax1")
  assert float(jnp.max(jnp.abs(out))) < 1e-6


@pytest.mark.parametrize("normalizer", ["softmax", "entmax"])
def test_padding_mask_equals_dropping_the_patterns(key, normalizer):
  state, stored, projection = _patterns(key, b=1, s=11)
  padding = jnp.arange(11)[None] >= 7
  kwargs = dict(scaling=0.5, update_steps_max=2, normalizer=normalizer)
  masked = _retrieval(state, stored, projection,
                                  stored_pattern_padding_mask=padding, **kwargs)
  dropped = _retrieval(state, stored[:, :7], projection[:, :7], **kwargs)
  assert_close(masked, dropped, 1e-5, "padding")


def test_association_masks(key):
  state, stored, projection = _patterns(key, l=4, s=6)
  blocked = jax.random.bernoulli(key, 0.4, (4, 6)).at[0].set(True)  # Row 0: nothing allowed.
  _, p = _retrieval(state, stored, projection, association_mask=blocked,
                                return_association=True, scaling=0.3)
  valid = np.broadcast_to(~np.asarray(blocked), p.shape)
  want = _association_float64(state, stored, 0.3, valid)
  assert_close(p, want, 1e-5, "bool mask")
  additive = jnp.where(blocked, -jnp.inf, 0.0)[None, None].repeat(2, 0).repeat(2, 1)
  _, p_add = _retrieval(state, stored, projection, association_mask=additive,
                                    return_association=True, scaling=0.3)
  assert_close(p_add, p, 1e-6, "float mask")


@pytest.mark.parametrize("masks", [False, True])
def test_fast_paths_match_the_reference(key, masks):
  state, stored, projection = _patterns(key, s=37, v=8)
  kwargs = dict(scaling=jnp.array([0.4, 1.3]))
  if masks:
    kwargs["stored_pattern_padding_mask"] = jax.random.bernoulli(key, 0.3, (2, 37))
    kwargs["association_mask"] = jax.random.normal(key, (3, 37))
  ref = _retrieval(state, stored, projection, implementation="reference", **kwargs)
  attention = _retrieval(state, stored, projection, implementation="xla", **kwargs)
  blocks = _retrieval(state, stored, projection, implementation="xla",
                                  key_block_size=8, **kwargs)
  assert_close(attention, ref, 1e-5, "dot_product_attention")
  assert_close(blocks, ref, 1e-5, "key blocks")
  loss = lambda impl, block: lambda s, k, v: jnp.sum(jnp.sin(_retrieval(
      s, k, v, implementation=impl, key_block_size=block, **kwargs)))
  g_ref = jax.grad(loss("reference", None), argnums=(0, 1, 2))(state, stored, projection)
  g_blk = jax.grad(loss("xla", 8), argnums=(0, 1, 2))(state, stored, projection)
  for a, b in zip(g_blk, g_ref):
    assert_close(a, b, 1e-4, "key-block gradients")


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_gradients_are_finite_until_convergence(key, normalizer):
  state, stored, projection = _patterns(key)

  def loss(state, stored, projection, beta, alpha):
    padding = jnp.broadcast_to(jnp.arange(11) > 8, (2, 11))
    out = _retrieval(state, stored, projection, scaling=beta, alpha=alpha,
                                 normalizer=normalizer, update_steps_max=None,
                                 stored_pattern_padding_mask=padding)
    return jnp.sum(out ** 2)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(state, stored, projection,
                                                   jnp.array([0.5, 2.0]), jnp.array([1.3, 1.7]))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert float(jnp.sum(jnp.abs(grads[2]))) > 0


def test_until_convergence_gradient_matches_a_long_unroll(key):
  state, stored, projection = _patterns(key, s=20)
  loss = lambda steps, eps: lambda k, v: jnp.sum(_retrieval(
      state, k, v, scaling=0.5, update_steps_max=steps, update_steps_eps=eps) ** 2)
  implicit = jax.grad(loss(None, 1e-6), argnums=(0, 1))(stored, projection)
  # Some draws contract slowly: 100 steps left a 2% gap in 1 of 40 draws, 400 steps at
  # most 2e-4 in 60.
  unrolled = jax.grad(loss(400, 1e-9), argnums=(0, 1))(stored, projection)
  for a, b in zip(implicit, unrolled):
    assert_close(a, b, 1e-2, "implicit vs unrolled")


def test_dropout_scales_kept_associations(key):
  state, stored, projection = _patterns(key)
  one_draw = functools.partial(ops.hopfield_retrieval, state, stored, projection,
                               dropout_rate=0.5)
  full = _retrieval(state, stored, projection)
  assert not np.allclose(one_draw(dropout_key=key), full)
  # Kept associations are scaled by 1 / (1 - rate), so the mean over many draws is the
  # output without dropout: 1024 draws leave a relative error of about 3%.
  draws = jax.jit(jax.vmap(lambda k: one_draw(dropout_key=k)))(jax.random.split(key, 1024))
  assert_close(draws.mean(0), full, 0.1, "mean over dropout draws")


@pytest.mark.parametrize("bad, match", [
    (dict(state=jnp.zeros((2, 3, 8))), "state must have 4 dims"),
    (dict(stored=jnp.zeros((2, 11, 2, 7))), r"stored must have shape .*\(2, 11, 2, 7\)"),
    (dict(projection=jnp.zeros((2, 10, 2, 5))), r"projection must have shape"),
    (dict(scaling=jnp.ones(3)), r"scaling must be a scalar or have shape \[H\]"),
    (dict(alpha=2.5, normalizer="entmax"), "alpha must lie in"),
    (dict(normalizer="relu"), "normalizer must be one of"),
    (dict(update_steps_max=[1, -1]), "update_steps_max must be"),
    (dict(update_steps_eps=0.0), "update_steps_eps must be positive"),
    (dict(stored_pattern_padding_mask=jnp.zeros((2, 10), bool)),
     r"stored_pattern_padding_mask must have shape \[B, S\]"),
    (dict(association_mask=jnp.zeros((3, 10), bool)), r"association_mask must have shape"),
    (dict(dropout_rate=0.1), "dropout_key"),
    (dict(implementation="pallas"), "not available"),
])
def test_bad_arguments_raise(key, bad, match):
  state, stored, projection = _patterns(key)
  args = dict(state=state, stored=stored, projection=projection)
  args.update({k: v for k, v in bad.items() if k in args})
  kwargs = {k: v for k, v in bad.items() if k not in args}
  with pytest.raises(ValueError, match=match):
    ops.hopfield_retrieval(args["state"], args["stored"], args["projection"], **kwargs)


def test_check_finite(key):
  state, stored, projection = _patterns(key)
  with pytest.raises(ValueError, match="stored holds non-finite"):
    ops.hopfield_retrieval(state, stored.at[0, 0, 0, 0].set(jnp.nan), projection,
                           check_finite=True)
