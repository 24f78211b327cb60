"""`train.compute_dtype`: the model computes on a bfloat16 copy of float32 params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memjax import ops
from memjax import train
from memjax.models import DecoderLM
from memjax.train import steps
from tests.train.test_loop import _config


def test_compute_dtype_names():
  assert steps.compute_dtype(None) is None
  assert steps.compute_dtype("float32") is None
  assert steps.compute_dtype("bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="compute_dtype must be one of .* got 'float16'"):
    steps.compute_dtype("float16")


def test_bfloat16_step_keeps_float32_params_and_follows_the_float32_step(monkeypatch):
  model = DecoderLM(vocab_size=32, d_model=32, mixers="gdn,attn", num_heads=2,
                    chunk_size=16, implementation="xla")
  tokens = np.random.default_rng(0).integers(0, 32, (2, 32)).astype(np.int32)
  batch = {"inputs": tokens, "labels": np.roll(tokens, -1, axis=1)}
  # Plain SGD with rate 1: the update is the gradient, so it can be compared directly.
  optimizer = optax.sgd(1.0)
  seen = []
  original = ops.delta_rule
  monkeypatch.setattr(ops, "delta_rule",
                      lambda q, *args, **kwargs: seen.append(q.dtype) or original(
                          q, *args, **kwargs))

  def one_step(dtype):
    """The state and metrics after one step, and the dtypes the memory op saw in it."""
    state = train.create_train_state(model, optimizer, jax.random.key(0), batch)
    seen.clear()
    state, metrics = steps.make_train_step(model, optimizer, dtype=dtype)(state, batch)
    return state, metrics, set(seen)

  want_state, want, dtypes = one_step(None)
  assert dtypes == {jnp.dtype(jnp.float32)}
  state, got, dtypes = one_step(jnp.bfloat16)
  assert dtypes == {jnp.dtype(jnp.bfloat16)}  # the memory op ran on bf16 inputs
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  # bf16 rounding, not another loss: the loss, the gradient norm and every gradient agree
  # with float32's to bf16 precision (a few % of each gradient's largest entry, after
  # rounding in every layer).
  np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=2e-2)
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=5e-2)
  moved = lambda s: jax.tree.leaves(jax.tree.map(lambda a, b: a - b, s.params,
                                                 train.create_train_state(
                                                     model, optimizer, jax.random.key(0),
                                                     batch).params))
  for a, b in zip(moved(state), moved(want_state)):
    a, b = np.ravel(a), np.ravel(b)
    assert np.dot(a, b) >= 0.995 * np.linalg.norm(a) * np.linalg.norm(b)
    np.testing.assert_allclose(a, b, atol=0.1 * float(np.abs(b).max()))


def test_tiny_run_trains_in_bfloat16(tmp_path):
  config = _config("mqar", "tiny")
  config.train.compute_dtype = "bfloat16"
  config.model.implementation = "xla"
  final = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final["train/loss"]) and np.isfinite(final["eval/loss"])
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    config.train.compute_dtype = "half"
    train.train_and_evaluate(config, str(tmp_path / "bad"))
