"""linear_attention and delta_rule: reference vs chunkwise xla, a float64 loop, gradients,
split state, decode steps, and argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import ops
from tests.conftest import GRAD_RTOL, RTOL, assert_close, memory_inputs

# (op, the gates it takes, its one-token step)
OPS = {
    "linear_attention": (ops.linear_attention, ("g",), ops.linear_attention_step),
    "delta_rule": (ops.delta_rule, ("beta", "g"), ops.delta_rule_step),
}


def _call(op_name, inputs, **kwargs):
  op, gates, _ = OPS[op_name]
  args = [inputs["q"], inputs["k"], inputs["v"]] + [inputs[g] for g in gates]
  return op(*args, initial_state=inputs["initial_state"], **kwargs)


def _loop_float64(op_name, inputs):
  """The recurrence of DESIGN.md §2 written out in float64 numpy, token by token."""
  x = {n: None if a is None else np.asarray(a, np.float64) for n, a in inputs.items()}
  q, k, v, g, s = x["q"], x["k"], x["v"], x["g"], x["initial_state"].copy()
  scale = q.shape[-1] ** -0.5
  out = np.zeros(v.shape)
  for t in range(q.shape[1]):
    if g is not None:
      s = np.exp(g[:, t])[..., None, None] * s
    if op_name == "delta_rule":
      pred = np.einsum("bhk,bhkv->bhv", k[:, t], s)
      s = s + np.einsum("bhk,bhv->bhkv", k[:, t], x["beta"][:, t][..., None] * (v[:, t] - pred))
    else:
      s = s + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
    out[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], s)
  return out, s


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("gated", [False, True])
def test_reference_matches_float64_loop(key, op_name, gated):
  inputs = memory_inputs(key, 2, 13, 2, 8, 4, gated=gated)
  o, s = _call(op_name, inputs, return_final_state=True, implementation="reference")
  o64, s64 = _loop_float64(op_name, inputs)
  assert_close(o, o64, RTOL[jnp.float32], "outputs")
  assert_close(s, s64, RTOL[jnp.float32], "final state")


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("t,chunk,dk,dv", [(64, 16, 16, 16), (37, 16, 8, 24), (5, 64, 32, 8),
                                           (50, 7, 16, 16)])
def test_xla_matches_reference_fp32(key, op_name, gated, t, chunk, dk, dv):
  inputs = memory_inputs(key, 2, t, 2, dk, dv, gated=gated)
  ref_o, ref_s = _call(op_name, inputs, return_final_state=True, implementation="reference")
  o, s = _call(op_name, inputs, return_final_state=True, implementation="xla", chunk_size=chunk)
  assert o.shape == ref_o.shape and o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert_close(o, ref_o, RTOL[jnp.float32], "outputs")
  assert_close(s, ref_s, RTOL[jnp.float32], "final state")


@pytest.mark.parametrize("op_name", OPS)
def test_xla_matches_reference_bf16(key, op_name):
  inputs = memory_inputs(key, 2, 40, 2, 16, 16, dtype=jnp.bfloat16)
  ref_o, ref_s = _call(op_name, inputs, return_final_state=True, implementation="reference")
  o, s = _call(op_name, inputs, return_final_state=True, implementation="xla", chunk_size=16)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert_close(o, ref_o, RTOL[jnp.bfloat16], "outputs")
  assert_close(s, ref_s, RTOL[jnp.bfloat16], "final state")


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_agree(key, op_name, dtype):
  inputs = memory_inputs(key, 2, 24, 2, 8, 8, dtype=dtype)
  _, gates, _ = OPS[op_name]
  names = ["q", "k", "v", *gates, "initial_state"]
  primals = [inputs[n] for n in names]

  def run(impl, *args):
    named = dict(zip(names, args))
    return _call(op_name, named, return_final_state=True, implementation=impl, chunk_size=8)

  o, s = run("reference", *primals)
  cot = (jax.random.normal(jax.random.fold_in(key, 1), o.shape).astype(o.dtype),
         jax.random.normal(jax.random.fold_in(key, 2), s.shape))
  grads = {impl: jax.vjp(functools.partial(run, impl), *primals)[1](cot)
           for impl in ("reference", "xla")}
  for name, got, want in zip(names, grads["xla"], grads["reference"]):
    assert_close(got, want, GRAD_RTOL[dtype], f"d{name}")


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_split_state(key, op_name, implementation):
  inputs = memory_inputs(key, 2, 45, 2, 8, 8)
  whole, whole_s = _call(op_name, inputs, return_final_state=True,
                         implementation=implementation, chunk_size=16)
  split = 19
  first_half = {n: a if a is None or n == "initial_state" else a[:, :split]
                for n, a in inputs.items()}
  o1, s1 = _call(op_name, first_half, return_final_state=True,
                 implementation=implementation, chunk_size=16)
  second_half = {n: a if a is None or n == "initial_state" else a[:, split:]
                 for n, a in inputs.items()}
  second_half["initial_state"] = s1
  o2, s2 = _call(op_name, second_half, return_final_state=True,
                 implementation=implementation, chunk_size=16)
  assert_close(jnp.concatenate([o1, o2], 1), whole, RTOL[jnp.float32], "outputs")
  assert_close(s2, whole_s, RTOL[jnp.float32], "final state")


@pytest.mark.parametrize("op_name", OPS)
def test_decode_steps_match_xla(key, op_name):
  inputs = memory_inputs(key, 2, 11, 2, 8, 8)
  _, gates, step = OPS[op_name]
  state, outs = inputs["initial_state"], []
  for t in range(11):
    o_t, state = step(inputs["q"][:, t], inputs["k"][:, t], inputs["v"][:, t],
                      *[inputs[g][:, t] for g in gates], state=state)
    outs.append(o_t)
  o, s = _call(op_name, inputs, return_final_state=True, implementation="xla", chunk_size=4)
  assert_close(jnp.stack(outs, 1), o, RTOL[jnp.float32], "outputs")
  assert_close(state, s, RTOL[jnp.float32], "state")


def test_delta_rule_without_gate_is_deltanet(key):
  """g = 0 everywhere is the same computation as g = None."""
  inputs = memory_inputs(key, 1, 20, 2, 8, 8)
  zeros = dict(inputs, g=jnp.zeros_like(inputs["g"]))
  none = dict(inputs, g=None)
  assert_close(_call("delta_rule", zeros, implementation="xla"),
               _call("delta_rule", none, implementation="xla"), RTOL[jnp.float32])


def test_default_scale_and_explicit_scale(key):
  inputs = memory_inputs(key, 1, 9, 1, 16, 4)
  default = _call("delta_rule", inputs, implementation="xla")
  explicit = _call("delta_rule", inputs, implementation="xla", scale=0.25)
  assert_close(default, explicit, RTOL[jnp.float32])  # 16 ** -0.5 == 0.25
  doubled = _call("delta_rule", inputs, implementation="xla", scale=0.5)
  assert_close(doubled, 2 * default, RTOL[jnp.float32])


@pytest.mark.parametrize("op_name", OPS)
def test_bad_inputs(op_name):
  good = memory_inputs(jax.random.key(0), 2, 6, 3, 8, 4)
  cases = [
      (dict(k=good["k"][:, :5]), r"k must have shape \[B, T, H, K\] like q = \(2, 6, 3, 8\), got \(2, 5, 3, 8\)"),
      (dict(v=good["v"][:, :, :2]), r"v must have shape .*\(2, 6, 3, 4\), got \(2, 6, 2, 4\)"),
      (dict(q=good["q"][0]), r"q must have 4 dims"),
      (dict(g=good["g"][..., None]), r"g must have shape \[B, T, H\] = \(2, 6, 3\)"),
      (dict(initial_state=jnp.zeros((2, 3, 4, 8))), r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 8, 4\)"),
      (dict(initial_state=jnp.zeros((2, 3, 8, 4), jnp.bfloat16)), r"initial_state must be float32"),
      (dict(v=good["v"].astype(jnp.int32)), r"v must have a floating dtype"),
  ]
  if op_name == "delta_rule":
    cases.append((dict(beta=good["beta"][:, :3]), r"beta must have shape \[B, T, H\]"))
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      _call(op_name, dict(good, **change))
  for chunk in (0, -4, 2.5, True):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
      _call(op_name, good, chunk_size=chunk)
  with pytest.raises(ValueError, match="implementation"):
    _call(op_name, good, implementation="triton")
  with pytest.raises(ValueError, match="'pallas' needs head dims"):  # K = 8: no kernel
    _call(op_name, good, implementation="pallas")


def test_check_finite(key):
  inputs = memory_inputs(key, 1, 4, 1, 4, 4)
  bad = dict(inputs, v=inputs["v"].at[0, 2, 0, 1].set(jnp.nan))
  with pytest.raises(ValueError, match="v holds non-finite values"):
    _call("delta_rule", bad, check_finite=True)
  with pytest.raises(ValueError, match="outside jax.jit"):
    jax.jit(lambda v: _call("delta_rule", dict(inputs, v=v), check_finite=True))(inputs["v"])
