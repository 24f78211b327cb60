"""Associative-memory mixers: decoding token by token equals the full sequence, pieces
equal the whole, implementations agree, and the layer has the paper's parts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import nn as mnn
from tests.conftest import assert_close

MIXERS = [mnn.LinearAttention, mnn.DeltaNet, mnn.GatedDeltaNet]


def _layer_and_input(cls, key, **kwargs):
  layer = cls(num_heads=2, head_dim=8, chunk_size=4, **kwargs)
  x = jax.random.normal(key, (2, 13, 16))
  params = layer.init(jax.random.fold_in(key, 1), x)
  return layer, params, x


@pytest.mark.parametrize("cls", MIXERS)
def test_decode_token_by_token_equals_full_sequence(key, cls):
  layer, params, x = _layer_and_input(cls, key, expand_v=2.0)
  y, final = layer.apply(params, x)
  assert y.shape == x.shape
  state, ys = layer.init_state(x.shape[0]), []
  for t in range(x.shape[1]):
    y_t, state = layer.apply(params, x[:, t:t + 1], state)
    ys.append(y_t)
  assert_close(jnp.concatenate(ys, 1), y, 1e-5, "outputs")
  for got, want in zip(state, final):
    assert_close(got, want, 1e-5, "state")


@pytest.mark.parametrize("cls", MIXERS)
def test_two_pieces_equal_whole(key, cls):
  layer, params, x = _layer_and_input(cls, key)
  y, _ = layer.apply(params, x)
  y1, state = layer.apply(params, x[:, :6])
  y2, _ = layer.apply(params, x[:, 6:], state)
  assert_close(jnp.concatenate([y1, y2], 1), y, 1e-5)


@pytest.mark.parametrize("cls", MIXERS)
def test_implementations_agree_with_gradients(key, cls):
  layer, params, x = _layer_and_input(cls, key)
  loss = lambda impl: lambda p: jnp.sum(layer.clone(implementation=impl).apply(p, x)[0] ** 2)
  ref_value, ref_grad = jax.value_and_grad(loss("reference"))(params)
  value, grad = jax.value_and_grad(loss("xla"))(params)
  assert_close(value, ref_value, 1e-5, "loss")
  for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    assert_close(g, r, 1e-4, "param gradient")


def test_parameters_of_each_variant(key):
  names = {cls: set(_layer_and_input(cls, key)[1]["params"]) for cls in MIXERS}
  common = {"q_proj", "k_proj", "v_proj", "q_conv", "k_conv", "v_conv", "gate_proj",
            "out_norm", "out_proj"}
  assert names[mnn.LinearAttention] == common
  assert names[mnn.DeltaNet] == common | {"beta_proj"}
  assert names[mnn.GatedDeltaNet] == common | {"beta_proj", "a_proj", "A_log", "dt_bias"}


def test_gated_deltanet_decay_is_negative_and_in_mamba2_range(key):
  layer, params, _ = _layer_and_input(mnn.GatedDeltaNet, key)
  params = nn.meta.unbox(params)
  a = jnp.exp(params["params"]["A_log"])
  dt = jax.nn.softplus(params["params"]["dt_bias"])
  assert jnp.all((a >= 1.0) & (a <= 16.0))
  assert jnp.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))


def test_short_convolution_is_causal(key):
  conv = mnn.ShortConvolution(kernel_size=4)
  x = jax.random.normal(key, (1, 10, 3))
  state = conv.init_state(1, 3)
  params = conv.init(key, x, state)
  y, _ = conv.apply(params, x, state)
  y_changed, _ = conv.apply(params, x.at[:, 6].add(1.0), state)
  assert_close(y_changed[:, :6], y[:, :6], 1e-7)  # Earlier outputs do not see token 6.
  assert not jnp.allclose(y_changed[:, 6], y[:, 6])


@pytest.mark.parametrize("length", [1, 2, 3, 10])
def test_short_convolution_equals_the_window_sum_from_its_state(key, length):
  width, channels = 4, 5
  conv = mnn.ShortConvolution(kernel_size=width)
  kx, ks, kp = jax.random.split(key, 3)
  x = jax.random.normal(kx, (2, length, channels))
  state = jax.random.normal(ks, (2, width - 1, channels))
  params = conv.init(kp, x, state)
  y, new_state = conv.apply(params, x, state)
  kernel = np.asarray(nn.meta.unbox(params)["params"]["kernel"])
  window = np.concatenate([np.asarray(state), np.asarray(x)], axis=1)
  pre = np.stack([(window[:, t:t + width] * kernel).sum(axis=1) for t in range(length)], 1)
  assert_close(y, jax.nn.silu(pre), 1e-6)
  assert_close(new_state, window[:, -(width - 1):], 0.0)
