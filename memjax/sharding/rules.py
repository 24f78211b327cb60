"""Logical axis names and the rules that map them to mesh axes.

Modules name the axes of their arrays logically (``("batch", "seq", "embed")``); a rule set,
chosen in the config, says which mesh axes of `memjax.sharding.MESH_AXES` split each one.
Rules are a tuple of ``(logical name, mesh axes)`` pairs, the mesh axes a name, a tuple of
names or None (not split) — the format of Flax's ``logical_axis_rules``, so the same rules
also lay out parameters through ``flax.linen.logical_to_mesh_sharding``.

A mesh axis can split only one dimension of an array: it goes to the first dimension whose
rule names it, and later dimensions keep the rest of their rule. That is what lets "embed"
map to "fsdp" for the weights while activations ``("batch", "seq", "embed")``, whose batch
already takes "fsdp", keep their features whole.
"""

from typing import Iterable, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from memjax.sharding.mesh import MESH_AXES

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # Data parallelism, and FSDP's share of it: every device of both sees its own examples.
    ("batch", ("data", "fsdp")),
    # Context parallelism (see `memjax.sharding.context_parallel`).
    ("seq", "seq"),
    # Tensor parallelism: heads, and the hidden units of the MLPs, are independent.
    ("heads", "model"),
    ("mlp", "model"),
    # FSDP splits the weights along their model dimension.
    ("embed", "fsdp"),
    # A product-key value table is the largest weight by far and each token reads only a few
    # of its rows: each device keeps a slice of the rows rather than all-gathering the table
    # for every step as FSDP would.
    ("memory_slots", "model"),
    # The stacked layers of a scanned decoder (`memjax.models.blocks.scan_blocks`); every
    # device runs every layer.
    ("layers", None),
)


def mesh_axes(axes: MeshAxes) -> Tuple[str, ...]:
  """The mesh axes of a rule's value or a PartitionSpec entry (None, a name or a tuple)."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_logical(name: str, rules: dict) -> None:
  if name not in rules:
    raise ValueError(f"unknown logical axis {name!r}; the logical axes are {tuple(rules)}")


def rules_from_config(
    pairs: Iterable[Tuple[str, MeshAxes]] = (),
    base: Rules = DEFAULT_RULES,
) -> Rules:
  """Rules from a config: `pairs` override the rules of `base` for the names they give.

  Args:
    pairs: ``(logical name, mesh axes)`` pairs, e.g. ``(("memory_slots", None),)``; the
      mesh axes a name of `MESH_AXES`, a tuple of them or None.
    base: the rules the names not in `pairs` keep.

  Returns:
    A rule for every name of `base`, in its order.

  Raises:
    ValueError: for a logical name not in `base` or given twice, or an unknown mesh axis.
  """
  overrides = {}
  for name, axes in pairs:
    _check_logical(name, dict(base))
    if name in overrides:
      raise ValueError(f"sharding rules give {name!r} twice")
    unknown = [axis for axis in mesh_axes(axes) if axis not in MESH_AXES]
    if unknown:
      raise ValueError(f"sharding rule for {name!r} names unknown mesh axes {unknown}; the "
                       f"mesh axes are {MESH_AXES}")
    # Configs may hold lists; tuples keep the rules hashable, as Flax's are.
    overrides[name] = axes if axes is None or isinstance(axes, str) else tuple(axes)
  return tuple((name, overrides.get(name, axes)) for name, axes in base)


def logical_to_spec(
    names: Sequence[Optional[str]],
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
  """The `PartitionSpec` of an array whose dimensions have the logical `names`.

  Args:
    names: one logical name per dimension, or None for a dimension that is never split.
    rules: the rules to apply.

  Returns:
    A `PartitionSpec` with one entry per dimension; a mesh axis already taken by an earlier
    dimension is left out of the later ones.

  Raises:
    ValueError: for a name that has no rule (listing the logical names that do).
  """
  by_name = dict(rules)
  taken = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    _check_logical(name, by_name)
    axes = tuple(axis for axis in mesh_axes(by_name[name]) if axis not in taken)
    taken.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def logical_sharding(
    names: Sequence[Optional[str]],
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
) -> NamedSharding:
  """The `NamedSharding` on `mesh` of an array whose dimensions have the logical `names`.

  Args:
    names: one logical name (or None) per dimension, as in `logical_to_spec`.
    mesh: the device mesh; it must have every mesh axis the rules use for `names`.
    rules: the rules to apply.

  Returns:
    The sharding, e.g. for `jax.device_put` or `jax.jit`'s `in_shardings`.

  Raises:
    ValueError: for an unknown logical name or a mesh axis that `mesh` lacks.
  """
  spec = logical_to_spec(names, rules)
  missing = [axis for entry in spec for axis in mesh_axes(entry)
             if axis not in mesh.axis_names]
  if missing:
    raise ValueError(f"logical axes {tuple(names)} map to mesh axes {missing} that the mesh "
                     f"{dict(mesh.shape)} lacks")
  return NamedSharding(mesh, spec)


def with_logical_constraint(
    x: jax.Array,
    names: Sequence[Optional[str]],
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
) -> jax.Array:
  """`jax.lax.with_sharding_constraint` of `x` by the logical names of its dimensions.

  Args:
    x: any array, [D_0, ..., D_{n-1}].
    names: n logical names (or None), one per dimension of `x`.
    mesh: the device mesh.
    rules: the rules to apply.

  Returns:
    `x`, constrained to be laid out as the rules say.

  Raises:
    ValueError: if `names` does not have one entry per dimension of `x`, or as
      `logical_sharding`.
  """
  if len(names) != x.ndim:
    raise ValueError(f"names must give one logical axis per dimension of x, got "
                     f"{tuple(names)} for shape {tuple(x.shape)}")
  return jax.lax.with_sharding_constraint(x, logical_sharding(names, mesh, rules))
