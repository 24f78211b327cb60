"""Sharded training: the train step on a mesh computes what the single-device step does, the
state lives where the rules say, checkpoints restore onto other meshes, and batches or
parameters a mesh cannot split evenly raise errors that name them."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memjax import sharding
from memjax import train
from memjax.models import DecoderLM
from memjax.train import optim
from tests.conftest import assert_close
from tests.train.test_loop import _tiny_config

_VOCAB, _B, _T = 64, 8, 32
_STEPS = 3
# A scanned run of two "gdn" + "mlp" layers, then attention with a product-key memory:
# heads, MLP units and value rows all split over "model", every weight over "fsdp". The
# reference memory rule compiles fastest; the layout does not depend on the implementation.
_MODEL = DecoderLM(vocab_size=_VOCAB, d_model=32, mixers="gdn,gdn,attn", ffns="mlp,mlp,pkm",
                   num_heads=4, head_dim=8, mlp_ratio=2.0, chunk_size=16, pkm_n_keys=4,
                   pkm_heads=4, pkm_knn=2, pkm_k_dim=8, implementation="reference")
_MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "model": 4},
           {"data": 2, "fsdp": 2, "model": 2}]


def _optimizer():
  return optim.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=1, num_steps=10, decay_steps=None, weight_decay=0.1,
      grad_clip=1.0)))


def _batches(count, batch_size=_B):
  rng = np.random.default_rng(0)
  tokens = lambda: rng.integers(0, _VOCAB, (batch_size, _T)).astype(np.int32)
  return [{"inputs": tokens(), "labels": tokens()} for _ in range(count)]


def train_steps(model, mesh, batches):
  """One step per batch from the same initial parameters, on `mesh` (None: one device).

  Returns:
    (losses, final state, the jitted step).
  """
  optimizer = _optimizer()
  state = train.create_train_state(model, optimizer, jax.random.key(0), batches[0], mesh=mesh)
  step = train.make_train_step(model, optimizer, mesh=mesh, example_batch=batches[0])
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss_sum"]) / float(metrics["count"]))
  return losses, state, step


def _train(mesh, batches):
  """`train_steps` of this file's model; returns (losses, final state)."""
  return train_steps(_MODEL, mesh, batches)[:2]


@pytest.fixture(scope="module")
def single_device():
  with jax.default_matmul_precision("highest"):
    return _train(None, _batches(_STEPS))


def _assert_laid_out(array, spec):
  """`array` has the sharding spec `spec` and each device holds its share of the array."""
  assert array.sharding.spec == spec
  mesh = array.sharding.mesh
  devices = lambda entry: np.prod([mesh.shape[axis] for axis in
                                   ((entry,) if isinstance(entry, str) else entry or ())])
  local = tuple(int(size // devices(entry)) for size, entry in zip(array.shape, spec))
  assert array.addressable_shards[0].data.shape == local


@pytest.mark.parametrize("shape", _MESHES, ids=str)
def test_sharded_steps_match_the_single_device_steps(single_device, shape):
  want_losses, want = single_device
  losses, state = _train(sharding.make_mesh(shape), _batches(_STEPS))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda x, ref: assert_close(x, ref, 1e-5), state.params, want.params)
  assert int(state.step) == _STEPS

  # The specs of DEFAULT_RULES: "embed" -> "fsdp"; "heads", "mlp", "memory_slots" -> "model".
  scanned, attention = state.params["layers_0_1"], state.params["layer_2"]
  _assert_laid_out(scanned["mixer"]["q_proj"]["kernel"], P(None, "fsdp", "model"))
  _assert_laid_out(scanned["mixer"]["A_log"], P(None, "model"))
  _assert_laid_out(scanned["ffn"]["down_proj"]["kernel"], P(None, "model", "fsdp"))
  _assert_laid_out(attention["mixer"]["qkv_proj"]["kernel"], P("fsdp", None, "model", None))
  _assert_laid_out(attention["ffn"]["values"]["memory_values"], P("model", "fsdp"))
  _assert_laid_out(state.params["embed"]["embedding"], P(None, "fsdp"))
  # Adam's moments lie as their parameters; its count and the step are replicated.
  adam = state.opt_state[1][0]
  _assert_laid_out(adam.mu["layers_0_1"]["mixer"]["q_proj"]["kernel"],
                   P(None, "fsdp", "model"))
  _assert_laid_out(adam.nu["layer_2"]["ffn"]["values"]["memory_values"], P("model", "fsdp"))
  _assert_laid_out(adam.count, P())
  _assert_laid_out(state.step, P())


def test_sharded_eval_step_matches_the_single_device_one(single_device):
  _, state = single_device
  batch = _batches(1)[0]
  want = train.make_eval_step(_MODEL)(state.params, batch)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  shardings = train.train_state_shardings(_MODEL, _optimizer(), batch, mesh)
  params = jax.device_put(state.params, shardings.params)
  got = train.make_eval_step(_MODEL, mesh=mesh, example_batch=batch)(params, batch)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5)
    assert got[name].sharding.is_fully_replicated


def _small_state(mesh, seed):
  model = DecoderLM(vocab_size=_VOCAB, d_model=32, mixers="gdn", num_heads=2, mlp_ratio=2.0,
                    implementation="reference")
  return train.create_train_state(model, _optimizer(), jax.random.key(seed), _batches(1)[0],
                                  mesh=mesh)


def test_checkpoints_restore_onto_other_meshes(tmp_path):
  saved = _small_state(sharding.make_mesh({"data": 4, "fsdp": 2}), seed=0)
  saved = saved.replace(step=saved.step + 7)
  checkpointer = train.Checkpointer(str(tmp_path), save_every=1, keep=1)
  checkpointer.save(saved, step=7, force=True)
  checkpointer.close()
  want = jax.device_get(saved)
  for shape in ({"data": 2, "fsdp": 4}, {"fsdp": 8}):
    target = _small_state(sharding.make_mesh(shape), seed=1)
    checkpointer = train.Checkpointer(str(tmp_path), save_every=1, keep=1)
    restored = checkpointer.restore(target)
    checkpointer.close()
    assert int(restored.step) == 7
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), want)
    for got, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
      assert got.sharding == ref.sharding
    kernel = restored.params["layer_0"]["mixer"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "model")
    assert kernel.sharding.mesh.shape["fsdp"] == shape["fsdp"]


def test_a_batch_the_mesh_cannot_split_raises():
  mesh = sharding.make_mesh({"data": 8})
  batch = _batches(1, batch_size=12)[0]
  with pytest.raises(ValueError, match=r"batch\['inputs'\] of shape \(12, 32\): dimension 0 "
                                       r"\(logical axis 'batch', size 12\) is not divisible "
                                       r"by the 8 devices of the mesh axes \('data', 'fsdp'\)"):
    train.make_train_step(_MODEL, _optimizer(), mesh=mesh, example_batch=batch)
  with pytest.raises(ValueError, match="needs example_batch"):
    train.make_eval_step(_MODEL, mesh=mesh)


def test_a_train_batch_size_the_mesh_cannot_split_raises(tmp_path):
  config = _tiny_config(2)
  config.mesh = ml_collections.ConfigDict({"data": 8})
  config.train.batch_size = 12
  with pytest.raises(ValueError, match=r"train.batch_size=12 .* 8 devices of the mesh axes "
                                       r"\('data', 'fsdp'\) .* \{'data': 8, 'fsdp': 1"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_a_parameter_the_mesh_cannot_split_raises():
  mesh = sharding.make_mesh({"model": 8})
  model = DecoderLM(vocab_size=_VOCAB, d_model=32, mixers="gdn", num_heads=2)
  with pytest.raises(ValueError, match=r"parameter layer_0/mixer/A_log of shape \(2,\): "
                                       r"dimension 0 \(logical axis 'heads', size 2\) is not "
                                       r"divisible by the 8 devices of the mesh axes "
                                       r"\('model',\)"):
    train.train_state_shardings(model, _optimizer(), _batches(1)[0], mesh)
  # A rule that keeps heads whole makes it fit.
  rules = sharding.rules_from_config([("heads", None), ("mlp", None)])
  shardings = train.train_state_shardings(model, _optimizer(), _batches(1)[0], mesh, rules)
  assert shardings.params["layer_0"]["mixer"]["A_log"].spec == P(None)
