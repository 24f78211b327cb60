"""The associative-memory mixers run context-parallel under a mesh that splits the sequence:
outputs, final state and gradients equal the unsharded layer's; a DecoderLM train step on
such a mesh trains as on one device; the compiled step holds the shard_map's collectives;
decoding one token stays unsharded."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memjax import nn as mnn
from memjax import sharding
from memjax.models import DecoderLM
from memjax.sharding import context_parallel
from memjax.train import sharded
from tests.conftest import GRAD_RTOL, RTOL, assert_close
from tests.sharding.test_sharded_training import train_steps

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py makes 8 CPU devices)")

_B, _T, _D = 2, 64, 32
_LAYERS = {
    "linear": mnn.LinearAttention,
    "deltanet": mnn.DeltaNet,
    "gdn": mnn.GatedDeltaNet,
}
_SEQ4 = {"seq": 4, "data": 2}
_SEQ2_MODEL2 = {"seq": 2, "model": 2, "data": 2}


def _layer(name):
  return _LAYERS[name](num_heads=2, head_dim=16, chunk_size=16, implementation="reference")


def _inputs(key):
  kx, kc, ks = jax.random.split(key, 3)
  return (jax.random.normal(kx, (_B, _T, _D)), jax.random.normal(kc, (_B, _T, _D)),
          0.5 * jax.random.normal(ks, (_B, 2, 16, 16)))


def _loss_and_grads(layer):
  """(y, final memory) and the gradients of <y, cotangent> w.r.t. the params and x."""

  def loss(params, x, cotangent, memory):
    state = layer.init_state(x.shape[0])._replace(memory=memory)
    y, state = layer.apply({"params": params}, x, state)
    return jnp.sum(y * cotangent), (y, state.memory)

  return jax.grad(loss, argnums=(0, 1), has_aux=True)


def _sharded_loss_and_grads(layer, mesh, params, args):
  """`_loss_and_grads` jitted on `mesh` as the train step runs the model."""
  rules = sharding.DEFAULT_RULES

  def fn(params, x, cotangent, memory):
    with sharded.mesh_context(mesh, rules):
      return _loss_and_grads(layer)(params, x, cotangent, memory)

  tokens = sharding.logical_sharding(("batch", "seq", None), mesh, rules)
  states = sharding.logical_sharding(("batch", "heads", None, None), mesh, rules)
  boxed = jax.eval_shape(layer.init, jax.random.key(0), args[0])["params"]
  return jax.jit(fn, in_shardings=(sharded.param_shardings(boxed, mesh, rules), tokens,
                                   tokens, states))(params, *args)


@pytest.mark.parametrize("name, shape", [
    ("linear", _SEQ4), ("deltanet", _SEQ2_MODEL2), ("gdn", _SEQ4), ("gdn", _SEQ2_MODEL2)],
    ids=str)
def test_layer_on_a_seq_mesh_matches_the_unsharded_layer(key, name, shape):
  layer = _layer(name)
  args = _inputs(key)
  params = nn.unbox(layer.init(jax.random.key(1), args[0]))["params"]
  (want_params, want_x), (want_y, want_memory) = jax.jit(_loss_and_grads(layer))(params, *args)
  mesh = sharding.make_mesh(shape)
  (grad_params, grad_x), (y, memory) = _sharded_loss_and_grads(layer, mesh, params, args)
  assert y.sharding.spec[1] == "seq"  # the outputs stay split over the sequence
  assert_close(y, want_y, RTOL[jnp.float32], "y")
  assert_close(memory, want_memory, RTOL[jnp.float32], "final memory")
  assert_close(grad_x, want_x, GRAD_RTOL[jnp.float32], "grad x")
  for path, got, want in zip(jax.tree_util.tree_leaves_with_path(grad_params),
                             jax.tree.leaves(grad_params), jax.tree.leaves(want_params)):
    assert_close(got, want, GRAD_RTOL[jnp.float32], f"grad {jax.tree_util.keystr(path[0])}")


def test_layer_under_set_mesh_runs_context_parallel(key, monkeypatch):
  """A user's `jax.set_mesh`, without logical axis rules, takes `DEFAULT_RULES`."""
  calls = []
  original = sharding.context_parallel_delta_rule
  monkeypatch.setattr(sharding, "context_parallel_delta_rule",
                      lambda *args, **kwargs: calls.append(kwargs) or original(*args, **kwargs))
  layer = _layer("gdn")
  x = _inputs(key)[0]
  params = layer.init(jax.random.key(1), x)
  want, _ = jax.jit(layer.apply)(params, x)
  assert not calls
  mesh = sharding.make_mesh(_SEQ4)
  with jax.set_mesh(mesh):
    got, _ = jax.jit(layer.apply)(params, x)
  assert_close(got, want, RTOL[jnp.float32])
  assert len(calls) == 1
  assert calls[0]["mesh"] == mesh.abstract_mesh
  assert (calls[0]["seq_axis"], calls[0]["batch_axes"], calls[0]["head_axis"]) == (
      "seq", ("data", "fsdp"), ("model",))


@pytest.mark.parametrize("depth, rule, calls", [(1, "titans", 1), (2, "titans", 0),
                                                 (1, "moneta", 0)])
def test_titans_layer_runs_context_parallel_where_its_memory_is_affine(
    key, monkeypatch, depth, rule, calls):
  """The linear memory with the "titans" rule runs context-parallel (outputs and gradients
  as on one device); the MLP memory and the Moneta rule stay unsharded ops, also equal."""
  seen = []
  original = sharding.context_parallel_neural_memory
  monkeypatch.setattr(sharding, "context_parallel_neural_memory",
                      lambda *args, **kwargs: seen.append(kwargs) or original(*args, **kwargs))
  layer = mnn.NeuralMemory(num_heads=2, head_dim=16, memory_depth=depth, rule=rule,
                           use_momentum=rule == "titans", chunk_size=8, implementation="xla")
  x, cotangent, _ = _inputs(key)
  params = layer.init(jax.random.key(1), x)

  def loss(params, x):
    y, state = layer.apply(params, x)
    return jnp.sum(y * cotangent), (y, state.memory.weights)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (want_params, want_x), (want_y, want_memory) = grad(params, x)
  assert not seen
  with jax.set_mesh(sharding.make_mesh(_SEQ4)):
    (got_params, got_x), (got_y, got_memory) = grad(params, x)
  assert len(seen) == calls
  assert_close(got_y, want_y, RTOL[jnp.float32], "y")
  jax.tree.map(lambda a, b: assert_close(a, b, RTOL[jnp.float32], "memory"), got_memory,
               want_memory)
  assert_close(got_x, want_x, GRAD_RTOL[jnp.float32], "grad x")
  jax.tree.map(lambda a, b: assert_close(a, b, GRAD_RTOL[jnp.float32], "grad params"),
               got_params, want_params)


def test_decoding_one_token_on_a_seq_mesh_is_unsharded(key, monkeypatch):
  monkeypatch.setattr(sharding, "context_parallel_delta_rule", None)  # must not be called
  layer = _layer("gdn")
  x, _, memory = _inputs(key)
  x = x[:, :1]
  params = layer.init(jax.random.key(1), x)
  state = layer.init_state(_B)._replace(memory=memory)
  want = jax.jit(layer.apply)(params, x, state)
  with jax.set_mesh(sharding.make_mesh(_SEQ4)):
    got = jax.jit(layer.apply)(params, x, state)
  jax.tree.map(lambda a, b: assert_close(a, b, RTOL[jnp.float32]), got, want)


def test_current_seq_sharding_follows_the_mesh_and_the_rules():
  assert context_parallel.current_seq_sharding() is None  # no mesh
  mesh = sharding.make_mesh({"seq": 2, "model": 2, "fsdp": 2})
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert context_parallel.current_seq_sharding() == dict(
        mesh=mesh.abstract_mesh, seq_axis="seq", batch_axes=("data", "fsdp"),
        head_axis=("model",))
    rules = sharding.rules_from_config([("batch", "data"), ("heads", None)])
    assert context_parallel.current_seq_sharding(rules) == dict(
        mesh=mesh.abstract_mesh, seq_axis="seq", batch_axes=("data",), head_axis=None)
    # Rules that keep the sequence whole, or name no rule for it: no context parallelism.
    assert context_parallel.current_seq_sharding(
        sharding.rules_from_config([("seq", None)])) is None
    assert context_parallel.current_seq_sharding((("batch", "data"),)) is None
  with jax.sharding.use_abstract_mesh(sharding.make_mesh({"data": 8}).abstract_mesh):
    assert context_parallel.current_seq_sharding() is None  # "seq" of size 1
  # Inside a jax.shard_map over "seq", each shard is the user's to run.
  seen = []

  def shard(x):
    seen.append(context_parallel.current_seq_sharding())
    return x

  mesh = sharding.make_mesh(_SEQ4)
  jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=P("seq"), out_specs=P("seq")))(
      jnp.zeros(8))
  assert seen == [None]
  # A mesh of the user's own axes: the rules' axes it lacks are left out.
  mesh = jax.make_mesh((4, 2), ("seq", "data"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert context_parallel.current_seq_sharding() == dict(
        mesh=mesh.abstract_mesh, seq_axis="seq", batch_axes=("data",), head_axis=None)


# Two different mixers, so each is a layer of its own (not one scanned run), with an FFN.
_MODEL = DecoderLM(vocab_size=64, d_model=_D, mixers="gdn,linear", ffns="mlp,mlp",
                   num_heads=2, head_dim=16, mlp_ratio=2.0, chunk_size=16,
                   implementation="reference")
_STEPS = 3


def _batches():
  rng = np.random.default_rng(0)
  tokens = lambda: rng.integers(0, 64, (_B, _T)).astype(np.int32)
  return [{"inputs": tokens(), "labels": tokens()} for _ in range(_STEPS)]


def _train(mesh):
  batches = _batches()
  losses, state, step = train_steps(_MODEL, mesh, batches)
  return losses, state, step.lower(state, batches[0]).as_text()


def test_decoder_train_step_on_a_seq_mesh_matches_one_device():
  want_losses, want, unsharded_text = _train(None)
  losses, state, text = _train(sharding.make_mesh(_SEQ4))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda x, ref: assert_close(x, ref, 1e-5), state.params, want.params)
  # The mixers' shard_maps, forward and transposed, of the two layers; each all-gathers the
  # shards' (A, U) over "seq" (the last mesh axis: groups of 4 consecutive devices). The
  # unsharded step has none of them.
  assert "all_gather" not in unsharded_text
  assert text.count("sdy.manual_computation") == 4
  gathers = [line for line in text.splitlines() if "stablehlo.all_gather" in line]
  assert len(gathers) >= 4
  assert all("replica_groups = dense<[[0, 1, 2, 3], [4, 5, 6, 7]]>" in line
             for line in gathers)
