"""The per-chunk math of the delta-rule / linear-attention backward, shared by both chips.

Per chunk (notation of `common`: A_qk = Q K^T * decay (inclusive), Kd = diag(e^(gamma_C -
gamma)) K, S0 / S1 the states at the chunk's start / end, Vn = U - W S0 for the delta rule
and V for linear attention), given the output cotangent dO and the cotangent dS1:

    dVn = scale A_qk^T dO + Kd dS1
    dS0 = e^gamma_C dS1 + scale (diag(e^gamma) Q)^T dO - W^T dVn

Three passes, from the chunk-start states S0 and the Vn that the forward saved:

1. `state_grad_chunk` (parallel over batch, heads and value blocks; sequential over the
   chunks in reverse): dS1 and dVn of every chunk and the cotangent of the initial state.
2. `qk_grads_chunk` (parallel over key blocks, batch, heads and chunks): everything that
   sums over V, one value block at a time: dq (final), the part of dk from the outputs
   and the state, dW = -dVn S0^T, and those parts' d gamma. Every term of d gamma has the
   form `rowsum(q * dq) - rowsum(k * dk)`, so it splits over key blocks like the rest.
3. `wy_grads_chunk` (parallel over batch, heads and chunks; delta rule only): back through
   the UT transform with the chunk's explicit inverse `A = (I + L)^-1` (W = A R_w,
   U = A R_u): `dR = A^T dX`, `dA = dW R_w^T + dU R_u^T` and `dL = -A^T dA A^T`.

Splitting 2 from 3 keeps each program's float32 accumulators to [C, key block] tiles and
one [C, C], which the registers hold; one fused pass held three [C, K] and two [C, C]
and spilled. d gamma turns into dg by a reverse cumulative sum inside each chunk (outside
the kernels).
"""

from jax.experimental import pallas as pl
import jax.numpy as jnp

from memjax.kernels.delta_rule.common import decay_matrix, last_token, mm, mm_nt, mm_tn


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


def qk_grads_chunk(load, gamma, gamma_last, store, *, value_dim, value_block, scale,
                   precise, delta):
  """Pass 2 for one chunk and one key block.

  Args:
    load: `load(name, cols)` -> values of one chunk: q, k, w [C, Kb] (this key block) when
      `cols` is None; the column block `cols` (a `pl.ds`) of do, vn, dvn [C, Vb] and of
      state0, dstate1 [Kb, Vb] (the saved chunk-start state and the end-state cotangent).
      vn is Vn (V for linear attention); w only when `delta`.
    gamma: [C] float32; gamma_last: gamma[C - 1], a scalar.
    store: `store(name, value)` for dq, dk, dw [C, Kb] and dgamma [C], float32 (dw only
      when `delta`); dk and dgamma are this pass's parts.
    value_dim: V; value_block: Vb, dividing V.
    scale: output scale.
    precise: float32 matmuls (float32 inputs); otherwise bfloat16 operands, float32 sums.
    delta: delta rule (else linear attention).
  """
  q, k = load("q", None), load("k", None)
  chunk, key_block = q.shape
  zeros = jnp.zeros((chunk, key_block), jnp.float32)
  dq_state, dk_state, dw = zeros, zeros, zeros
  dscores = jnp.zeros((chunk, chunk), jnp.float32)
  through_last = jnp.zeros((), jnp.float32)
  for j in range(value_dim // value_block):
    cols = pl.ds(j * value_block, value_block)
    state0, dstate1 = load("state0", cols), load("dstate1", cols)
    do, v_new = load("do", cols), load("vn", cols)
    dq_state = dq_state + mm_nt(do, state0, precise)
    dscores = dscores + mm_nt(do, v_new, precise)
    dk_state = dk_state + mm_nt(v_new, dstate1, precise)
    through_last = through_last + jnp.sum(dstate1 * state0)
    if delta:
      dw = dw - mm_nt(load("dvn", cols), state0, precise)  # Vn = U - W S0.

  # O = scale (diag(e^gamma) Q S0 + A_qk Vn) and S1 = e^gamma_C S0 + Kd^T Vn.
  dscores = scale * dscores * decay_matrix(gamma, gamma, "inclusive")
  dq = (scale * jnp.exp(gamma))[:, None] * dq_state + mm(dscores, k, precise)
  dk_decayed = jnp.exp(gamma_last - gamma)[:, None] * dk_state
  dk = mm_tn(dscores, q, precise) + dk_decayed
  qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
  to_last = jnp.exp(gamma_last) * through_last + jnp.sum(dk_decayed * kf)
  dgamma = jnp.sum(qf * dq - kf * dk, axis=1) + last_token(chunk, to_last)
  store("dq", dq)
  store("dk", dk)
  store("dgamma", dgamma)
  if delta:
    store("dw", dw)


def wy_grads_chunk(load, beta, gamma, store, *, key_dim, value_dim, block, precise):
  """Pass 3 for one chunk: back through `Vn = U - W S0`'s U and W and the UT transform.

  Args:
    load: `load(name, cols)` -> values of one chunk for the column block `cols` (a
      `pl.ds`): k, dw, dk_part [C, Kb] (pass 2's part of dk), v, dvn [C, Vb]; and a [C, C] (the
      float32 inverse `(I + L)^-1`) when `cols` is None.
    beta, gamma: [C] float32.
    store: `store(name, value, cols)` for dk [C, Kb], dv [C, Vb] (column blocks) and dbeta,
      dgamma [C] (`cols` None), float32; dgamma is this pass's part.
    key_dim, value_dim: K and V; block: columns per step of the loops over K and V.
    precise: float32 matmuls (float32 inputs).
  """
  a = load("a", None)
  chunk = a.shape[0]
  key_blocks = [pl.ds(j * block, block) for j in range(key_dim // block)]
  value_blocks = [pl.ds(j * block, block) for j in range(value_dim // block)]
  beta_decay = beta * jnp.exp(gamma)
  # dA = dW R_w^T + dU R_u^T with R_w = diag(beta e^gamma) K, R_u = diag(beta) V, dU = dVn.
  da = jnp.zeros((chunk, chunk), jnp.float32)
  kk = jnp.zeros((chunk, chunk), jnp.float32)
  for cols in key_blocks:
    k = load("k", cols)
    da = da + mm_nt(load("dw", cols), beta_decay[:, None] * k.astype(jnp.float32), precise)
    kk = kk + mm_nt(k, k, precise)
  dbeta = jnp.zeros((chunk,), jnp.float32)
  for cols in value_blocks:
    dv_new, v = load("dvn", cols), load("v", cols).astype(jnp.float32)
    da = da + mm_nt(dv_new, beta[:, None] * v, precise)
    dr_u = mm_tn(a, dv_new, precise)
    store("dv", beta[:, None] * dr_u, cols)
    dbeta = dbeta + jnp.sum(dr_u * v, axis=1)
  # A = (I + L)^-1 with L = strict(diag(beta) (K K^T * decay)). Only dL's strictly lower
  # part matters: every use below is masked by `decay`.
  decay = decay_matrix(gamma, gamma, "strict")
  dl = -mm_nt(mm_tn(a, da, precise), a, precise)
  keys = kk * decay
  dbeta = dbeta + jnp.sum(dl * keys, axis=1)
  dkk = beta[:, None] * dl * decay
  through = dkk * kk
  dgamma = jnp.sum(through, axis=1) - jnp.sum(through, axis=0)
  for cols in key_blocks:
    k = load("k", cols)
    kf = k.astype(jnp.float32)
    dr_w = mm_tn(a, load("dw", cols), precise)
    through = jnp.sum(dr_w * kf, axis=1)
    dgamma = dgamma + beta_decay * through
    dbeta = dbeta + jnp.exp(gamma) * through
    dk = (load("dk_part", cols) + beta_decay[:, None] * dr_w + mm(dkk, k, precise)
          + mm_tn(dkk, k, precise))
    store("dk", dk, cols)
  store("dbeta", dbeta, None)
  store("dgamma", dgamma, None)
