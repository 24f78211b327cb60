"""linear_scan: reference vs associative scan, against a plain loop, gradients and errors."""

import jax
import jax.numpy as jnp
import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from memjax import ops
from tests.conftest import GRAD_RTOL, RTOL, assert_close


def _inputs(key, shape, dtype):
  ka, kb, kh = jax.random.split(key, 3)
  a = jax.random.uniform(ka, shape, minval=0.5, maxval=1.0).astype(dtype)
  b = jax.random.normal(kb, shape).astype(dtype)
  h0 = jax.random.normal(kh, shape[:1] + shape[2:])
  return a, b, h0


def _loop(a, b, h0, reverse):
  """The recurrence written out in float64 numpy."""
  a, b, h = (np.asarray(x, np.float64) for x in (a, b, h0))
  out = np.zeros_like(b)
  steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
  for t in steps:
    h = a[:, t] * h + b[:, t]
    out[:, t] = h
  return out


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 33, 3), (1, 7, 2, 5), (3, 1)])
@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_matches_loop(key, shape, reverse, implementation):
  a, b, h0 = _inputs(key, shape, jnp.float32)
  h = ops.linear_scan(a, b, h0, reverse=reverse, implementation=implementation)
  assert h.shape == shape and h.dtype == jnp.float32
  assert_close(h, _loop(a, b, h0, reverse), RTOL[jnp.float32])


def test_bfloat16_inputs(key):
  a, b, h0 = _inputs(key, (2, 64, 8), jnp.bfloat16)
  h = ops.linear_scan(a, b, h0, implementation="xla")
  assert h.dtype == jnp.bfloat16
  assert_close(h, _loop(a, b, h0, False), RTOL[jnp.bfloat16])


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_agree(key, reverse):
  a, b, h0 = _inputs(key, (2, 40, 4), jnp.float32)
  cot = jax.random.normal(jax.random.fold_in(key, 1), b.shape)

  def vjp(impl):
    _, pullback = jax.vjp(
        lambda *x: ops.linear_scan(*x, reverse=reverse, implementation=impl), a, b, h0)
    return pullback(cot)

  for got, want in zip(vjp("xla"), vjp("reference")):
    assert_close(got, want, GRAD_RTOL[jnp.float32])


def test_split_state(key):
  a, b, h0 = _inputs(key, (2, 30, 4), jnp.float32)
  whole = ops.linear_scan(a, b, h0)
  first = ops.linear_scan(a[:, :11], b[:, :11], h0)
  second = ops.linear_scan(a[:, 11:], b[:, 11:], first[:, -1])
  assert_close(jnp.concatenate([first, second], 1), whole, RTOL[jnp.float32])


def test_step_matches_scan(key):
  a, b, h0 = _inputs(key, (2, 9, 4), jnp.float32)
  h, steps = h0, []
  for t in range(a.shape[1]):
    h = ops.linear_scan_step(a[:, t], b[:, t], h)
    steps.append(h)
  assert_close(jnp.stack(steps, 1), ops.linear_scan(a, b, h0), RTOL[jnp.float32])


def test_bad_inputs():
  a = jnp.ones((2, 5, 3))
  with pytest.raises(ValueError, match=r"b must have shape"):
    ops.linear_scan(a, jnp.ones((2, 5, 4)))
  with pytest.raises(ValueError, match=r"h0 must have shape .*\(2, 3\)"):
    ops.linear_scan(a, a, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r"a must have a floating dtype"):
    ops.linear_scan(jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r"implementation"):
    ops.linear_scan(a, a, implementation="cuda")


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    length=st.integers(2, 24),
    split_fraction=st.floats(0.01, 0.99),
    reverse=st.booleans(),
    seed=st.integers(0, 2 ** 31 - 1),
)
def test_any_split_continues_exactly(length, split_fraction, reverse, seed):
  """Running the sequence in two pieces, carrying the state, equals running it whole."""
  split = min(max(int(split_fraction * length), 1), length - 1)
  a, b, h0 = _inputs(jax.random.key(seed), (2, length, 3), jnp.float32)
  scan = lambda a, b, h: ops.linear_scan(a, b, h, reverse=reverse, implementation="xla")
  head, tail = (slice(None, split), slice(split, None))
  if reverse:  # The recurrence starts at the end, so the tail runs first.
    tail_out = scan(a[:, tail], b[:, tail], h0)
    head_out = scan(a[:, head], b[:, head], tail_out[:, 0])
  else:
    head_out = scan(a[:, head], b[:, head], h0)
    tail_out = scan(a[:, tail], b[:, tail], head_out[:, -1])
  assert_close(jnp.concatenate([head_out, tail_out], 1), scan(a, b, h0), RTOL[jnp.float32])
