"""mixture_of_memories: the gated fast form equals the token-by-token reference, each memory
equals a delta rule over its routed tokens only, k = M is a dense mixture, the router, and
argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import ops
from tests.conftest import assert_close

B, T, E, H, K, V = 2, 13, 3, 2, 8, 4

mom = jax.jit(ops.mixture_of_memories,
              static_argnames=("return_final_state", "chunk_size", "implementation"))
routing = jax.jit(ops.top_k_routing, static_argnames="top_k")


def _numpy(inputs):
  return {n: None if a is None else np.asarray(a, np.float64) for n, a in inputs.items()}


def _delta_rule_numpy(q, k, v, beta, g, state):
  """One memory's gated delta rule (DESIGN.md §2) in float64, token by token.

  Args: q, k [T, H, K]; v [T, H, V]; beta, g [T, H] (g may be None); state [H, K, V].
  Returns: outputs [T, H, V] and the final state.
  """
  f64 = lambda a: None if a is None else np.asarray(a, np.float64)
  q, k, v, beta, g, s = map(f64, (q, k, v, beta, g, state))
  out = np.zeros(v.shape)
  for t in range(q.shape[0]):
    if g is not None:
      s = np.exp(g[t])[:, None, None] * s
    delta = beta[t][:, None] * (v[t] - np.einsum("hk,hkv->hv", k[t], s))
    s = s + np.einsum("hk,hv->hkv", k[t], delta)
    out[t] = q.shape[-1] ** -0.5 * np.einsum("hk,hkv->hv", q[t], s)
  return out, s


def _inputs(key, top_k, gated=True, t=T):
  """Random inputs from a numpy generator seeded by `key`.

  numpy, not jax.random: on a CPU each jax.random sampler shape compiles for seconds.
  """
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  k = normal(B, t, E, H, K)
  softplus = lambda z: np.logaddexp(0.0, z)
  return dict(
      q=normal(B, t, H, K), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
      v=normal(B, t, E, H, V), beta=1.0 / (1.0 + np.exp(-normal(B, t, E, H))),
      g=-softplus(normal(B, t, E, H) - 1.0) if gated else None,
      weights=np.asarray(routing(2.0 * normal(B, t, E), top_k=top_k)),
      initial_state=0.5 * normal(B, E, H, K, V))


def test_gated_form_matches_reference_with_gradients(key):
  x = _inputs(key, top_k=2)
  assert np.sum(np.asarray(x["weights"]) == 0) == B * T  # One memory per token is left out.
  names = ("q", "k", "v", "beta", "weights", "initial_state")

  def loss(impl):
    def f(*args):
      o, s = mom(**dict(x, **dict(zip(names, args))), return_final_state=True, chunk_size=4,
                 implementation=impl)
      return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2), (o, s)
    return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(names))), has_aux=True))

  args = [x[n] for n in names]
  (_, (ref_o, ref_s)), ref_grads = loss("reference")(*args)
  (_, (o, s)), grads = loss("xla")(*args)
  assert o.shape == (B, T, H, V) and s.shape == (B, E, H, K, V) and s.dtype == jnp.float32
  assert_close(o, ref_o, 1e-5, "outputs")
  assert_close(s, ref_s, 1e-5, "final state")
  for name, g, r in zip(names, grads, ref_grads):
    assert_close(g, r, 1e-4, f"gradient of {name}")


@pytest.mark.parametrize("gated", [True, False])
def test_each_memory_is_a_delta_rule_over_its_routed_tokens_only(key, gated):
  # Top-1 routing: each token reads exactly the one memory it writes, with weight 1.
  x = _inputs(key, top_k=1, gated=gated)
  o, final = map(np.asarray, mom(**x, return_final_state=True, chunk_size=4,
                                 implementation="xla"))
  x = _numpy(x)  # Indexing numpy arrays below compiles nothing.
  w = x["weights"]
  for b in range(B):
    for e in range(E):
      routed = np.flatnonzero(w[b, :, e])
      if routed.size == 0:  # Never written: the state is the initial one.
        assert_close(final[b, e], x["initial_state"][b, e], 0.0, "untouched memory")
        continue
      pick = lambda a: None if a is None else a[b, routed, e]
      sub_o, sub_s = _delta_rule_numpy(x["q"][b, routed], pick(x["k"]), pick(x["v"]),
                                       pick(x["beta"]), pick(x["g"]), x["initial_state"][b, e])
      assert_close(final[b, e], sub_s, 1e-5, f"memory {e} of batch {b}")
      assert_close(o[b, routed], sub_o, 1e-5, f"reads of memory {e} of batch {b}")


def test_all_memories_routed_is_a_dense_mixture(key):
  x = _inputs(key, top_k=E)
  o = np.asarray(mom(**x, chunk_size=4, implementation="xla"))
  x = _numpy(x)
  assert np.all(x["weights"] > 0)
  w = x["weights"]
  dense = np.zeros((B, T, H, V))
  for b in range(B):
    for e in range(E):
      o_e, _ = _delta_rule_numpy(x["q"][b], x["k"][b, :, e], x["v"][b, :, e],
                                 x["beta"][b, :, e], x["g"][b, :, e], x["initial_state"][b, e])
      dense[b] += w[b, :, e, None, None] * o_e
  assert_close(o, dense, 1e-5, "dense mixture")


def test_top_k_routing():
  logits = np.random.default_rng(3).standard_normal((4, 6, 5)).astype(np.float32)
  probs = jax.nn.softmax(logits, -1)
  assert_close(ops.top_k_routing(logits, 5), probs, 1e-6, "top_k = M is the softmax")
  w = np.asarray(ops.top_k_routing(logits, 2))
  assert np.all((w > 0).sum(-1) == 2)
  assert_close(w.sum(-1), np.ones((4, 6)), 1e-6, "weights sum to 1")
  top2 = np.argsort(-np.asarray(logits), -1)[..., :2]
  np.testing.assert_array_equal(np.sort(np.argsort(-w, -1)[..., :2], -1), np.sort(top2, -1))
  p = np.take_along_axis(np.asarray(probs), top2, -1)
  assert_close(np.take_along_axis(w, top2, -1), p / p.sum(-1, keepdims=True), 1e-6, "renorm")


def test_step_writes_routed_memories_and_reads_their_mixture(key):
  x = {n: a[:, 0] for n, a in _inputs(key, top_k=2, t=1).items() if n != "initial_state"}
  state = _inputs(key, top_k=2)["initial_state"]
  o, new = map(np.asarray, jax.jit(ops.mixture_of_memories_step)(**x, state=state))
  x, state = _numpy(x), np.asarray(state, np.float64)
  w = x["weights"]
  for b in range(B):
    want_o = np.zeros((H, V))
    for e in range(E):
      o_e, s_e = _delta_rule_numpy(
          x["q"][b:b + 1], x["k"][b:b + 1, e], x["v"][b:b + 1, e], x["beta"][b:b + 1, e],
          x["g"][b:b + 1, e], state[b, e])
      assert_close(new[b, e], s_e if w[b, e] else state[b, e], 1e-6, f"memory {e}")
      want_o += w[b, e] * o_e[0]
    assert_close(o[b], want_o, 1e-5, "output")


@pytest.mark.parametrize("name,shape,match", [
    ("k", (B, T, E, H, K + 1),
     r"k must have shape \[B, T, E, H, K\] with H, K of q = \(2, 13, 3, 2, 8\), got "
     r"\(2, 13, 3, 2, 9\)"),
    ("k", (B, T, H, K), r"k must have shape \[B, T, E, H, K\], got \(2, 13, 2, 8\)"),
    ("v", (B, T, E + 1, H, V), r"v must have shape \[B, T, E, H, V\].*got \(2, 13, 4, 2, 4\)"),
    ("beta", (B, T, H), r"beta must have shape \[B, T, E, H\] = \(2, 13, 3, 2\), got"),
    ("weights", (B, T, E + 1), r"weights must have shape \[B, T, E\] = \(2, 13, 3\), got "
                               r"\(2, 13, 4\)"),
    ("initial_state", (B, H, K, V),
     r"initial_state must have shape \[B, E, H, K, V\] = \(2, 3, 2, 8, 4\), got"),
])
def test_errors_name_argument_and_shapes(key, name, shape, match):
  x = _inputs(key, top_k=2)
  x[name] = jnp.zeros(shape)
  with pytest.raises(ValueError, match=match):
    ops.mixture_of_memories(**x)


def test_step_errors_use_the_step_layout(key):
  x = {n: a[:, 0] for n, a in _inputs(key, top_k=2, t=1).items() if n != "initial_state"}
  x["weights"] = jnp.zeros((B, E + 1))
  with pytest.raises(ValueError, match=r"weights must have shape \[B, E\] = \(2, 3\), got"):
    ops.mixture_of_memories_step(**x, state=jnp.zeros((B, E, H, K, V)))


@pytest.mark.parametrize("top_k", [0, 6, 2.0])
def test_top_k_out_of_range(top_k):
  with pytest.raises(ValueError, match=r"top_k must be an int in \[1, M=5\].*\(4, 5\)"):
    ops.top_k_routing(jnp.zeros((4, 5)), top_k)


def test_check_finite_names_the_array(key):
  x = _inputs(key, top_k=2)
  x["weights"] = x["weights"].copy()
  x["weights"][0, 3, 1] = np.inf
  with pytest.raises(ValueError, match=r"weights holds non-finite values \(shape \(2, 13, 3\)\)"):
    ops.mixture_of_memories(**x, check_finite=True)


def test_pallas_gated_form_matches_reference(key):
  # The delta-rule kernel takes head dims 64, 128 or 256; on a CPU it runs interpreted.
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  b, t, e, h, dk = 1, 16, 2, 1, 64
  k = normal(b, t, e, h, dk)
  x = dict(q=normal(b, t, h, dk), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
           v=normal(b, t, e, h, dk), beta=1.0 / (1.0 + np.exp(-normal(b, t, e, h))),
           g=-np.logaddexp(0.0, normal(b, t, e, h) - 1.0),
           weights=np.asarray(routing(normal(b, t, e), top_k=1)),
           initial_state=normal(b, e, h, dk, dk))
  ref_o, ref_s = mom(**x, return_final_state=True, implementation="reference")
  o, s = mom(**x, return_final_state=True, chunk_size=16, implementation="pallas")
  assert_close(o, ref_o, 1e-5, "outputs")
  assert_close(s, ref_s, 1e-5, "final state")
