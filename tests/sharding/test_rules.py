"""Logical axis rules: PartitionSpecs of weights and activations, config overrides, sharding
constraints on a mesh, and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memjax import sharding


def test_default_rules_split_weights_and_activations():
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "model")
  assert sharding.logical_to_spec(("memory_slots", "embed")) == P("model", "fsdp")
  assert sharding.logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "model")
  assert sharding.logical_to_spec(("batch", "seq", "heads", None)) == P(
      ("data", "fsdp"), "seq", "model", None)
  # The batch takes "fsdp" first, so activations keep their features whole.
  assert sharding.logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), "seq", None)
  assert sharding.logical_to_spec(("batch", "seq", "mlp")) == P(("data", "fsdp"), "seq", "model")


def test_rules_are_flax_rules():
  assert nn.logical_to_mesh_axes(("embed", "mlp"), sharding.DEFAULT_RULES) == P("fsdp", "model")


def test_rules_from_config_override_the_names_they_give():
  rules = sharding.rules_from_config([["memory_slots", None], ["batch", ["data"]]])
  assert [name for name, _ in rules] == [name for name, _ in sharding.DEFAULT_RULES]
  assert dict(rules)["memory_slots"] is None
  assert dict(rules)["batch"] == ("data",)
  assert sharding.logical_to_spec(("batch", "seq", "embed"), rules) == P("data", "seq", "fsdp")
  assert sharding.rules_from_config() == sharding.DEFAULT_RULES


@pytest.mark.parametrize("pairs,match", [
    ((("vocab", "model"),), r"unknown logical axis 'vocab'; the logical axes are \('batch'"),
    ((("heads", "tensor"),), r"unknown mesh axes \['tensor'\]"),
    ((("heads", None), ("heads", "model")), "give 'heads' twice"),
])
def test_bad_config_rules_raise(pairs, match):
  with pytest.raises(ValueError, match=match):
    sharding.rules_from_config(pairs)


def test_unknown_logical_names_raise():
  with pytest.raises(ValueError, match=r"unknown logical axis 'hidden'.*'memory_slots'"):
    sharding.logical_to_spec(("batch", "hidden"))


def test_with_logical_constraint_lays_out_on_the_mesh(key):
  mesh = sharding.make_mesh({"data": 2, "model": 2, "seq": 2})
  x = jax.random.normal(key, (4, 8, 6))
  names = ("batch", "seq", "mlp")
  y = jax.jit(lambda x: 2 * sharding.with_logical_constraint(x, names, mesh))(x)
  np.testing.assert_array_equal(y, 2 * x)
  want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "seq", "model"))
  assert y.sharding.is_equivalent_to(want, x.ndim)
  assert sharding.logical_sharding(names, mesh) == want


def test_constraint_errors_name_the_shapes():
  mesh = sharding.make_mesh({"seq": -1})
  with pytest.raises(ValueError, match=r"one logical axis per dimension.*\(4, 8\)"):
    sharding.with_logical_constraint(jnp.zeros((4, 8)), ("batch",), mesh)
  data_only = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  with pytest.raises(ValueError, match=r"mesh axes \['fsdp'\] that the mesh \{'data': 2\}"):
    sharding.logical_sharding(("batch",), data_only)
