"""MixtureOfMemories: the fast path equals the reference with gradients, decoding token by
token equals the full sequence, pieces equal the whole, routing writes only the chosen
memories, the router is trained, and bad arguments raise clear errors."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import nn as mnn
from memjax.models import MIXERS, MixerSettings
from tests.conftest import assert_close

CONFIG = dict(num_memories=3, top_k=2, num_heads=2, head_dim=8, expand_v=2.0, chunk_size=4)


def _init(layer, key, shape=(2, 11, 16)):
  """Random input and parameters. On a CPU a threefry sampler compiles for seconds per
  shape, so the input comes from numpy and the initialisers draw from an "rbg" key."""
  seed = np.asarray(jax.random.key_data(key))
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  params = jax.jit(layer.init)(jax.random.key(int(seed[-1]), impl="rbg"), x)
  return params, x


@pytest.fixture(scope="module")
def layer_params_x():
  """One layer shared by the tests that only read it, with its jitted apply."""
  layer = mnn.MixtureOfMemories(**CONFIG)
  params, x = _init(layer, jax.random.key(np.random.SeedSequence().generate_state(1)[0]))
  return layer, params, x, jax.jit(layer.apply)


def test_fast_path_matches_reference(layer_params_x):
  # Gradients of the two paths are compared in tests/ops/test_mixture_of_memories.py.
  layer, params, x, apply = layer_params_x
  y, state = apply(params, x)
  ref_y, ref_state = jax.jit(layer.clone(implementation="reference").apply)(params, x)
  assert_close(y, ref_y, 1e-5, "outputs")
  assert_close(state.memory, ref_state.memory, 1e-5, "memories")


def test_gradients_reach_the_router_and_every_memory(layer_params_x):
  layer, params, x, _ = layer_params_x
  grad = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x)[0] ** 2)))(params)["params"]
  grad = nn.meta.unbox(grad)
  assert float(jnp.abs(grad["router"]["kernel"]).max()) > 0
  # Each memory's key projection (the shared one last) is trained by its routed tokens.
  k_grad = grad["k_proj"]["kernel"].reshape(16, 4, -1)
  assert bool(jnp.all(jnp.abs(k_grad).max(axis=(0, 2)) > 0))


def test_decode_token_by_token_equals_full_sequence(layer_params_x):
  layer, params, x, apply = layer_params_x
  y, final = apply(params, x)
  assert y.shape == x.shape
  state, ys = layer.init_state(x.shape[0]), []
  for t in range(x.shape[1]):
    y_t, state = apply(params, x[:, t:t + 1], state)
    ys.append(y_t)
  assert_close(jnp.concatenate(ys, 1), y, 1e-5, "outputs")
  for got, want in zip(state, final):
    assert_close(got, want, 1e-5, "state")


def test_two_pieces_equal_whole(layer_params_x):
  _, params, x, apply = layer_params_x
  y, final = apply(params, x)
  y1, state = apply(params, x[:, :6])
  y2, state = apply(params, x[:, 6:], state)
  assert_close(jnp.concatenate([y1, y2], 1), y, 1e-5, "outputs")
  assert_close(state.memory, final.memory, 1e-5, "memories")


def test_state_layout(layer_params_x):
  layer, _, _, _ = layer_params_x
  state = layer.init_state(5)
  assert isinstance(state, mnn.MixtureOfMemoriesState)
  # Three routed memories and the shared one, [B, E, H, K, V].
  assert state.memory.shape == (5, 4, 2, 8, 16) and state.memory.dtype == jnp.float32
  assert state.conv_k.shape == (5, 3, 4 * 2 * 8) and state.conv_v.shape == (5, 3, 4 * 2 * 16)


def test_a_token_writes_only_the_memories_it_is_routed_to(key):
  layer = mnn.MixtureOfMemories(**dict(CONFIG, num_memories=4, top_k=1, shared_memory=False))
  params, x = _init(layer, key, (3, 1, 16))
  start = layer.init_state(3)
  start = start._replace(memory=jnp.ones_like(start.memory))
  (_, state), inter = jax.jit(lambda p, x, s: layer.apply(p, x, s, mutable=["intermediates"]))(
      params, x, start)
  changed = np.any(np.asarray(state.memory != start.memory), axis=(2, 3, 4))  # [B, M]
  chosen = np.argmax(np.asarray(inter["intermediates"]["router_logits"][0][:, 0]), -1)
  np.testing.assert_array_equal(changed, np.eye(4, dtype=bool)[chosen])


@pytest.mark.parametrize("kwargs,shape,match", [
    (dict(top_k=4), (2, 5, 16), r"top_k must be an int in \[1, M=3\]"),
    (dict(), (2, 16), r"x must have shape \[B, T, D\], got \(2, 16\)"),
])
def test_bad_arguments(key, kwargs, shape, match):
  with pytest.raises(ValueError, match=match):
    _init(mnn.MixtureOfMemories(**dict(CONFIG, **kwargs)), key, shape)


@pytest.mark.parametrize("t", [5, 1])
@pytest.mark.parametrize("field,shape", [("memory", (2, 3, 2, 8, 16)), ("conv_k", (2, 3, 48))])
def test_state_of_another_layer_is_rejected(layer_params_x, t, field, shape):
  layer, params, x, apply = layer_params_x
  # This layer has 3 routed memories and a shared one; the state is that of 2 and 1.
  other = layer.clone(num_memories=2).init_state(x.shape[0])
  state = layer.init_state(x.shape[0])._replace(**{field: getattr(other, field)})
  want = getattr(layer.init_state(x.shape[0]), field).shape
  with pytest.raises(ValueError, match=re.escape(f"state.{field} must have shape {want}")
                     + rf".*got {re.escape(str(shape))}"):
    apply(params, x[:, :t], state)


def test_parameters(layer_params_x):
  _, params, _, _ = layer_params_x
  p = nn.meta.unbox(params)["params"]
  shapes = {name: jax.tree.map(jnp.shape, p[name]) for name in p}
  assert shapes["router"] == {"kernel": (16, 3)}
  assert shapes["k_proj"] == {"kernel": (16, 4 * 2 * 8)}  # Each memory, shared one included.
  assert shapes["beta_proj"] == {"kernel": (16, 4 * 2)}
  assert shapes["q_proj"] == {"kernel": (16, 2 * 8)}  # One read query for all memories.
  assert shapes["A_log"] == (2,) and shapes["dt_bias"] == (2,)


def test_mom_is_a_decoder_mixer():
  mixer = MIXERS["mom"].build(MixerSettings(num_heads=2, head_dim=8, expand_v=1.0,
                                            chunk_size=16, implementation="xla", window=None))
  assert isinstance(mixer, mnn.MixtureOfMemories)
  assert (mixer.num_heads, mixer.head_dim, mixer.chunk_size) == (2, 8, 16)
