"""ProductKeyMemory: the layer's read equals the paper's formula computed by brute force,
gradients reach keys, values and the query projection, a shared value table, logical axes
of the values, query norms, errors, and a learning rate of their own for the values."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memjax import nn as mnn
from memjax.nn.product_keys import VALUES_PARAM
from memjax.train import param_groups
from tests.conftest import assert_close

SMALL = dict(n_keys=6, heads=2, knn=3, k_dim=8)


def _init(layer, key, shape=(2, 5, 12)):
  """Random input and initial variables. On a CPU a threefry sampler compiles for seconds
  per shape, so the input comes from numpy and the initialisers draw from an "rbg" key."""
  seed = np.asarray(jax.random.key_data(key))
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  variables = jax.jit(layer.init)(jax.random.key(int(seed[-1]), impl="rbg"), x)
  return variables, x


@pytest.fixture(scope="module")
def small():
  """The SMALL layer, its variables and an input, shared by the tests that only read them."""
  layer = mnn.ProductKeyMemory(**SMALL)
  key = jax.random.key(np.random.SeedSequence().generate_state(1)[0])
  return (layer, *_init(layer, key))


def _brute_force_read(params, x, heads, knn):
  """sum over heads of softmax(top-knn scores) . values, scoring all n_keys ** 2 keys."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params))
  x = np.asarray(x, np.float64)
  q = x @ p["query_proj"]["kernel"] + p["query_proj"]["bias"]
  q = q.reshape(*x.shape[:-1], heads, -1)
  c = p["sub_keys"]  # [H, 2, n, K / 2]
  half = c.shape[-1]
  # Score of key a * n + b: q1 . C1[a] + q2 . C2[b].
  s = (np.einsum("...hd,hnd->...hn", q[..., :half], c[:, 0])[..., :, None]
       + np.einsum("...hd,hnd->...hn", q[..., half:], c[:, 1])[..., None, :])
  s = s.reshape(*s.shape[:-2], -1)
  top = np.argsort(-s, axis=-1)[..., :knn]
  w = np.exp(np.take_along_axis(s, top, -1))
  w /= w.sum(-1, keepdims=True)
  read = np.einsum("...hi,...hiv->...v", w, p["values"][VALUES_PARAM][top])
  gate = x @ p["swilu_proj"]["kernel"]
  return (read * gate / (1 + np.exp(-gate))) @ p["out_proj"]["kernel"]


def test_layer_equals_brute_force_formula(small):
  layer, variables, x = small
  y = jax.jit(layer.apply)(variables, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert_close(y, _brute_force_read(variables["params"], x, SMALL["heads"], SMALL["knn"]),
               1e-5, "layer output")


def test_parameters_and_shapes(key):
  layer = mnn.ProductKeyMemory(**SMALL, v_dim=7, swilu=False)
  variables, x = _init(layer, key, (3, 12))
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(variables["params"]))
  assert shapes == {"query_proj": {"kernel": (12, 16), "bias": (16,)},
                    "sub_keys": (2, 2, 6, 4),
                    "values": {VALUES_PARAM: (36, 7)},
                    "out_proj": {"kernel": (7, 12)}}
  assert jax.jit(layer.apply)(variables, x).shape == (3, 12)


def test_gradients_reach_keys_values_and_query_projection(small):
  layer, variables, x = small
  x = x[:1, :2]
  params = nn.meta.unbox(variables["params"])
  grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2)))(params)
  for path in (("sub_keys",), ("query_proj", "kernel"), ("query_proj", "bias"),
               ("values", VALUES_PARAM), ("swilu_proj", "kernel"), ("out_proj", "kernel")):
    g = grads
    for name in path:
      g = g[name]
    assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {path}"
  # Two tokens select at most 2 * heads * knn = 12 of the 36 rows; the others get none.
  touched = int(jnp.sum(jnp.any(grads["values"][VALUES_PARAM] != 0, axis=-1)))
  assert 1 <= touched <= 12


class _TwoLayers(nn.Module):
  """Two product-key layers reading one value table owned by this module."""

  @nn.compact
  def __call__(self, x):
    table = mnn.ProductKeyValues(num_rows=SMALL["n_keys"] ** 2, dim=x.shape[-1],
                                 name="shared_values")
    x = x + mnn.ProductKeyMemory(**SMALL, values=table, name="pkm_0")(x)
    return x + mnn.ProductKeyMemory(**SMALL, values=table, name="pkm_1")(x)


def test_shared_value_table_is_one_parameter_read_by_both_layers(key):
  model = _TwoLayers()
  variables, x = _init(model, key)
  params = nn.meta.unbox(variables["params"])
  assert set(params) == {"shared_values", "pkm_0", "pkm_1"}
  assert "values" not in params["pkm_0"] and "values" not in params["pkm_1"]
  # The table's gradient is the sum of what each layer sends it: check through the first
  # layer alone, with the second layer's read removed by zeroing its output projection.
  grad_fn = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x))))
  grad = grad_fn(params)["shared_values"][VALUES_PARAM]
  no_second = dict(params, pkm_1=dict(params["pkm_1"], out_proj={"kernel": jnp.zeros((12, 12))}))
  grad_first = grad_fn(no_second)["shared_values"][VALUES_PARAM]
  assert float(jnp.abs(grad_first).max()) > 0
  assert float(jnp.abs(grad - grad_first).max()) > 0  # The second layer adds its part.


def test_shared_table_of_the_wrong_shape_is_rejected(key):
  table = mnn.ProductKeyValues(num_rows=25, dim=12, parent=None)
  layer = mnn.ProductKeyMemory(**SMALL, values=table)
  with pytest.raises(ValueError, match=r"values must be a table of shape .*\(36, 12\), "
                                       r"got ProductKeyValues of shape \(25, 12\)"):
    _init(layer, key)


def test_value_table_has_logical_axes_for_row_sharding(small):
  _, variables, _ = small
  specs = nn.get_partition_spec(variables["params"])
  assert specs["values"][VALUES_PARAM] == jax.sharding.PartitionSpec("memory_slots", "embed")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  sharding = nn.logical_to_mesh_sharding(specs, mesh, [("memory_slots", "model")])
  assert sharding["values"][VALUES_PARAM].spec == jax.sharding.PartitionSpec("model", None)


def test_batch_norm_query_updates_statistics_in_training(key):
  layer = mnn.ProductKeyMemory(**SMALL, query_norm="batch")
  variables, x = _init(layer, key)
  assert set(variables) == {"params", "batch_stats"}
  y, updates = jax.jit(functools.partial(layer.apply, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert y.shape == x.shape
  mean = updates["batch_stats"]["query_norm"]["mean"]
  assert float(jnp.abs(mean - variables["batch_stats"]["query_norm"]["mean"]).max()) > 0


def test_layer_norm_query_normalises_each_head(key):
  layer = mnn.ProductKeyMemory(**SMALL, query_norm="layer")
  variables, x = _init(layer, key)
  params = nn.meta.unbox(variables["params"])
  assert set(params["query_norm"]) == {"scale", "bias"}
  assert params["query_norm"]["scale"].shape == (SMALL["k_dim"],)


@pytest.mark.parametrize("kwargs,match", [
    (dict(query_norm="group"), r"query_norm must be one of \('batch', 'layer', None\)"),
    (dict(k_dim=7), r"k_dim must be even.*7"),
    (dict(knn=7), r"knn must be an int in \[1, n_keys=6\].*got 7"),
])
def test_bad_arguments(key, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _init(mnn.ProductKeyMemory(**dict(SMALL, **kwargs)), key)


def test_values_get_their_own_learning_rate(small):
  _, variables, _ = small
  params = variables["params"]
  labels = nn.meta.unbox(param_groups.value_table_labels(params))
  assert labels["values"][VALUES_PARAM] == param_groups.VALUES_GROUP
  assert labels["sub_keys"] == param_groups.DEFAULT_GROUP
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  tx = param_groups.value_learning_rate_transform(optax.sgd, 0.1, 3.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  updates = nn.meta.unbox(updates)
  assert jnp.allclose(updates["values"][VALUES_PARAM], -3.0)
  for leaf in jax.tree.leaves({k: v for k, v in updates.items() if k != "values"}):
    assert jnp.allclose(leaf, -0.1)
