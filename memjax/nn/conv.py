"""Causal depthwise short convolution with an explicit state, for the memory mixers.

Under a mesh that splits the sequence over "seq", XLA partitions the convolution: each
shard needs only the last `kernel_size - 1` tokens of the shard before it."""

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
    channels = x.shape[-1]
    init = partitioned(nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                       (None, self.channel_axis))
    kernel = self.param("kernel", init, (width, channels), jnp.float32)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    length = x.shape[1]
    # The window is short, so a sum of shifted slices is cheaper than a general conv.
    y = sum(padded[:, i:i + length] * kernel[i].astype(x.dtype) for i in range(width))
    return jax.nn.silu(y), padded[:, length:]

  def init_state(self, batch_size: int, channels: int, dtype=jnp.float32) -> jax.Array:
    """Zeros [batch_size, kernel_size - 1, channels]."""
    return jnp.zeros((batch_size, self.kernel_size - 1, channels), dtype)
