"""Diagonal linear recurrence `h_t = a_t * h_{t-1} + b_t` along the time axis (axis 1)."""

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from memjax.kernels.linear_scan import gpu as gpu_kernel
from memjax.kernels.linear_scan import tpu as tpu_kernel
from memjax.ops import dispatch
from memjax.ops import validation


def linear_scan_step(a: jax.Array, b: jax.Array, h: jax.Array) -> jax.Array:
  """One step of the recurrence: `a * h + b` (all [B, ...]), in float32 or wider.

  Args:
    a: decay of this step, [B, ...].
    b: input of this step, [B, ...].
    h: previous state, [B, ...].

  Returns:
    The new state, [B, ...], in the accumulation dtype (float32 for bf16 inputs).
  """
  dtype = accumulation_dtype(a, b)
  return a.astype(dtype) * h.astype(dtype) + b.astype(dtype)


def accumulation_dtype(*xs: jax.Array):
  """The dtype the scan accumulates in: the inputs' promoted with float32 (at least fp32)."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _reference(a, b, h0, reverse):
  dtype = accumulation_dtype(a, b)

  def step(h, ab):
    h = linear_scan_step(ab[0], ab[1], h)
    return h, h

  _, hs = lax.scan(step, h0.astype(dtype), (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)),
                   reverse=reverse)
  return jnp.moveaxis(hs, 0, 1)


def _xla(a, b, h0, reverse):
  dtype = accumulation_dtype(a, b)
  a, b = a.astype(dtype), b.astype(dtype)
  # Folding h0 into the first input (the last one when reversed) makes the scan start at 0.
  first = -1 if reverse else 0
  b = b.at[:, first].add(a[:, first] * h0.astype(dtype))

  def combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2

  _, h = lax.associative_scan(combine, (a, b), reverse=reverse, axis=1)
  return h


def _pallas(a, b, h0, reverse):
  if jax.default_backend() == "tpu":
    return tpu_kernel.linear_scan(a, b, h0, reverse=reverse)
  # GPUs compile the Triton kernel; elsewhere its body runs in the interpreter.
  return gpu_kernel.linear_scan(a, b, h0, reverse=reverse,
                                interpret=not dispatch.pallas_compiles())


_IMPLEMENTATIONS = {"reference": _reference, "xla": _xla, "pallas": _pallas}


def linear_scan(
    a: jax.Array,
    b: jax.Array,
    h0: Optional[jax.Array] = None,
    *,
    reverse: bool = False,
    implementation: Optional[str] = None,
) -> jax.Array:
  """Computes `h_t = a_t * h_{t-1} + b_t` for all t, elementwise, along axis 1.

  With `reverse=True` the recurrence runs from the end: `h_t = a_t * h_{t+1} + b_t`, and
  `h0` is the state after the last step.

  Args:
    a: decays, [B, T, ...] (any trailing shape).
    b: inputs, same shape as `a`.
    h0: initial state, [B, ...] (`a.shape` without axis 1); zeros when None.
    reverse: run the recurrence from the last step to the first.
    implementation: "reference" (sequential `lax.scan`), "xla" (`lax.associative_scan`),
      "pallas" (the kernel of `memjax.kernels.linear_scan`; interpreted on a CPU) or None
      for the fastest available (see `memjax.ops.dispatch`).

  Returns:
    All states h, [B, T, ...], in the dtype of `b` (accumulated in float32 or wider).
    The final state is `h[:, -1]` (`h[:, 0]` when reversed).
  """
  for name, x in (("a", a), ("b", b)):
    validation.check_floating(name, x)
  if a.ndim < 2:
    raise ValueError(f"a must have at least 2 dims [B, T, ...], got shape {tuple(a.shape)}")
  validation.check_shape("b", b, a.shape, "[B, T, ...] like a")
  state_shape = a.shape[:1] + a.shape[2:]
  if h0 is None:
    h0 = jnp.zeros(state_shape, accumulation_dtype(a, b))
  else:
    validation.check_floating("h0", h0)
    validation.check_shape("h0", h0, state_shape, "[B, ...] (a.shape without axis 1)")
  impl = dispatch.choose("linear_scan", implementation, _IMPLEMENTATIONS)
  return impl(a, b, h0, reverse).astype(b.dtype)
