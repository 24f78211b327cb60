"""NeuralMemory (the Titans LMM layer): decoding token by token equals the full sequence,
pieces equal the whole, the implementations agree, and the layer has the paper's parts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import nn as mnn
from tests.conftest import assert_close


def _layer_and_input(key, **kwargs):
  layer = mnn.NeuralMemory(num_heads=2, head_dim=4, memory_expansion=2.0, gate_rank=4,
                           chunk_size=4, **kwargs)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  x = jnp.asarray(rng.standard_normal((2, 12, 16)), jnp.float32)
  params = jax.jit(layer.init)(jax.random.fold_in(key, 1), x)
  return layer, params, x


@pytest.mark.parametrize("kwargs", [
    dict(rule="titans", num_persistent_tokens=3),
    dict(rule="yaad", memory_depth=1, use_momentum=False),
])
def test_decode_token_by_token_equals_full_sequence(key, kwargs):
  layer, params, x = _layer_and_input(key, **kwargs)
  apply = jax.jit(layer.apply)  # One compilation per input shape.
  y, final = apply(params, x)
  assert y.shape == x.shape
  start = jax.jit(functools.partial(layer.apply, method=layer.init_state), static_argnums=(1, 2))
  state, ys = start(params, x.shape[0], x.shape[-1]), []
  for t in range(x.shape[1]):
    y_t, state = apply(params, x[:, t:t + 1], state)
    ys.append(y_t)
  assert_close(jnp.concatenate(ys, 1), y, 1e-5, "outputs")
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(final)):
    assert_close(got, want, 1e-4, "state")
  # Two pieces cut inside a chunk (6 is not a multiple of 4) equal the whole.
  y1, mid = apply(params, x[:, :6], start(params, x.shape[0], x.shape[-1]))
  y2, _ = apply(params, x[:, 6:], mid)
  assert_close(jnp.concatenate([y1, y2], 1), y, 1e-5, "pieces")


def test_implementations_agree_with_gradients(key):
  layer, params, x = _layer_and_input(key, rule="memora", memory_depth=1)
  loss = lambda impl: lambda p: jnp.sum(layer.clone(implementation=impl).apply(p, x)[0] ** 2)
  ref_value, ref_grad = jax.jit(jax.value_and_grad(loss("reference")))(params)
  value, grad = jax.jit(jax.value_and_grad(loss("xla")))(params)
  assert_close(value, ref_value, 1e-5, "loss")
  for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    assert_close(g, r, 1e-4, "param gradient")


def test_parameters():
  layer = mnn.NeuralMemory(num_heads=2, head_dim=4, rule="yaad", num_persistent_tokens=2,
                           gate_rank=3, memory_depth=3)
  shapes = nn.meta.unbox(
      jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 5, 8)))["params"])
  assert set(shapes) == {
      "q_proj", "k_proj", "v_proj", "q_conv", "k_conv", "v_conv", "theta_gate", "alpha_gate",
      "eta_gate", "huber_gate", "memory_w0", "memory_w1", "memory_w2", "gate_proj",
      "out_norm", "out_proj", "persistent"}
  assert [shapes[f"memory_w{i}"].shape for i in range(3)] == [(2, 4, 16), (2, 16, 16), (2, 16, 4)]
  assert shapes["persistent"]["tokens"].shape == (2, 8)
  assert shapes["theta_gate"]["down"]["kernel"].shape == (8, 3)


@pytest.mark.parametrize("memory_depth", [1, 2])
def test_initial_gates_keep_the_memory_trainable_over_a_long_sequence(key, memory_depth):
  """At its initial gates the memory must not forget its weights to zero within a
  1,024-token sequence: the MLP memory's LayerNorm ignores the weights' scale, so shrunken
  weights make the outer gradients explode (they did, with the linear memory's forgetting
  rate: 1e7 and beyond at 1,024 tokens)."""
  layer = mnn.NeuralMemory(num_heads=2, head_dim=16, memory_depth=memory_depth,
                           gate_rank=4, chunk_size=64, implementation="xla")
  x = jax.random.normal(key, (1, 1024, 32))
  params = jax.jit(layer.init)(jax.random.fold_in(key, 1), x[:, :64])
  memory = nn.meta.unbox(params["params"])
  initial = [np.linalg.norm(memory[f"memory_w{i}"]) for i in range(memory_depth)]
  _, state = jax.jit(layer.apply)(params, x)
  final = [np.linalg.norm(w) for w in state.memory.weights]
  if memory_depth > 1:
    assert all(f > 0.5 * i for f, i in zip(final, initial)), (final, initial)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply(params, x)[0][:, -16:] ** 2)))(x)
  assert np.isfinite(np.asarray(grad)).all()
  assert np.abs(np.asarray(grad)).max() < 1e3
