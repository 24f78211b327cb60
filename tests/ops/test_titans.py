"""neural_memory (Titans / Miras): chunkwise xla vs the token-by-token reference, a float64
loop written out by hand, gradients, split state, decode steps and argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import ops
from memjax.ops import miras
from memjax.ops import titans
from memjax.ops import titans_chunked
from tests.conftest import GRAD_RTOL, RTOL, assert_close

PRESETS = ("titans", "moneta", "yaad", "memora")
# The chunked (dual) form and the per-token reference sum in different orders, and the MLP
# memory's layer norm and Memora's softmax retention amplify the float32 difference: over
# 65 fresh seeds per preset the largest relative errors were 6.7e-5 (outputs, Memora) and
# 2.7e-5 (states), above RTOL's 1e-5. A wrong term would be off by far more than 3e-4.
STATE_RTOL = 3e-4
OUTPUT_RTOL = 3e-4


# Jitted: eager ops each compile on their own, which costs more than the math here.
_init_state = jax.jit(titans.init_state, static_argnums=1, static_argnames="rule")


def _inputs(key, b, t, h, dk, dv, depth, rule):
  """Random q, k (unit norm), v, gates in their ranges and an initial state of `rule`.

  Drawn with numpy (seeded from the fresh key): eager jax.random ops would each compile.
  """
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  gate = lambda: 1 / (1 + np.exp(-normal(b, t, h)))
  k = normal(b, t, h, dk)
  if depth == 1:
    weights = (0.5 * normal(h, dk, dv),)
  else:
    hidden = 2 * dk
    weights = (normal(h, dk, hidden) * dk ** -0.5, normal(h, hidden, dv) * hidden ** -0.5)
  huber = miras.resolve(rule).loss == "huber"
  arrays = dict(
      q=normal(b, t, h, dk), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
      v=normal(b, t, h, dv), theta=0.2 * gate(), eta=gate(), alpha=0.2 * gate(),
      huber_delta=2 * np.logaddexp(0, normal(b, t, h) + 0.5) if huber else None)
  inputs = {n: None if x is None else jnp.asarray(x) for n, x in arrays.items()}
  return dict(inputs, initial_state=_init_state(tuple(map(jnp.asarray, weights)), b, rule=rule))


@functools.lru_cache(maxsize=None)
def _jitted(options):
  # A whole compiled call is much faster on a CPU than op-by-op dispatch, and tests that
  # share a configuration share its compilation.
  return jax.jit(functools.partial(ops.neural_memory, **dict(options)))


def _call(inputs, **kwargs):
  run = _jitted(tuple(sorted(kwargs.items())))
  args = [inputs[n] for n in ("q", "k", "v", "theta", "eta", "alpha")]
  return run(*args, huber_delta=inputs["huber_delta"], initial_state=inputs["initial_state"])


def _slice(inputs, start, stop, state):
  cut = lambda x: x if x is None else x[:, start:stop]
  named = {n: cut(x) for n, x in inputs.items() if n != "initial_state"}
  return dict(named, initial_state=state)


def _assert_states_close(got, want, rtol, what="state"):
  assert int(got.position) == int(want.position), f"{what}: position"
  for name in ("weights", "momentum", "anchor", "accumulator"):
    g, w = getattr(got, name), getattr(want, name)
    assert (g is None) == (w is None), f"{what}.{name}"
    for i, (a, b) in enumerate(zip(g or (), w or ())):
      assert a.dtype == jnp.float32
      assert_close(a, b, rtol, f"{what}.{name}[{i}]")


# Every loss and retention on the MLP memory; the linear memory of every preset is checked
# against the float64 loop below.
# (The split-state and decode tests reuse this configuration and its compilation.)
SEQUENCE = dict(b=2, t=13, h=2, dk=4, dv=4, depth=2)
CHUNK = 5


@pytest.mark.parametrize("rule", PRESETS)
def test_xla_matches_reference(key, rule):
  # T = 13 is not a multiple of the chunk.
  inputs = _inputs(key, rule=rule, **SEQUENCE)
  common = dict(rule=rule, return_final_state=True, chunk_size=CHUNK)
  ref_y, ref_s = _call(inputs, implementation="reference", **common)
  y, s = _call(inputs, implementation="xla", **common)
  assert y.shape == ref_y.shape == inputs["v"].shape and y.dtype == jnp.float32
  assert_close(y, ref_y, OUTPUT_RTOL, "outputs")
  _assert_states_close(s, ref_s, STATE_RTOL)
  assert int(s.position) == 13 % CHUNK


def _error64(rule, e, delta):
  """The loss gradient with respect to the prediction, as the Miras paper writes it."""
  if rule.loss == "l2":
    return 2 * e
  if rule.loss == "lp":
    return rule.p * np.tanh(rule.sign_sharpness * e) * np.sqrt(e ** 2 + rule.abs_eps) ** (rule.p - 1)
  inside = np.linalg.norm(e) <= delta
  return 2 * e if inside else delta * np.sign(e)


def _map64(rule, a):
  if rule.retention == "l2":
    return a
  if rule.retention == "lq":
    return a / np.sum(np.abs(a) ** rule.q) ** ((rule.q - 2) / rule.q)
  z = np.exp(a - a.max(axis=-1, keepdims=True))
  return rule.kl_scale * z / z.sum(axis=-1, keepdims=True)


def _linear_loop_float64(inputs, rule_name, chunk_size):
  """Titans / Miras with a linear memory W [K, V], one (batch, head) at a time, in float64:
  the gradient of each token is taken at the weights of its chunk's start."""
  rule = miras.resolve(rule_name)
  x = {n: None if a is None or n == "initial_state" else np.asarray(a, np.float64)
       for n, a in inputs.items()}
  start = np.asarray(inputs["initial_state"].accumulator[0] if rule.has_accumulator
                     else inputs["initial_state"].weights[0], np.float64)
  b, t, h, _ = x["q"].shape
  out = np.zeros(x["v"].shape)
  inside = []
  for bi in range(b):
    for hi in range(h):
      acc = start[bi, hi].copy()
      w = _map64(rule, acc)
      anchor, s = w.copy(), np.zeros_like(w)
      for ti in range(t):
        g = lambda n: x[n][bi, ti, hi]
        e = g("k") @ anchor - g("v")
        delta = None if x["huber_delta"] is None else g("huber_delta")
        if delta is not None:
          inside.append(np.linalg.norm(e) <= delta)
        grad = np.outer(g("k"), _error64(rule, e, delta))
        s = g("eta") * s - g("theta") * grad
        w = (1 - g("alpha")) * w + s
        acc = (1 - g("alpha")) * acc + s
        if (ti + 1) % chunk_size == 0:
          w = _map64(rule, acc)
          anchor = w.copy()
        out[bi, ti, hi] = g("q") @ w
  return out, inside


@pytest.mark.parametrize("rule,chunk_size", [("titans", 3), ("moneta", 1), ("moneta", 3),
                                             ("yaad", 1), ("memora", 1), ("memora", 3)])
def test_linear_memory_matches_float64_loop(key, rule, chunk_size):
  inputs = _inputs(key, 1, 9, 2, 4, 3, 1, rule)
  y = _call(inputs, rule=rule, chunk_size=chunk_size, implementation="xla")
  want, inside = _linear_loop_float64(inputs, rule, chunk_size)
  assert_close(y, want, RTOL[jnp.float32], "outputs")
  if rule == "yaad":  # Both branches of the Huber rule were taken.
    assert any(inside) and not all(inside)


def test_mlp_memory_chunk_size_one_is_online_gradient_descent(key):
  """Online GD on the residual MLP memory, each step's gradient by jax.grad of the loss."""
  inputs = _inputs(key, 1, 7, 1, 4, 4, 2, "titans")
  y = _call(inputs, chunk_size=1, implementation="xla")
  w1, w2 = (w[0, 0] for w in inputs["initial_state"].weights)

  def memory(params, x):
    hidden = jax.nn.gelu(x @ params[0]) @ params[1]
    centred = hidden - hidden.mean()
    return x + centred / jnp.sqrt(jnp.mean(centred ** 2) + 1e-5)

  loss = lambda params, k, v: jnp.sum((memory(params, k) - v) ** 2)

  @jax.jit
  def online_step(params, momentum, x):
    grads = jax.grad(loss)(params, x["k"], x["v"])
    momentum = [x["eta"] * s - x["theta"] * d for s, d in zip(momentum, grads)]
    params = [(1 - x["alpha"]) * w + s for w, s in zip(params, momentum)]
    return params, momentum, memory(params, x["q"])

  params, momentum = [w1, w2], [jnp.zeros_like(w1), jnp.zeros_like(w2)]
  for t in range(7):
    token = {n: inputs[n][0, t, 0] for n in ("q", "k", "v", "theta", "eta", "alpha")}
    params, momentum, want = online_step(params, momentum, token)
    # The layer norm divides by the hidden's spread, which amplifies float32 rounding over
    # the sequential updates: 2e-5 was seen, hence the gradient tolerance.
    assert_close(y[0, t, 0], want, GRAD_RTOL[jnp.float32], f"token {t}")


def test_linear_l2_without_momentum_or_forgetting_is_the_delta_rule(key):
  """W_t = W_{t-1} - theta_t 2 k_t (W_{t-1}^T k_t - v_t)^T: the delta rule with beta = 2 theta."""
  inputs = dict(_inputs(key, 2, 10, 2, 4, 6, 1, "titans"), eta=None, alpha=None)
  y = _call(inputs, chunk_size=1, implementation="xla")
  delta_rule = jax.jit(functools.partial(ops.delta_rule, scale=1.0, implementation="reference"))
  want = delta_rule(inputs["q"], inputs["k"], inputs["v"], 2 * inputs["theta"],
                    initial_state=inputs["initial_state"].weights[0])
  assert_close(y, want, RTOL[jnp.float32])


def test_gradients_agree(key):
  """The memory is meta-learned: gradients reach q, k, v, the gates and the initial weights
  (MLP memory, lp loss and lq retention: the longest chain of the op)."""
  rule = "moneta"
  inputs = _inputs(key, 1, 10, 2, 4, 4, 2, rule)
  names = ["q", "k", "v", "theta", "eta", "alpha"]
  acc = "accumulator" if miras.resolve(rule).has_accumulator else "weights"
  initial = getattr(inputs["initial_state"], acc)
  primals = [inputs[n] for n in names] + [tuple(w[0] for w in initial)]

  def run(impl, *args):
    named = dict(inputs, **dict(zip(names, args)))
    named["initial_state"] = titans.init_state(args[-1], 1, rule=rule)
    y, s = _call(named, rule=rule, return_final_state=True, implementation=impl, chunk_size=4)
    return y, s.weights

  y, w = run("reference", *primals)
  cot = (jax.random.normal(jax.random.fold_in(key, 1), y.shape),
         tuple(jax.random.normal(jax.random.fold_in(key, 2), x.shape) for x in w))
  pullback = lambda impl: jax.jit(lambda *p: jax.vjp(functools.partial(run, impl), *p)[1](cot))
  grads = {impl: pullback(impl)(*primals) for impl in ("reference", "xla")}
  for name, got, want in zip(names + ["initial weights"], grads["xla"], grads["reference"]):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(g, r, GRAD_RTOL[jnp.float32], f"d{name}")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gate_gradients_at_exactly_zero(key, implementation):
  """A momentum or decay gate of exactly 0 cuts its range's products; their gradients at 0
  are the products of the other gates, not 0 (the reference differentiates them exactly)."""
  inputs = _inputs(key, 1, 32, 2, 64, 64, 1, "titans")
  inputs["eta"] = inputs["eta"].at[0, 5, 0].set(0.0).at[0, 20, 1].set(0.0)
  # alpha = 1 is a decay 1 - alpha of 0.
  inputs["alpha"] = inputs["alpha"].at[0, 9, 1].set(1.0)
  names = ("eta", "alpha")

  def run(impl, eta, alpha):
    return _call(dict(inputs, eta=eta, alpha=alpha), implementation=impl, chunk_size=16)

  cot = jax.random.normal(jax.random.fold_in(key, 1), inputs["v"].shape)
  grads = {impl: jax.jit(lambda *p, impl=impl: jax.vjp(functools.partial(run, impl), *p)[1](
      cot))(*(inputs[n] for n in names)) for impl in ("reference", implementation)}
  for name, got, want in zip(names, grads[implementation], grads["reference"]):
    assert float(jnp.abs(want[0, 5, 0] if name == "eta" else want[0, 9, 1])) > 1e-3
    assert_close(got, want, GRAD_RTOL[jnp.float32], f"d{name}")


def test_range_products_match_cumulative_products(key):
  """The log-space range products and their hand-written vjp equal plain cumulative
  products differentiated by JAX, with gates of exactly 0 and 1 among them."""
  c = 16
  ks = jax.random.split(key, 4)
  gate = jax.random.uniform(ks[0], (2, 3, c))
  picks = jax.random.permutation(ks[1], gate.size)
  gate = gate.ravel().at[picks[:6]].set(0.0).at[picks[6:10]].set(1.0).reshape(gate.shape)

  def cumulative(g):
    causal = jnp.tril(jnp.ones((c, c), bool))
    factors = jnp.where(jnp.tril(causal, -1), g[..., :, None], 1.0)
    return (jnp.where(causal, jnp.cumprod(factors, axis=-2), 0.0),
            jnp.cumprod(g, axis=-1))

  cot = (jax.random.normal(ks[2], (2, 3, c, c)), jax.random.normal(ks[3], (2, 3, c)))
  (p, e), pullback = jax.vjp(titans_chunked._range_products, gate)
  (p_ref, e_ref), pullback_ref = jax.vjp(cumulative, gate)
  assert_close(p, p_ref, RTOL[jnp.float32], "P")
  assert_close(e, e_ref, RTOL[jnp.float32], "E")
  got, want = pullback(cot)[0], pullback_ref(cot)[0]
  zero = gate == 0
  assert float(jnp.linalg.norm(want[zero])) > 1e-2  # products of the other gates, not 0
  assert_close(got[zero], want[zero], RTOL[jnp.float32], "dgate at gates of 0")
  assert_close(got, want, RTOL[jnp.float32], "dgate")


def test_split_state_anywhere(key):
  """Three calls cut inside chunks (3 and 8 are not multiples of 5) equal one call."""
  inputs = _inputs(key, rule="memora", **SEQUENCE)
  common = dict(rule="memora", return_final_state=True, implementation="xla", chunk_size=CHUNK)
  whole, whole_s = _call(inputs, **common)
  state, outs = inputs["initial_state"], []
  for start, stop in ((0, 3), (3, 8), (8, 13)):
    y, state = _call(_slice(inputs, start, stop, state), **common)
    outs.append(y)
  assert_close(jnp.concatenate(outs, 1), whole, OUTPUT_RTOL, "outputs")
  _assert_states_close(state, whole_s, STATE_RTOL)


def test_decode_steps_match_xla(key):
  inputs = _inputs(key, rule="yaad", **SEQUENCE)
  step = jax.jit(functools.partial(ops.neural_memory_step, chunk_size=CHUNK, rule="yaad"))
  state, outs = inputs["initial_state"], []
  for t in range(SEQUENCE["t"]):
    g = lambda n: inputs[n][:, t]
    y_t, state = step(g("q"), g("k"), g("v"), g("theta"), g("eta"), g("alpha"),
                      g("huber_delta"), state=state)
    outs.append(y_t)
  y, s = _call(inputs, rule="yaad", return_final_state=True, implementation="xla",
               chunk_size=CHUNK)
  assert_close(jnp.stack(outs, 1), y, OUTPUT_RTOL, "outputs")
  _assert_states_close(state, s, STATE_RTOL)


def test_bad_inputs():
  good = _inputs(jax.random.key(0), 2, 6, 3, 4, 4, 2, "titans")
  mlp_state = good["initial_state"]
  linear = titans.init_state((jnp.zeros((3, 4, 4)),), 2)
  cases = [
      (dict(k=good["k"][:, :5]), r"k must have shape \[B, T, H, K\] like q = \(2, 6, 3, 4\), got \(2, 5, 3, 4\)"),
      (dict(theta=good["theta"][..., None]), r"theta must have shape \[B, T, H\] = \(2, 6, 3\)"),
      (dict(alpha=good["alpha"][:, :2]), r"alpha must have shape \[B, T, H\]"),
      (dict(v=good["v"][..., :3]), r"MLP memory .* needs K == V|must output V = 3"),
      (dict(initial_state=linear._replace(weights=(jnp.zeros((2, 3, 5, 4)),))),
       r"initial_state.weights\[0\] must have shape \[B, H, d_in, d_out\] = \(2, 3, 4, d_out\), got \(2, 3, 5, 4\)"),
      (dict(initial_state=linear._replace(momentum=(jnp.zeros((2, 3, 4, 2)),))),
       r"initial_state.momentum\[0\] must have shape like weights = \(2, 3, 4, 4\)"),
      (dict(initial_state=linear._replace(anchor=(jnp.zeros((2, 3, 4, 4), jnp.bfloat16),))),
       r"initial_state.anchor\[0\] must be float32"),
      (dict(initial_state=mlp_state._replace(momentum=mlp_state.momentum[:1])),
       r"initial_state.momentum must hold 2 layers, got 1"),
      (dict(huber_delta=good["theta"]), r"huber_delta .* only by it"),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      _call(dict(good, **change))
  with pytest.raises(ValueError, match=r"huber_delta \[B, T, H\] is needed by loss='huber'"):
    _call(good, rule="yaad")
  with pytest.raises(ValueError, match=r"retention='kl' needs initial_state.accumulator"):
    _call(good, rule="memora")
  with pytest.raises(ValueError, match="rule must be a MirasRule or one of the presets"):
    _call(good, rule="atlas")
  with pytest.raises(ValueError, match="loss must be one of"):
    miras.MirasRule(loss="l1")
  with pytest.raises(ValueError, match="activation must be one of"):
    _call(good, activation="tanh")
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    _call(good, chunk_size=0)
  # The kernels take head dims 64 and 128 (tests/kernels/test_titans.py has the rest).
  with pytest.raises(ValueError, match=r"implementation='pallas' needs K == V in \(64, 128\)"):
    _call(good, implementation="pallas")
  with pytest.raises(ValueError, match="implementation must be one of"):
    _call(good, implementation="triton")
  with pytest.raises(ValueError, match=r"initial_weights\[0\] must have 3 dims"):
    titans.init_state((jnp.zeros((4, 4)),), 2)
  with pytest.raises(ValueError, match=r"theta must have shape \[B, T, H\]"):
    ops.neural_memory_step(good["q"][:, 0], good["k"][:, 0], good["v"][:, 0],
                           good["theta"][:, :1], state=mlp_state)
