"""The compiled delta-rule / linear-attention kernels at real shapes against the reference:
forward, final state and every input's gradient. Runs on a GPU only (`pytest -m gpu`)."""

import jax
import jax.numpy as jnp
import pytest

from memjax import ops
from tests.conftest import GRAD_RTOL, RTOL, assert_close, memory_inputs

pytestmark = pytest.mark.gpu


def _call(op, implementation, x):
  def run(q, k, v, beta, g, initial_state):
    if op == "linear_attention":
      return ops.linear_attention(q, k, v, g, initial_state=initial_state,
                                  return_final_state=True, implementation=implementation)
    return ops.delta_rule(q, k, v, beta, g if op == "gated_delta_rule" else None,
                          initial_state=initial_state, return_final_state=True,
                          implementation=implementation)
  args = (x["q"], x["k"], x["v"], x["beta"], x["g"], x["initial_state"])
  return jax.vjp(jax.jit(run), *args)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("op", ["gated_delta_rule", "delta_rule", "linear_attention"])
def test_kernel_matches_reference(key, op, dtype, head_dim):
  # T = 1000: fifteen chunks of 64 and a ragged last one.
  x = memory_inputs(key, 2, 1000, 2, head_dim, head_dim, dtype=dtype)
  (o, final), pullback = _call(op, "pallas", x)
  (o_ref, final_ref), pullback_ref = _call(op, "reference", x)
  assert_close(o, o_ref, RTOL[dtype], "o")
  assert_close(final, final_ref, RTOL[dtype], "final state")
  cotangents = (jax.random.normal(jax.random.fold_in(key, 1), o.shape).astype(o.dtype),
                jax.random.normal(jax.random.fold_in(key, 2), final.shape))
  names = ("dq", "dk", "dv", "dbeta", "dg", "dinitial_state")
  for name, got, want in zip(names, pullback(cotangents), pullback_ref(cotangents)):
    if (name == "dbeta" and op == "linear_attention") or (name == "dg" and op == "delta_rule"):
      continue  # an input the op does not read: both cotangents are zero
    assert_close(got, want, GRAD_RTOL[dtype], name)
