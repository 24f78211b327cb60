"""Causal depthwise short convolution with an explicit state, for the memory mixers.

Under a mesh that splits the sequence over "seq", XLA partitions the convolution: each
shard needs only the last `kernel_size - 1` tokens of the shard before it. The taps are
written as shifts (a pad, then a slice to the same length), which XLA's partitioner turns
into that halo exchange; a concatenation of the state and the inputs along the split axis
would instead reshard the whole activation (an all-to-all there and back)."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.nn.partitioning import partitioned


class ShortConvolution(nn.Module):
  """Causal depthwise 1-D convolution over time followed by SiLU.

  Each channel sees its own last `kernel_size` inputs. The state holds the last
  `kernel_size - 1` inputs, so a sequence run in pieces (or token by token) gives the same
  outputs as the whole sequence.

  The kernel [kernel_size, C] has logical axes (None, `channel_axis`): the convolution
  is per channel, so its channels split as the projection before it splits them.

  Attributes:
    kernel_size: width of the convolution window (4 in the Gated DeltaNet paper).
    channel_axis: logical name of the channels, "heads" for the H * K channels of a
      per-head projection (None: never split).
  """
  kernel_size: int = 4
  channel_axis: Optional[str] = "heads"

  @nn.compact
  def __call__(self, x: jax.Array, state: jax.Array):
    """Convolves a sequence.

    Args:
      x: inputs [B, T, C].
      state: the previous `kernel_size - 1` inputs [B, kernel_size - 1, C] (zeros at the
        start of a sequence).

    Returns:
      `(y, state)`: outputs [B, T, C] and the new state [B, kernel_size - 1, C].
    """
    width = self.kernel_size
    length, channels = x.shape[1], x.shape[-1]
    init = partitioned(nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                       (None, self.channel_axis))
    kernel = self.param("kernel", init, (width, channels), jnp.float32)
    taps = kernel.astype(x.dtype)
    # From a zero state, tap i sees the inputs `width - 1 - i` steps back.
    y = sum(_delay(x, width - 1 - i) * taps[i] for i in range(width))
    # The state reaches only the first width - 1 outputs: the same taps over
    # [state, zeros], computed on that short window and added at the front.
    state = state.astype(x.dtype)
    window = jnp.concatenate([state, jnp.zeros_like(state)], axis=1)
    front = sum(window[:, i:i + width - 1] * taps[i] for i in range(width))
    reached = min(length, width - 1)
    y = y + jnp.pad(front[:, :reached], ((0, 0), (0, length - reached), (0, 0)))
    if length >= width - 1:
      new_state = x[:, length - (width - 1):]
    else:  # Fewer new tokens than the window (decoding): part of the old state stays.
      new_state = jnp.concatenate([state, x], axis=1)[:, length:]
    return jax.nn.silu(y), new_state

  def init_state(self, batch_size: int, channels: int, dtype=jnp.float32) -> jax.Array:
    """Zeros [batch_size, kernel_size - 1, channels]."""
    return jnp.zeros((batch_size, self.kernel_size - 1, channels), dtype)


def _delay(x: jax.Array, steps: int) -> jax.Array:
  """x [B, T, C] moved `steps` tokens later along T, zeros in front; same shape."""
  if steps == 0:
    return x
  return jnp.pad(x, ((0, 0), (steps, 0), (0, 0)))[:, :x.shape[1]]
