"""The per-chunk math of the delta-rule / linear-attention backward, shared by both chips.

Per chunk (notation of `common`: A_qk = Q K^T * decay (inclusive), Kd = diag(e^(gamma_C -
gamma)) K, S0 / S1 the states at the chunk's start / end, Vn = U - W S0 for the delta rule
and V for linear attention), given the output cotangent dO and the cotangent dS1:

    dVn = scale A_qk^T dO + Kd dS1
    dS0 = e^gamma_C dS1 + scale (diag(e^gamma) Q)^T dO - W^T dVn

Two passes, both from the chunk-start states S0 that the forward saved:

1. `state_grad_chunk` (parallel over batch, heads and value blocks; sequential over the
   chunks in reverse): dS1 and dVn of every chunk and the cotangent of the initial state.
2. `chunk_grads` (parallel over batch, heads and chunks): dq, dk, dv, dbeta and d gamma of
   one chunk. The UT transform is differentiated through the chunk's explicit inverse
   `A = (I + L)^-1` (W = A R_w, U = A R_u, from the `wy` pass): `dR = A^T dX` and
   `dL = -strict(A^T dA A^T)`, so every product is a whole-chunk matmul. The value
   dimension is walked in blocks, accumulating the [C, K] and [C, C] cotangents, so the
   state tiles held at once are [K, value block].

d gamma turns into dg by a reverse cumulative sum inside each chunk (outside the kernels).
"""

from jax.experimental import pallas as pl
import jax.numpy as jnp
from jax import lax

from memjax.kernels.delta_rule.common import decay_matrix, mm, mm_nt, mm_tn


def state_grad_chunk(q, k, w, do, gamma, gamma_last, dstate, scale, precise):
  """The cotangents of a chunk's start state and of its Vn, from the one of its end state.

  Args:
    q, k: [C, K]; w: W [C, K] or None (linear attention); do: output cotangent [C, Vb];
    gamma: [C] float32; gamma_last: gamma[C - 1], a scalar;
    dstate: dS1, the cotangent of the state at the chunk's end, [K, Vb] float32.
    scale: output scale.
    precise: float32 matmuls (float32 inputs).

  Returns:
    `(dS0 [K, Vb], dVn [C, Vb])`, float32 (dVn is dV for linear attention).
  """
  q_decayed = q.astype(jnp.float32) * jnp.exp(gamma)[:, None]
  scores = mm_nt(q, k, precise) * decay_matrix(gamma, gamma, "inclusive")
  k_decayed = k.astype(jnp.float32) * jnp.exp(gamma_last - gamma)[:, None]
  dv_new = scale * mm_tn(scores, do, precise) + mm(k_decayed, dstate, precise)
  dprev = jnp.exp(gamma_last) * dstate + scale * mm_tn(q_decayed, do, precise)
  if w is not None:
    dprev = dprev - mm_tn(w, dv_new, precise)
  return dprev, dv_new


def _through_pairs(x):
  """d gamma of `x = dM * M` for M[i, j] carrying exp(gamma_i - gamma_j): [C, C] -> [C]."""
  return jnp.sum(x, axis=1) - jnp.sum(x, axis=0)


def chunk_grads(load, gate, store, *, gamma_last, value_dim, value_block, scale, precise,
                delta):
  """Cotangents of one chunk's inputs.

  Args:
    load: `load(name, cols)` -> float32 or input-dtype values of one chunk: q, k, w [C, K];
      a [C, C] (the float32 inverse `(I + L)^-1`); and the column block `cols` (a `pl.ds`)
      of v, u, do, dvn [C, Vb] and state0, dstate1 [K, Vb] (the saved chunk-start state
      and the end-state cotangent). `cols` is None for the [C, K] / [C, C] ones.
    gate: `gate(name)` -> beta or gamma of the chunk [C] (beta only when `delta`).
    store: `store(name, value, cols)` for dq, dk [C, K], dv [C, Vb] (when `delta`; for
      linear attention dv is dVn itself) and dbeta (when `delta`), dgamma [C], all float32.
    gamma_last: gamma[C - 1], a scalar.
    value_dim: V; value_block: Vb, dividing V.
    scale: output scale.
    precise: float32 matmuls (float32 inputs); otherwise bfloat16 operands, float32 sums.
    delta: delta rule (else linear attention: Vn = V).
  """
  q, k = load("q", None), load("k", None)
  gamma = gate("gamma")
  chunk, dk = q.shape
  zeros = lambda rows, cols: jnp.zeros((rows, cols), jnp.float32)
  dq_state, dk_state, dscores = zeros(chunk, dk), zeros(chunk, dk), zeros(chunk, chunk)
  through_last = jnp.zeros((), jnp.float32)
  if delta:
    w, a, beta = load("w", None), load("a", None), gate("beta")
    dw, da, dbeta = zeros(chunk, dk), zeros(chunk, chunk), jnp.zeros((chunk,), jnp.float32)

  # Everything that sums over V, one value block at a time.
  for j in range(value_dim // value_block):
    cols = pl.ds(j * value_block, value_block)
    state0, dstate1 = load("state0", cols), load("dstate1", cols)
    do, dv_new = load("do", cols), load("dvn", cols)
    if delta:
      v_new = load("u", cols).astype(jnp.float32) - mm(w, state0, precise)
    else:
      v_new = load("v", cols).astype(jnp.float32)
    dq_state = dq_state + mm_nt(do, state0, precise)
    dscores = dscores + mm_nt(do, v_new, precise)
    dk_state = dk_state + mm_nt(v_new, dstate1, precise)
    through_last = through_last + jnp.sum(dstate1 * state0)
    if delta:
      # Vn = U - W S0 and U = A diag(beta) V.
      dw = dw - mm_nt(dv_new, state0, precise)
      v = load("v", cols).astype(jnp.float32)
      dr_u = mm_tn(a, dv_new, precise)
      store("dv", beta[:, None] * dr_u, cols)
      dbeta = dbeta + jnp.sum(dr_u * v, axis=1)
      da = da + mm_nt(dv_new, beta[:, None] * v, precise)

  qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
  # O = scale (diag(e^gamma) Q S0 + A_qk Vn).
  dq_inter = (scale * jnp.exp(gamma))[:, None] * dq_state
  dgamma = jnp.sum(dq_inter * qf, axis=1)
  qk = mm_nt(q, k, precise)
  dscores = scale * dscores * decay_matrix(gamma, gamma, "inclusive")
  dgamma = dgamma + _through_pairs(dscores * qk)
  dq = dq_inter + mm(dscores, k, precise)
  dkey = mm_tn(dscores, q, precise)
  # S1 = e^gamma_C S0 + Kd^T Vn.
  to_end = jnp.exp(gamma_last - gamma)[:, None]
  dk_decayed = to_end * dk_state
  through = jnp.sum(dk_decayed * kf, axis=1)
  dkey = dkey + dk_decayed
  dgamma = dgamma - through
  dgamma_last = jnp.exp(gamma_last) * through_last + jnp.sum(through)

  if delta:
    # W = A diag(beta e^gamma) K.
    beta_decay = beta * jnp.exp(gamma)
    da = da + mm_nt(dw, beta_decay[:, None] * kf, precise)
    dr_w = mm_tn(a, dw, precise)
    dkey = dkey + beta_decay[:, None] * dr_w
    through = jnp.sum(dr_w * kf, axis=1)
    dgamma = dgamma + beta_decay * through
    dbeta = dbeta + jnp.exp(gamma) * through
    # A = (I + L)^-1 with L = strict(diag(beta) (K K^T * decay)).
    decay = decay_matrix(gamma, gamma, "strict")
    # Only dL's strictly lower part is used: every use below is masked by `decay`.
    dl = -mm_nt(mm_tn(a, da, precise), a, precise)
    keys = mm_nt(k, k, precise) * decay
    dbeta = dbeta + jnp.sum(dl * keys, axis=1)
    dkeys = beta[:, None] * dl
    dgamma = dgamma + _through_pairs(dkeys * keys)
    dkk = dkeys * decay
    dkey = dkey + mm(dkk, k, precise) + mm_tn(dkk, k, precise)
    store("dbeta", dbeta, None)

  rows = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
  store("dgamma", dgamma + jnp.where(rows == chunk - 1, dgamma_last, 0.0), None)
  store("dq", dq, None)
  store("dk", dkey, None)
