"""Block sizes and shape preparation shared by the GPU and TPU linear_scan kernels."""

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile of one kernel step.

  Attributes:
    time: time steps loaded per step of a program's sequential walk over T.
    channels: channels per program (one grid point per batch row and channel block).
  """
  time: int
  channels: int


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def flatten_and_pad(a, b, h0, blocks: BlockSizes):
  """[B, T, ...] inputs to [B, T_pad, C_pad] and h0 to float32 [B, C_pad].

  Padded steps have a = 1, b = 0: they carry the state through unchanged, so the final state
  is exact in either direction, and padded channels stay 0.

  Returns:
    (a, b, h0) padded, and a function mapping a padded [B, T_pad, C_pad] result back to
    [B, T, ...].
  """
  batch, steps, *trailing = a.shape
  channels = 1
  for n in trailing:
    channels *= n
  pad_t = round_up(steps, blocks.time) - steps
  pad_c = round_up(channels, blocks.channels) - channels
  widths = ((0, 0), (0, pad_t), (0, pad_c))
  a = jnp.pad(a.reshape(batch, steps, channels), widths, constant_values=1)
  b = jnp.pad(b.reshape(batch, steps, channels), widths)
  h0 = jnp.pad(h0.reshape(batch, channels).astype(jnp.float32), ((0, 0), (0, pad_c)))

  def unflatten(h: jax.Array) -> jax.Array:
    return h[:, :steps, :channels].reshape(batch, steps, *trailing)

  return a, b, h0, unflatten


def scan_vjp(scan, a, h, h0, g, reverse: bool):
  """Cotangents (da, db, dh0) of `h = scan(a, b, h0)` given g = dL/dh, all [B, T, C].

  The adjoint d_t = g_t + a_{t+1} d_{t+1} (mirrored for reverse) is the same recurrence run
  the other way with each decay applied one step late (`adjoint=True`); then db = d,
  da_t = d_t h_{t-1} with h_{-1} = h0, and dh0 = a_0 d_0.

  Args:
    scan: `scan(a, b, h0, reverse, adjoint)` -> [B, T, C] in b's dtype, the kernel call.
    a: decays, [B, T, C].
    h: the forward's output, [B, T, C].
    h0: float32 initial state, [B, C].
    g: cotangent of h, [B, T, C].
    reverse: the direction of the forward recurrence.
  """
  db = scan(a, g, jnp.zeros_like(h0), not reverse, True)
  d, h = db.astype(jnp.float32), h.astype(jnp.float32)
  if reverse:
    h_prev = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)
    dh0 = a[:, -1].astype(jnp.float32) * d[:, -1]
  else:
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    dh0 = a[:, 0].astype(jnp.float32) * d[:, 0]
  return (d * h_prev).astype(a.dtype), db, dh0


def differentiable(pallas_scan):
  """Wraps a kernel call in a `jax.custom_vjp` whose backward is the adjoint scan.

  Only `a`, `h` and `h0` are saved for the backward (see `scan_vjp`).

  Args:
    pallas_scan: `pallas_scan(a, b, h0, reverse, adjoint, blocks, interpret)` -> h, the
      `pallas_call` of one chip, on padded [B, T, C] inputs and a float32 [B, C] h0.

  Returns:
    `scan(a, b, h0, reverse, blocks, interpret)` -> h, differentiable in a, b and h0.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
  def scan(a, b, h0, reverse, blocks, interpret):
    return pallas_scan(a, b, h0, reverse, False, blocks, interpret)

  def scan_fwd(a, b, h0, reverse, blocks, interpret):
    h = pallas_scan(a, b, h0, reverse, False, blocks, interpret)
    return h, (a, h, h0)

  def scan_bwd(reverse, blocks, interpret, residuals, g):
    a, h, h0 = residuals
    run = lambda a, b, h0, reverse, adjoint: pallas_scan(
        a, b, h0, reverse, adjoint, blocks, interpret)
    return scan_vjp(run, a, h, h0, g, reverse)

  scan.defvjp(scan_fwd, scan_bwd)
  return scan
