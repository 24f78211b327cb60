r"""Retrieval error vs the number of stored random patterns: dense, sparse and classical.

Stores N random binary patterns of dimension d, queries each with a copy that has a fraction
`--noise` of its bits flipped, and measures the bit error of one retrieval:

* dense: modern Hopfield, `xi <- X^T softmax(beta X xi)` (Ramsauer et al. 2020);
* sparse: the same with sparsemax (generalized sparse Hopfield, alpha = 2);
* classical: `xi <- sign(W xi)`, `W = sum_mu x_mu x_mu^T` with zero diagonal (Hopfield 1982).

Theory drawn with the measurements: the classical one-step bit error
`Phi(-(1 - 2 noise) sqrt(d / N))` (signal over the crosstalk of N - 1 patterns) and its
capacity ~0.138 d; the modern networks store exponentially many patterns in d, so their
error stays near zero over this whole range.

  python experiments/hopfield_capacity.py --workdir=/tmp/memjax/hopfield_capacity
  python experiments/hopfield_capacity.py --small --workdir=/tmp/memjax/hopfield_small
"""

import json
import math
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from memjax import ops

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/memjax/hopfield_capacity", "Output folder.")
_DIM = flags.DEFINE_integer("dim", 64, "Pattern dimension d.")
_NUM_PATTERNS = flags.DEFINE_list(
    "num_patterns", ["4", "8", "16", "32", "64", "128", "256", "512"], "Values of N.")
_NOISE = flags.DEFINE_float("noise", 0.1, "Fraction of flipped bits in each query.")
_BETA = flags.DEFINE_float("beta", 0.5, "Inverse temperature of the modern networks.")
_TRIALS = flags.DEFINE_integer("trials", 4, "Random pattern sets per N.")
_SMALL = flags.DEFINE_bool("small", False, "A tiny setting that runs in seconds.")


def bit_errors(key, dim: int, n: int, noise: float, beta: float, trials: int) -> dict:
  """Mean bit error of one retrieval for each network, over `trials` pattern sets."""
  k1, k2 = jax.random.split(key)
  patterns = jnp.sign(jax.random.normal(k1, (trials, n, 1, dim)))  # [B, S, H=1, d]
  flips = jax.random.bernoulli(k2, noise, patterns.shape)
  queries = jnp.where(flips, -patterns, patterns)
  error = lambda out: float(jnp.mean(jnp.sign(out) != patterns))
  result = {}
  for name in ("softmax", "sparsemax"):
    out = ops.hopfield_retrieval(queries, patterns, patterns, scaling=beta, normalizer=name)
    result["dense" if name == "softmax" else "sparse"] = error(out)
  x = patterns[:, :, 0]
  weights = jnp.einsum("bni,bnj->bij", x, x) * (1.0 - jnp.eye(dim))
  result["classical"] = error(jnp.einsum("bij,bnj->bni", weights, queries[:, :, 0])[:, :, None])
  return result


def classical_theory(dim: int, n: int, noise: float) -> float:
  """One-step bit error of the classical network: Phi(-(1 - 2 noise) sqrt(d / N))."""
  z = (1.0 - 2.0 * noise) * math.sqrt(dim / n)
  return 0.5 * math.erfc(z / math.sqrt(2.0))


def run(workdir: str, dim: int, num_patterns, noise: float, beta: float, trials: int,
        seed: int = 0) -> dict:
  """Measures every N, writes results.json and capacity.png to `workdir`, returns results."""
  os.makedirs(workdir, exist_ok=True)
  key = jax.random.key(seed)
  rows = []
  for i, n in enumerate(num_patterns):
    measured = bit_errors(jax.random.fold_in(key, i), dim, n, noise, beta, trials)
    rows.append(dict(num_patterns=n, theory_classical=classical_theory(dim, n, noise),
                     **measured))
    print(f"N={n:5d}  " + "  ".join(f"{k}={v:.4f}" for k, v in rows[-1].items()
                                    if k != "num_patterns"))
  results = dict(dim=dim, noise=noise, beta=beta, trials=trials, rows=rows)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)

  import matplotlib  # Imported here: only the plot needs it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ns = [r["num_patterns"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, style in (("dense", "o-"), ("sparse", "s-"), ("classical", "^-")):
    ax.plot(ns, [r[name] for r in rows], style, label=f"{name} (measured)")
  ax.plot(ns, [r["theory_classical"] for r in rows], "k--", label="classical (theory)")
  ax.axvline(0.138 * dim, color="gray", ls=":", label="classical capacity 0.138 d")
  ax.set(xscale="log", xlabel="stored patterns N", ylabel="bit error after one update",
         title=f"d={dim}, {noise:.0%} flipped bits, beta={beta}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "capacity.png"), dpi=120)
  plt.close(fig)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _SMALL.value:
    run(_WORKDIR.value, dim=16, num_patterns=[2, 32], noise=_NOISE.value,
        beta=_BETA.value, trials=2)
  else:
    run(_WORKDIR.value, _DIM.value, [int(n) for n in _NUM_PATTERNS.value], _NOISE.value,
        _BETA.value, _TRIALS.value)


if __name__ == "__main__":
  app.run(main)
