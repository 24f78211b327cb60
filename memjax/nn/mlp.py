"""Feed-forward layers."""

import flax.linen as nn
import jax

from memjax.nn.partitioning import dense


class SwiGLU(nn.Module):
  """`W_down (silu(W_gate x) * W_up x)`, the feed-forward layer of the decoder blocks.

  Kernels: gate and up [D, hidden] ("embed", "mlp"), down [hidden, D] ("mlp", "embed"), so
  tensor parallelism splits the hidden units and the down projection's partial sums are
  reduced once.

  Attributes:
    hidden_dim: width of the gated hidden layer.
  """
  hidden_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    gate = dense(self.hidden_dim, ("embed", "mlp"), name="gate_proj")(x)
    up = dense(self.hidden_dim, ("embed", "mlp"), name="up_proj")(x)
    return dense(x.shape[-1], ("mlp", "embed"), name="down_proj")(jax.nn.silu(gate) * up)
