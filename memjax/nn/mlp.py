"""Feed-forward layers."""

import flax.linen as nn
import jax


class SwiGLU(nn.Module):
  """`W_down (silu(W_gate x) * W_up x)`, the feed-forward layer of the decoder blocks.

  Attributes:
    hidden_dim: width of the gated hidden layer.
  """
  hidden_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    gate = nn.Dense(self.hidden_dim, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(self.hidden_dim, use_bias=False, name="up_proj")(x)
    return nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(jax.nn.silu(gate) * up)
