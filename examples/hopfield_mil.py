r"""Attention-based multiple-instance learning with `memjax.nn.HopfieldPooling`.

Synthetic bags: each bag holds a random number of Gaussian instances (padded to a fixed
size, padding masked); a bag is positive when at least one instance comes from a shifted
"witness" distribution. A small network embeds the instances, pools each bag with a learned
Hopfield state pattern and classifies the pooled vector. Prints train loss and held-out
accuracy.

  python examples/hopfield_mil.py
  python examples/hopfield_mil.py --small
"""

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax import nn as mnn

_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Bags per step.")
_SMALL = flags.DEFINE_bool("small", False, "A tiny setting that runs in seconds.")


def make_bags(rng: np.random.Generator, num_bags: int, max_size: int, dim: int,
              shift: float = 1.5):
  """Bags [B, max_size, dim], padding masks [B, max_size] (True = padding), labels [B]."""
  sizes = rng.integers(max_size // 2, max_size + 1, num_bags)
  bags = rng.normal(size=(num_bags, max_size, dim)).astype(np.float32)
  labels = rng.integers(0, 2, num_bags)
  for i in np.flatnonzero(labels):
    witnesses = rng.choice(sizes[i], rng.integers(1, 3), replace=False)
    bags[i, witnesses, 0] += shift * 2  # Witnesses stand out along one direction.
  padding = np.arange(max_size)[None] >= sizes[:, None]
  bags[padding] = 0.0
  return bags, padding, labels.astype(np.float32)


class MILClassifier(nn.Module):
  """Instance embedding -> Hopfield pooling over the bag -> one logit."""
  hidden: int = 32
  num_heads: int = 2

  @nn.compact
  def __call__(self, bags, padding):
    x = nn.relu(nn.Dense(self.hidden)(bags))
    pooled = mnn.HopfieldPooling(input_size=self.hidden, num_heads=self.num_heads,
                                 quantity=1)(x, padding)
    return nn.Dense(1)(pooled)[:, 0]


def run(steps: int, batch_size: int, max_size: int = 16, dim: int = 8, seed: int = 0) -> dict:
  """Trains and returns {"loss": last train loss, "accuracy": held-out accuracy}."""
  rng = np.random.default_rng(seed)
  model = MILClassifier()
  bags, padding, _ = make_bags(rng, batch_size, max_size, dim)
  params = model.init(jax.random.key(seed), bags, padding)
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  def loss_fn(params, bags, padding, labels):
    logits = model.apply(params, bags, padding)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

  @jax.jit
  def train_step(params, opt_state, bags, padding, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, bags, padding, labels)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  for step in range(1, steps + 1):
    params, opt_state, loss = train_step(params, opt_state, *make_bags(
        rng, batch_size, max_size, dim))
    if step % max(steps // 5, 1) == 0:
      print(f"step {step:4d}  train loss {float(loss):.4f}")
  bags, padding, labels = make_bags(rng, 512, max_size, dim)
  predictions = np.asarray(model.apply(params, bags, padding)) > 0
  accuracy = float(np.mean(predictions == (labels > 0.5)))
  print(f"held-out accuracy {accuracy:.3f}")
  return {"loss": float(loss), "accuracy": accuracy}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SMALL.value:
    run(steps=40, batch_size=32)
  else:
    run(_STEPS.value, _BATCH.value)


if __name__ == "__main__":
  app.run(main)
