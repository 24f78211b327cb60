"""Hopfield layers: the pure-retrieval recipe, hflayers' options, pooling, lookup, masks,
learnable scaling and alpha, gradients and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import nn as mnn
from memjax import ops
from tests.conftest import assert_close

STATIC = dict(stored_pattern_as_static=True, state_pattern_as_static=True,
              pattern_projection_as_static=True, normalize_stored_pattern=False,
              normalize_stored_pattern_affine=False, normalize_state_pattern=False,
              normalize_state_pattern_affine=False, normalize_pattern_projection=False,
              normalize_pattern_projection_affine=False, disable_out_projection=True)


def test_pure_retrieval_recipe(key):
  k1, k2 = jax.random.split(key)
  # 128 bits, 10% flipped: a query overlaps its own pattern by ~102 and the others by at
  # most ~40, so retrieval at scaling 8 is exact for every fresh draw (not just most).
  stored = jnp.sign(jax.random.normal(k1, (2, 12, 128)))
  noisy = jnp.where(jax.random.bernoulli(k2, 0.1, stored.shape), -stored, stored)
  sharp = mnn.Hopfield(scaling=8.0, **STATIC)
  params = sharp.init(key, (stored, noisy, stored))
  assert not params  # Nothing to learn.
  np.testing.assert_array_equal(sharp.apply(params, (stored, noisy, stored)), stored)
  soft = mnn.Hopfield(scaling=1e-3, **STATIC)
  mixed = soft.apply({}, (stored, noisy, stored))
  assert_close(mixed, jnp.broadcast_to(stored.mean(1, keepdims=True), stored.shape), 0.1, "mix")


def test_matches_the_op_with_its_projections(key):
  layer = mnn.Hopfield(input_size=8, num_heads=2, update_steps_max=2)
  x = jax.random.normal(key, (2, 5, 8))
  params = layer.init(jax.random.fold_in(key, 1), x)
  p = nn.meta.unbox(params)["params"]
  ln = lambda x, n: ((x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
                     * p[n]["scale"] + p[n]["bias"])
  dense = lambda x, n: x @ p[n]["kernel"] + p[n]["bias"]
  heads = lambda x: x.reshape(2, 5, 2, 4)
  q = heads(dense(ln(x, "norm_state_pattern"), "state_pattern_proj"))
  k = heads(dense(ln(x, "norm_stored_pattern"), "stored_pattern_proj"))
  v = heads(dense(ln(x, "norm_pattern_projection"), "pattern_projection_proj"))
  want = dense(ops.hopfield_retrieval(q, k, v, scaling=0.5, update_steps_max=2).reshape(2, 5, 8),
               "out_proj")
  assert_close(layer.apply(params, x), want, 1e-5, "layer vs op")


def test_shapes_of_the_three_layers(key):
  x = jax.random.normal(key, (3, 7, 12))
  layer = mnn.Hopfield(input_size=12, hidden_size=5, pattern_size=6, output_size=9,
                       num_heads=3)
  y, p = layer.apply(layer.init(key, x), x, return_association=True)
  assert y.shape == (3, 7, 9) and p.shape == (3, 3, 7, 7)
  pool = mnn.HopfieldPooling(input_size=12, quantity=4, num_heads=2)
  y = pool.apply(pool.init(key, x), x)
  assert y.shape == (3, 4 * 12)
  lookup = mnn.HopfieldLayer(input_size=12, quantity=10, lookup_weights_as_separated=True,
                             pattern_projection_size=3)
  params = lookup.init(key, x)
  assert nn.meta.unbox(params)["params"]["target_weights"].shape == (1, 10, 3)
  y, p = lookup.apply(params, x, return_association=True)
  assert y.shape == (3, 7, 12) and p.shape == (3, 1, 7, 10)


def test_options_change_the_parameters(key):
  x = jax.random.normal(key, (2, 4, 8))
  names = lambda **kw: set(mnn.Hopfield(input_size=8, **kw).init(key, x)["params"])
  base = names()
  assert {"state_pattern_proj", "stored_pattern_proj", "out_proj"} <= base
  assert "out_proj" not in names(disable_out_projection=True)
  assert {"bias_stored_pattern", "bias_pattern_projection"} <= names(concat_bias_pattern=True)
  assert "norm_hopfield_space" in names(normalize_hopfield_space=True,
                                         normalize_hopfield_space_affine=True)
  assert "scaling" in names(scaling_trainable=True)
  assert "alpha_logit" in names(normalizer="entmax", alpha_trainable=True)


def test_zero_association_and_padding(key):
  x = jax.random.normal(key, (2, 6, 8))
  padding = jnp.zeros((2, 6), bool).at[:, 4:].set(True)
  layer = mnn.Hopfield(input_size=8, add_zero_association=True)
  params = layer.init(key, x)
  _, p = layer.apply(params, x, padding, return_association=True)
  assert p.shape == (2, 1, 6, 7)
  assert float(jnp.max(p[..., 4:6])) == 0.0 and float(jnp.min(p[..., 6])) > 0.0
  assert_close(jnp.sum(p, -1), jnp.ones((2, 1, 6)), 1e-5, "rows")


def test_pooling_ignores_padded_patterns(key):
  x = jax.random.normal(key, (2, 6, 8))
  padding = jnp.zeros((2, 6), bool).at[:, 4:].set(True)
  pool = mnn.HopfieldPooling(input_size=8, quantity=2)
  params = pool.init(key, x)
  changed = x.at[:, 4:].set(100.0)
  assert_close(pool.apply(params, changed, padding), pool.apply(params, x, padding), 1e-6, "pad")


def test_sparse_layers_and_learnable_alpha_and_scaling_get_gradients(key):
  x = jax.random.normal(key, (2, 5, 8))
  layer = mnn.HopfieldLayer(input_size=8, quantity=6, num_heads=2, normalizer="entmax",
                            alpha_trainable=True, scaling_trainable=True, update_steps_max=1)
  params = nn.meta.unbox(layer.init(key, x))
  grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)["params"]
  for name in ("alpha_logit", "scaling", "lookup_weights"):
    g = np.asarray(grads[name])
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
  _, p = layer.apply(params, x, return_association=True)
  assert_close(jnp.sum(p, -1), jnp.ones(p.shape[:-1]), 1e-5, "entmax rows")


def test_frozen_weights_get_no_gradient(key):
  x = jax.random.normal(key, (2, 5, 8))
  pool = mnn.HopfieldPooling(input_size=8, trainable=False)
  params = nn.meta.unbox(pool.init(key, x))
  grads = jax.grad(lambda p: jnp.sum(pool.apply(p, x) ** 2))(params)["params"]
  assert float(jnp.max(jnp.abs(grads["pooling_weights"]))) == 0.0
  assert float(jnp.max(jnp.abs(grads["out_proj"]["kernel"]))) > 0.0


def test_dropout_needs_not_deterministic(key):
  x = jax.random.normal(key, (2, 5, 8))
  layer = mnn.Hopfield(input_size=8, dropout=0.5)
  params = layer.init(key, x)
  det = layer.apply(params, x)
  drop = layer.apply(params, x, deterministic=False, rngs={"dropout": key})
  assert not np.allclose(det, drop)
  np.testing.assert_array_equal(det, layer.apply(params, x))


@pytest.mark.parametrize("make, inputs, match", [
    (lambda: mnn.Hopfield(input_size=8), lambda x: x[0], "must have 3 dims"),
    (lambda: mnn.Hopfield(input_size=6), lambda x: x, "state_pattern must have depth 6"),
    (lambda: mnn.Hopfield(input_size=8, num_heads=3), lambda x: x, "divisible by num_heads"),
    (lambda: mnn.Hopfield(input_size=8), lambda x: (x, x), "a tuple of 2"),
    (lambda: mnn.Hopfield(input_size=8), lambda x: (x, x[:1], x), "must agree in B"),
    (lambda: mnn.Hopfield(association_activation="nope"), lambda x: x, "association_activation"),
    (lambda: mnn.Hopfield(concat_bias_pattern=True, **STATIC), lambda x: x, "concat_bias"),
])
def test_bad_inputs_raise(key, make, inputs, match):
  x = jax.random.normal(key, (2, 5, 8))
  with pytest.raises(ValueError, match=match):
    make().init(key, inputs(x))


def test_bad_mask_raises(key):
  x = jax.random.normal(key, (2, 5, 8))
  layer = mnn.Hopfield(input_size=8, add_zero_association=True)
  params = layer.init(key, x)
  with pytest.raises(ValueError, match=r"stored_pattern_padding_mask must have shape \[B, S\]"):
    layer.apply(params, x, jnp.zeros((2, 4), bool))
