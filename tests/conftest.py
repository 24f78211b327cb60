"""Shared test helpers: fresh random inputs and dtype-keyed tolerances."""

import gc
import itertools

import jax

# tests/sharding runs meshes of 8 virtual CPU devices. The count must be set before JAX
# starts its backends; everything else keeps running on the default device, jax.devices()[0].
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp
import numpy as np
import pytest

# Relative tolerances by input dtype (DESIGN.md: fp32 ~1e-5, bf16 ~1e-2).
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Gradients go through a triangular solve and a long scan; fp32 rounding adds up more.
GRAD_RTOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}

_counter = itertools.count()


def pytest_collection_modifyitems(config, items):
  """`gpu`-marked tests compile the kernels for a GPU; without one they cannot run."""
  del config
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU backend (run `pytest -m gpu` on a GPU machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_code():
  """Frees every compiled executable once a test module is done.

  Each XLA CPU executable keeps a few memory mappings of its machine code for as long as
  a jit cache holds it. Over the whole suite they reached Linux's default limit of 65,530
  mappings per process (vm.max_map_count), and the next compilation segfaulted inside
  XLA. Clearing the caches after each module bounds the count by what one module needs.
  """
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True)
def full_float32_matmuls():
  """Tests compare the math of two implementations, so matmuls run in full float32.

  On GPUs XLA's default float32 matmul may use TF32 and pick a different algorithm for a
  [B, 1, D] decode step than for a [B, T, D] sequence; that rounding is not what the tests
  check. On CPUs this changes nothing.
  """
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture
def key():
  """A fresh PRNG key per test (and per call of the fixture's users), never zeros."""
  return jax.random.key(np.random.SeedSequence().generate_state(1)[0] + next(_counter))


def relative_error(x, ref) -> float:
  """‖x - ref‖ / ‖ref‖ in float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close(x, ref, rtol, what=""):
  assert np.all(np.isfinite(np.asarray(x, np.float64))), f"{what}: non-finite values"
  err = relative_error(x, ref)
  assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.1e}"


def memory_inputs(key, b, t, h, dk, dv, dtype=jnp.float32, gated=True):
  """Random q, k (unit norm), v, beta in (0, 1), g < 0 and a float32 initial state."""
  ks = jax.random.split(key, 6)
  q = jax.random.normal(ks[0], (b, t, h, dk))
  k = jax.random.normal(ks[1], (b, t, h, dk))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, t, h, dv))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  g = -jax.nn.softplus(jax.random.normal(ks[4], (b, t, h)) - 1.0) if gated else None
  s0 = 0.5 * jax.random.normal(ks[5], (b, h, dk, dv))
  cast = lambda x: None if x is None else x.astype(dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), beta=cast(beta), g=cast(g), initial_state=s0)
