"""Where the train state and the batches live on a mesh, from the parameters' axis names.

The modules name the axes of every parameter (`memjax.nn.partitioning`); a rule set
(`memjax.sharding.DEFAULT_RULES`, or a config's `memjax.sharding.rules_from_config`) maps
the names to mesh axes. Here those names become the `NamedSharding`s that
`memjax.train.create_train_state` and the steps of `memjax.train.steps` give `jax.jit`:

* parameters: by their logical names; a leaf without names (a module that does not
  annotate its parameters) is replicated;
* optimizer state: each per-parameter leaf (Adam's moments, ...) as its parameter, the rest
  (step counts) replicated;
* batches: [B, T, ...] arrays as ("batch", "seq"), so data parallelism and FSDP split the
  examples and context parallelism the tokens.

A dimension that a mesh axis splits must be divisible by its devices; the functions here
check that and name the array, its shape and the mesh axes when it is not.

The same code runs without a mesh (`mesh=None`): then nothing is constrained and
`jax.jit` places everything on the default device.
"""

import contextlib
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from memjax import sharding
from memjax.sharding.rules import mesh_axes

# The logical axes of the leading dims of every batch array: [B, T, ...].
BATCH_AXES = ("batch", "seq")


@contextlib.contextmanager
def mesh_context(mesh: Optional[jax.sharding.Mesh], rules: sharding.Rules) -> Iterator[None]:
  """The context that lets `flax.linen.with_logical_constraint` lay out activations.

  For use inside a jitted function (at trace time): it sets the mesh's abstract mesh and
  the logical axis rules, which Flax reads. With `mesh=None` it sets nothing, and the
  constraints do nothing.

  Args:
    mesh: the device mesh, or None.
    rules: the logical axis rules.
  """
  if mesh is None:
    yield
    return
  # The abstract mesh, not `jax.set_mesh`, which refuses to run inside `jax.jit`; the
  # constraints need only the axis names and sizes, and the jit's shardings name the devices.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of an array every device of `mesh` holds whole (scalars, step counts)."""
  return NamedSharding(mesh, PartitionSpec())


def split_devices(name: str, mesh: jax.sharding.Mesh, rules: sharding.Rules):
  """The mesh axes that split the logical axis `name`, and their number of devices.

  Args:
    name: a logical axis name of `rules`, e.g. "batch".
    mesh: the device mesh.
    rules: the logical axis rules.

  Returns:
    `(axes, devices)`: a tuple of mesh axis names and the product of their sizes.
  """
  axes = mesh_axes(sharding.logical_to_spec((name,), rules)[0])
  return axes, math.prod(mesh.shape[axis] for axis in axes)


def logical_array_sharding(what: str, shape: Sequence[int], names: Sequence[Optional[str]],
                           mesh: jax.sharding.Mesh, rules: sharding.Rules) -> NamedSharding:
  """`memjax.sharding.logical_sharding`, checked against the shape of the array.

  Args:
    what: the array, for error messages (e.g. "parameter layer_0/mixer/q_proj/kernel").
    shape: its shape.
    names: one logical name (or None) per dimension.
    mesh: the device mesh.
    rules: the logical axis rules.

  Returns:
    The `NamedSharding` of the array on `mesh`.

  Raises:
    ValueError: if `names` does not have one entry per dimension, or a dimension is not
      divisible by the devices of the mesh axes that split it.
  """
  shape, names = tuple(shape), tuple(names)
  if len(names) != len(shape):
    raise ValueError(f"{what} of shape {shape} has {len(names)} logical axis names {names}; "
                     f"it needs one per dimension")
  result = sharding.logical_sharding(names, mesh, rules)
  for dim, (size, name, entry) in enumerate(zip(shape, names, result.spec)):
    axes = mesh_axes(entry)
    devices = math.prod(mesh.shape[axis] for axis in axes)
    if size % devices:
      raise ValueError(
          f"{what} of shape {shape}: dimension {dim} (logical axis {name!r}, size {size}) is "
          f"not divisible by the {devices} devices of the mesh axes {axes} that split it, "
          f"in the mesh {dict(mesh.shape)}; choose mesh sizes that divide it, or rules that "
          f"map {name!r} to other mesh axes")
  return result


def abstract_params(model: nn.Module, example_batch: Mapping[str, Any]) -> Any:
  """The parameters `model.init` makes for the batch's inputs, as shapes in their boxes.

  Args:
    model: a Linen module called as `model.init(rng, inputs)`.
    example_batch: a batch with "inputs"; only its shape and dtype matter.

  Returns:
    The "params" collection: `flax.linen.LogicallyPartitioned` boxes (for annotated
    parameters) and leaves of `jax.ShapeDtypeStruct`; nothing is computed.
  """
  inputs = example_batch["inputs"]
  inputs = jax.ShapeDtypeStruct(np.shape(inputs), jnp.result_type(inputs))
  return jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]


def param_shardings(boxed_params: Any, mesh: jax.sharding.Mesh,
                    rules: sharding.Rules) -> Any:
  """The sharding of every parameter, from the logical names in its box.

  Args:
    boxed_params: parameters as `init` returns them (arrays or shapes), boxed where
      annotated, e.g. `abstract_params(model, batch)`.
    mesh: the device mesh.
    rules: the logical axis rules.

  Returns:
    A `NamedSharding` per parameter, in the structure of the unboxed parameters.

  Raises:
    ValueError: as `logical_array_sharding`, naming the parameter's path.
  """
  # Logical PartitionSpecs: the box's names, or an empty spec for a leaf without a box.
  specs = nn.get_partition_spec(boxed_params)
  shapes = nn.unbox(boxed_params)

  def one(path, spec, leaf):
    names = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
    where = "/".join(str(getattr(entry, "key", entry)) for entry in path)
    return logical_array_sharding(f"parameter {where}", leaf.shape, names, mesh, rules)

  return jax.tree_util.tree_map_with_path(one, specs, shapes)


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any,
                        shardings: Any, mesh: jax.sharding.Mesh) -> Any:
  """The sharding of every leaf of `optimizer.init(params)`.

  Leaves that optax knows to mirror a parameter (`optax.tree_map_params`: Adam's moments,
  ...) are laid out as that parameter; the others (step counts, ...) are replicated.

  Args:
    optimizer: the optax transformation.
    params: the unboxed parameters (arrays or shapes).
    shardings: the parameters' shardings, in their structure (`param_shardings`).
    mesh: the device mesh.

  Returns:
    A `NamedSharding` per leaf of the optimizer state, in its structure.
  """
  abstract_state = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_state,
                               shardings, transform_non_params=lambda _: replicated(mesh))


def batch_shardings(batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                    rules: sharding.Rules) -> dict:
  """The sharding of every array of a batch: [B, T, ...] as `BATCH_AXES`.

  Args:
    batch: arrays (or shapes) by name, e.g. "inputs" and "labels" int32 [B, T].
    mesh: the device mesh.
    rules: the logical axis rules.

  Returns:
    A `NamedSharding` per array, by name.

  Raises:
    ValueError: for a scalar, or a B (or T) not divisible by the devices that split it.
  """
  shardings = {}
  for name, array in batch.items():
    shape = tuple(np.shape(array))
    if not shape:
      raise ValueError(f"batch[{name!r}] must have a leading batch dim [B, ...], got a scalar")
    names = (BATCH_AXES + (None,) * len(shape))[:len(shape)]
    shardings[name] = logical_array_sharding(f"batch[{name!r}]", shape, names, mesh, rules)
  return shardings
