"""Device meshes over the fixed axes ("data", "fsdp", "model", "seq").

Every mesh memjax builds has all four axes, in this order, so that sharding rules and the
context-parallel ops can name any of them; an axis the config leaves out has size 1.
"""

import math
from typing import Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

# Outermost first. The order is fixed so that a config gives only sizes; `jax.make_mesh`
# gives the later axes the more closely connected devices.
MESH_AXES = ("data", "fsdp", "model", "seq")


def mesh_shape(shape: Mapping[str, int], device_count: int) -> Tuple[int, ...]:
  """Resolves the axis sizes of a config into one size per axis of `MESH_AXES`.

  Args:
    shape: size by axis name, e.g. ``{"data": -1, "seq": 4}``. Names must be in
      `MESH_AXES`; missing axes get size 1; at most one axis may be -1, meaning "the
      devices the other axes leave".
    device_count: the number of devices the mesh spans.

  Returns:
    The sizes in the order of `MESH_AXES`; their product is `device_count`.

  Raises:
    ValueError: for an unknown axis name, a size that is neither a positive int nor -1,
      two -1 sizes, or sizes that do not multiply to the device count.
  """
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh shape {dict(shape)} has unknown axes {unknown}; the mesh axes "
                     f"are {MESH_AXES}")
  for name, size in shape.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size < 1 and size != -1):
      raise ValueError(f"mesh shape {dict(shape)}: size of {name!r} must be a positive int "
                       f"or -1, got {size!r}")
  rest = [name for name, size in shape.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f"mesh shape {dict(shape)}: only one axis may be -1, got {rest}")
  known = math.prod(size for size in shape.values() if size != -1)
  if rest:
    if device_count % known:
      raise ValueError(
          f"mesh shape {dict(shape)}: the other axes need {known} devices, which does not "
          f"divide the {device_count} devices, so {rest[0]!r} has no size")
    shape = {**shape, rest[0]: device_count // known}
  elif known != device_count:
    raise ValueError(f"mesh shape {dict(shape)} needs {known} devices, but there are "
                     f"{device_count}")
  return tuple(int(shape.get(name, 1)) for name in MESH_AXES)


def make_mesh(
    shape: Mapping[str, int],
    devices: Optional[Sequence[jax.Device]] = None,
) -> jax.sharding.Mesh:
  """Builds a mesh with axes `MESH_AXES` and the sizes of `shape`.

  `jax.make_mesh` orders the devices by the platform's topology (rings on TPUs, hosts
  outermost), so neighbours on an axis are neighbours on the interconnect.

  Args:
    shape: size by axis name, as in `mesh_shape`, e.g. ``{"data": -1, "seq": 4}``.
    devices: the devices to span; all of `jax.devices()` when None.

  Returns:
    A `jax.sharding.Mesh` over all four axes of `MESH_AXES`.

  Raises:
    ValueError: as `mesh_shape`, for the number of devices given.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(shape, len(devices))
  # Auto axes keep sharding out of the array types (JAX 0.10 and later default to Explicit
  # axes): memjax places arrays with sharding constraints and jax.shard_map.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(sizes, MESH_AXES, axis_types, devices=devices)
