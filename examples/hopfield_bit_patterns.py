r"""Bit-pattern retrieval with a pure-retrieval `memjax.nn.Hopfield` layer.

Stores random binary images, hides the lower half of each query (set to 0) and retrieves
the whole image; prints the bit accuracy of the retrieved halves for several beta. Large
beta recovers the stored image; small beta returns a mixture of patterns (a metastable
state).

  python examples/hopfield_bit_patterns.py
  python examples/hopfield_bit_patterns.py --small
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from memjax import nn as mnn

_SIDE = flags.DEFINE_integer("side", 16, "Images are side x side bits.")
_NUM_PATTERNS = flags.DEFINE_integer("num_patterns", 64, "Stored images.")
_BETAS = flags.DEFINE_list("betas", ["0.01", "0.05", "0.2", "1", "4"], "Values of beta.")
_SMALL = flags.DEFINE_bool("small", False, "A tiny setting that runs in seconds.")

# Every input used as it is: the layer is the bare update xi <- X^T softmax(beta X xi).
PURE_RETRIEVAL = dict(
    stored_pattern_as_static=True, state_pattern_as_static=True,
    pattern_projection_as_static=True, normalize_stored_pattern=False,
    normalize_stored_pattern_affine=False, normalize_state_pattern=False,
    normalize_state_pattern_affine=False, normalize_pattern_projection=False,
    normalize_pattern_projection_affine=False, disable_out_projection=True)


def run(side: int, num_patterns: int, betas, seed: int = 0) -> dict:
  """Returns {beta: bit accuracy on the hidden halves}."""
  dim = side * side
  patterns = jnp.sign(jax.random.normal(jax.random.key(seed), (1, num_patterns, dim)))
  hidden = jnp.arange(dim) >= dim // 2
  queries = jnp.where(hidden, 0.0, patterns)
  accuracy = {}
  for beta in betas:
    layer = mnn.Hopfield(scaling=beta, update_steps_max=3, **PURE_RETRIEVAL)
    retrieved = layer.apply({}, (patterns, queries, patterns))
    correct = jnp.sign(retrieved) == patterns
    accuracy[beta] = float(jnp.mean(correct[..., hidden]))
    print(f"beta={beta:<6g} bit accuracy on the hidden half: {accuracy[beta]:.3f}")
  return accuracy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SMALL.value:
    run(side=8, num_patterns=8, betas=[0.001, 1.0])
  else:
    run(_SIDE.value, _NUM_PATTERNS.value, [float(b) for b in _BETAS.value])


if __name__ == "__main__":
  app.run(main)
