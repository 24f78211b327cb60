"""Argument checks shared by the ops: clear `ValueError`s instead of deep XLA errors."""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_floating(name: str, x: jax.Array) -> None:
  """Raises ValueError unless `x` has a floating dtype."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype, got {x.dtype} (shape {x.shape})")


def check_shape(name: str, x: jax.Array, expected: Sequence[int], layout: str) -> None:
  """Raises ValueError unless `x.shape == expected`, naming the layout it needs."""
  if tuple(x.shape) != tuple(expected):
    raise ValueError(
        f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def check_all_finite(**arrays: Optional[jax.Array]) -> None:
  """Raises ValueError naming the first array that holds a NaN or an infinity.

  Only usable outside `jax.jit` (it reads the values); the ops call it when the user
  opts in with `check_finite=True`.
  """
  for name, x in arrays.items():
    if isinstance(x, jax.core.Tracer):
      raise ValueError(
          f"check_finite=True reads the values of {name}, so it only works outside jax.jit")
    if x is not None and not bool(np.all(np.isfinite(np.asarray(x, np.float32)))):
      raise ValueError(f"{name} holds non-finite values (shape {tuple(x.shape)})")


def check_chunk_size(chunk_size: int) -> None:
  """Raises ValueError unless `chunk_size` is a positive int."""
  if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_memory_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: dict,
    initial_state: Optional[jax.Array],
) -> None:
  """Checks the layouts shared by linear attention and the delta rules.

  Args:
    q: queries, [B, T, H, K].
    k: keys, [B, T, H, K].
    v: values, [B, T, H, V].
    gates: per-token gates by name (e.g. ``{"g": g, "beta": beta}``), each [B, T, H] or None.
    initial_state: None or the float32 state [B, H, K, V].
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have 4 dims [B, T, H, D], got shape {tuple(x.shape)}")
    check_floating(name, x)
  b, t, h, dk = q.shape
  if t < 1:
    raise ValueError(f"q must hold at least one token (T >= 1), got shape {tuple(q.shape)}")
  check_shape("k", k, q.shape, "[B, T, H, K] like q")
  dv = v.shape[-1]
  check_shape("v", v, (b, t, h, dv), "[B, T, H, V] with B, T, H of q")
  for name, gate in gates.items():
    if gate is not None:
      check_floating(name, gate)
      check_shape(name, gate, (b, t, h), "[B, T, H]")
  if initial_state is not None:
    check_shape("initial_state", initial_state, (b, h, dk, dv), "[B, H, K, V]")
    if initial_state.dtype != jnp.float32:
      raise ValueError(
          f"initial_state must be float32 (the state is always float32), got "
          f"{initial_state.dtype}")


def prepare_memory_call(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: dict,
    *,
    scale: Optional[float],
    initial_state: Optional[jax.Array],
    chunk_size: int,
    check_finite: bool,
):
  """Validates the arguments of a matrix-memory op and fills in the defaults.

  Args:
    q, k, v, gates, initial_state: as in `check_memory_inputs`.
    scale: output scale, None for `K ** -0.5`.
    chunk_size: chunk length of the chunkwise forms.
    check_finite: also check that no input holds NaN or inf (outside jit only).

  Returns:
    `(scale, initial_state)` with the defaults filled in: the state is zeros [B, H, K, V]
    float32 when None was given.
  """
  check_memory_inputs(q, k, v, gates, initial_state)
  check_chunk_size(chunk_size)
  if check_finite:
    check_all_finite(q=q, k=k, v=v, initial_state=initial_state, **gates)
  b, _, h, dk = q.shape
  if scale is None:
    scale = dk ** -0.5
  if initial_state is None:
    initial_state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
  return scale, initial_state
