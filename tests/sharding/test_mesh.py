"""make_mesh and mesh_shape: axis order, sizes from a config, the "-1" axis, errors."""

import jax
import pytest

from memjax import sharding


def test_mesh_shape_fills_in_missing_axes_and_the_rest():
  assert sharding.mesh_shape({}, 1) == (1, 1, 1, 1)
  assert sharding.mesh_shape({"seq": 4, "data": -1}, 32) == (8, 1, 1, 4)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "model": 2, "seq": 2}, 16) == (2, 2, 2, 2)
  assert sharding.mesh_shape({"model": -1}, 1) == (1, 1, 1, 1)


def test_make_mesh_spans_all_devices_in_axis_order():
  mesh = sharding.make_mesh({"model": 2, "data": 2, "seq": 2})
  assert mesh.axis_names == sharding.MESH_AXES == ("data", "fsdp", "model", "seq")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 2, "seq": 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  # Auto axes: sharding stays out of the array types (JAX's make_mesh defaults to Explicit).
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_make_mesh_on_given_devices():
  devices = jax.devices()[:4]
  mesh = sharding.make_mesh({"seq": -1}, devices=devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "model": 1, "seq": 4}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


@pytest.mark.parametrize("shape,count,match", [
    ({"tensor": 2}, 2, r"unknown axes \['tensor'\]"),
    ({"data": -1, "seq": -1}, 8, "only one axis may be -1"),
    ({"data": 0}, 1, "size of 'data' must be a positive int or -1, got 0"),
    ({"data": 2.0}, 2, "size of 'data' must be a positive int"),
    ({"data": 3, "seq": -1}, 8, "need 3 devices, which does not divide the 8 devices"),
    ({"data": 2, "seq": 2}, 8, "needs 4 devices, but there are 8"),
])
def test_bad_shapes_raise(shape, count, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(shape, count)


def test_make_mesh_names_the_device_count():
  with pytest.raises(ValueError, match=f"there are {jax.device_count()}"):
    sharding.make_mesh({"seq": jax.device_count() + 1})
