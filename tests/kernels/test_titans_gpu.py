"""The compiled neural-memory kernels at real shapes against the xla path: outputs, final
state and every input's gradient, from a state left part way into a chunk. Runs on a GPU
only (`pytest -m gpu`)."""

import jax.numpy as jnp
import pytest

from memjax import ops

from tests.kernels.test_titans import _compare, _inputs, _with_state

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_xla(key, dtype, head_dim):
  # 21 tokens seen, then T = 1000: the first chunk entered part way, a ragged last one.
  inputs, state = _inputs(key, 2, 1021, 4, head_dim, head_dim, dtype)
  names, args, call = _with_state(inputs, state, 21, 64)
  _compare(call, args, names, dtype, key)


def test_mlp_memory_kernel_matches_xla(key):
  # The MLP memory's kernel is only run when asked for by name (see `neural_memory`); on a
  # GPU it compiles forward and backward with bfloat16 inputs and a small hidden layer.
  # Little forgetting keeps the comparison well conditioned over 533 tokens (see _inputs).
  inputs, state = _inputs(key, 2, 533, 4, 64, 64, jnp.bfloat16, hidden=64, max_alpha=0.02)
  names, args, call = _with_state(inputs, state, 21, 64)
  _compare(call, args, names, jnp.bfloat16, key)


@pytest.mark.parametrize("dtype, hidden, size", [(jnp.float32, 64, 96),
                                                 (jnp.bfloat16, 256, 384)])
def test_mlp_memory_kernel_refuses_what_does_not_fit_on_chip(key, dtype, hidden, size):
  inputs, state = _inputs(key, 1, 64, 1, 64, 64, dtype, hidden=hidden)
  with pytest.raises(ValueError, match=f"{size} KiB of state per head"):
    ops.neural_memory(**inputs, initial_state=state, implementation="pallas")
