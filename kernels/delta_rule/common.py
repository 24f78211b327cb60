"""Shapes, block sizes and the per-chunk math shared by the GPU and TPU delta-rule kernels.

The kernels compute the chunkwise form of `memjax.ops.delta_rule` (see its docstring) in two
passes over [B, T, H, ...] arrays, T padded to a multiple of the chunk C:

1. `wy` pass (parallel over batch, heads and chunks): the UT transform of each chunk,
   `W = (I + L)^-1 diag(beta e^gamma) K` and `U = (I + L)^-1 diag(beta) V`, with the
   triangular solve done by blocked forward substitution over `SUB`-row tiles.
2. `state` pass (parallel over batch, heads and value blocks; sequential over chunks): the
   state `S` [K, V_block] stays on chip while each chunk computes `V_new = U - W S`, its
   outputs `scale (e^gamma Q S + (Q K^T * decay) V_new)` and the next state
   `e^gamma_C S + (e^(gamma_C - gamma) K)^T V_new`.

Linear attention is the state pass alone with `V_new = V`.

Everything here works on values already loaded from refs, so a chip's kernel file only says
where the tiles come from.
"""

import dataclasses

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
from jax import lax

# Rows of the tiles of the forward substitution; 16 is the smallest matmul Triton emits.
SUB = 16
CHUNK_SIZES = (16, 32, 64)
HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the delta-rule kernels.

  Attributes:
    chunk: tokens per chunk (16, 32 or 64).
    value: columns of the state (of V) per program of the state pass; divides V.
  """
  chunk: int = 64
  value: int = 64


def check_blocks(blocks: BlockSizes, dv: int):
  """Raises a ValueError unless `blocks` tile a value dimension of `dv`."""
  if blocks.chunk not in CHUNK_SIZES:
    raise ValueError(f"blocks.chunk must be one of {CHUNK_SIZES}, got {blocks.chunk}")
  if blocks.value < SUB or dv % blocks.value or blocks.value & (blocks.value - 1):
    raise ValueError(
        f"blocks.value must be a power of two >= {SUB} dividing V={dv}, got {blocks.value}")


def unsupported(k: jax.Array, v: jax.Array, chunk_size: int):
  """Why the kernels cannot take these inputs, or None if they can."""
  if k.shape[-1] not in HEAD_DIMS or v.shape[-1] not in HEAD_DIMS:
    return (f"needs head dims K and V in {HEAD_DIMS}, got k {k.shape} and v {v.shape}")
  if chunk_size not in CHUNK_SIZES:
    return f"needs chunk_size in {CHUNK_SIZES}, got {chunk_size}"
  if k.dtype not in (jnp.float32, jnp.bfloat16):
    return f"needs float32 or bfloat16 inputs, got {k.dtype}"
  return None


def slower_than_xla(k: jax.Array):
  """Why `implementation=None` should not pick the kernels for these inputs, or None.

  On a GPU the kernels run float32 matmuls at full IEEE precision (see `float32_matmuls`:
  TF32x3 failed their tests), on the CUDA cores, while XLA's float32 dots use the tensor
  cores. Training a float32 model on an H200 (MQAR, T 256, batch 64) measured 0.45 M
  tokens/s for Gated DeltaNet at d_model 256 on the kernels against 2.2 M tokens/s at
  d_model 128 on the xla form, so float32 on a GPU defaults to the xla form.
  """
  if k.dtype == jnp.float32 and jax.default_backend() == "gpu":
    return "runs float32 matmuls on the GPU's CUDA cores, slower than the xla form"
  return None


def tile(i: int):
  """Rows of the i-th SUB-row tile of a chunk, as a ref index."""
  return pl.ds(i * SUB, SUB)


def tile_writer(ref):
  """`write(i, x)` storing tile i of a [C, D] ref (the `store_*` of `wy_chunk`)."""
  def write(i, x):
    ref[tile(i), :] = x.astype(ref.dtype)
  return write


def pad_time(x, length: int):
  """Zero-pads axis 1 of `x` to `length` (padded tokens: k = v = beta = g = 0)."""
  if x.shape[1] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, length - x.shape[1])
  return jnp.pad(x, widths)


def chunk_cumsum(g: jax.Array, chunk: int) -> jax.Array:
  """gamma: float32 cumulative sums of g [B, T, H] restarting at every chunk (T % chunk == 0)."""
  b, t, h = g.shape
  gamma = jnp.cumsum(g.astype(jnp.float32).reshape(b, t // chunk, chunk, h), axis=2)
  return gamma.reshape(b, t, h)


def mm(a, b, precise, contract=((1,), (0,))):
  """A 2-D matmul accumulated in float32.

  `precise` (float32 inputs) keeps float32 operands: at full precision when True, or with
  the given `lax.DotAlgorithmPreset` (see `float32_matmuls`); otherwise (False) operands
  are rounded to bfloat16 for the tensor cores, as the inputs already were.
  """
  dtype = jnp.float32 if precise is not False else jnp.bfloat16
  if precise is False:
    precision = lax.Precision.DEFAULT
  else:
    precision = lax.Precision.HIGHEST if precise is True else precise
  return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def float32_matmuls(dtype, interpret):
  """The `precise` argument of `mm` for a kernel on inputs of `dtype`.

  Compiled for a GPU, float32 matmuls run as three TF32 products (TF32x3): on an H100 that
  measured 1.3 against 14.3 ms for the neural-memory forward with Triton's IEEE float32
  dot, which runs on the CUDA cores and, at K = V = 128, needs more shared memory than
  there is; the relative error stayed under 1e-6. Interpreted (where XLA's CPU dot has
  no TF32x3), full float32. The delta-rule kernels do not use it yet: with TF32x3 their
  float32 GPU tests failed at K = V = 128 and 256 (the UT transform), so they keep `True`.
  """
  if dtype != jnp.float32:
    return False
  return True if interpret is not False else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def mm_nt(a, b, precise):
  """a @ b^T."""
  return mm(a, b, precise, ((1,), (1,)))


def mm_tn(a, b, precise):
  """a^T @ b."""
  return mm(a, b, precise, ((0,), (0,)))


def last_token(chunk, value):
  """[C] float32: `value` at the chunk's last token, zero elsewhere."""
  rows = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
  return jnp.where(rows == chunk - 1, value, 0.0)


def decay_matrix(gamma_rows, gamma_cols, causal):
  """`exp(gamma_i - gamma_j)` for row tokens i and column tokens j.

  Args:
    gamma_rows, gamma_cols: [R] and [S] float32 cumulative log-decays.
    causal: "inclusive" (j <= i, same tile), "strict" (j < i, same tile) or "none" (the
      columns are an earlier tile: every j precedes every i).

  Returns:
    [R, S] float32, 0 outside the causal part. Masked before the exp: above the diagonal
    the difference is positive and could overflow.
  """
  diff = gamma_rows[:, None] - gamma_cols[None, :]
  if causal == "none":
    return jnp.exp(diff)
  shape = (gamma_rows.shape[0], gamma_cols.shape[0])
  rows = lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, shape, 1)
  mask = cols < rows if causal == "strict" else cols <= rows
  return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def invert_unit_lower_tile(lower):
  """`(I + lower)^-1` of one [SUB, SUB] tile with `lower` strictly lower triangular.

  Block doubling with masks instead of slices (kernel values cannot be sliced): each level
  joins neighbouring diagonal blocks of width w by
  `[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]`, i.e. `X <- X - X E X` with E
  the coupling blocks C. Every intermediate is an exact sub-inverse, so this is as stable as
  forward substitution (a Neumann series would not be).
  """
  size = lower.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
  inverse = (rows == cols).astype(jnp.float32)
  width = 1
  while width < size:
    pair = 2 * width
    # lax.div and lax.rem: the indices are >= 0, and jnp's // and % add sign fix-ups.
    coupling = ((lax.div(rows, pair) == lax.div(cols, pair)) & (lax.rem(rows, pair) >= width)
                & (lax.rem(cols, pair) < width))
    e = jnp.where(coupling, lower, 0.0)
    inverse = inverse - mm(mm(inverse, e, True), inverse, True)
    width = pair
  return inverse


def wy_chunk(load_k, load_v, load_beta, load_gamma, store_w, store_u, chunk, precise,
             store_a=None):
  """The UT transform of one chunk by blocked forward substitution over SUB-row tiles.

  For tile i: `X_i = (I + L_ii)^-1 (R_i - sum_{j<i} L_ij X_j)` with
  `L_ij = diag(beta_i) (K_i K_j^T * exp(gamma_i - gamma_j))` (strictly lower for j = i),
  X = W (R = diag(beta e^gamma) K) and X = U (R = diag(beta) V) together, and, for the
  backward, X = A = (I + L)^-1 itself (R = I).

  Args:
    load_k, load_v, load_beta, load_gamma: `load(i)` -> tile i of k [SUB, K], v [SUB, V],
      beta [SUB], gamma [SUB].
    store_w, store_u: `store(i, value)` for tile i of W [SUB, K] and U [SUB, V] (float32).
    store_a: None, or `store(i, value)` for tile i of A [SUB, C] (float32).
    chunk: C, a multiple of SUB.
    precise: float32 matmuls (float32 inputs). Otherwise only the diagonal tiles' inverses
      are float32 and the products run on bfloat16 tensor cores: W and U are stored in
      bfloat16 anyway, and the [SUB, SUB] inverses are where rounding would compound.
  """
  keys, gammas, ws, us, inverses = [], [], [], [], []
  for i in range(chunk // SUB):
    k_i = load_k(i).astype(jnp.float32)
    beta_i = load_beta(i).astype(jnp.float32)
    gamma_i = load_gamma(i)
    r_w = (beta_i * jnp.exp(gamma_i))[:, None] * k_i
    r_u = beta_i[:, None] * load_v(i).astype(jnp.float32)
    if store_a is not None:
      rows = lax.broadcasted_iota(jnp.int32, (SUB, chunk), 0) + i * SUB
      r_a = (rows == lax.broadcasted_iota(jnp.int32, (SUB, chunk), 1)).astype(jnp.float32)
    for j in range(i):
      l_ij = beta_i[:, None] * mm_nt(k_i, keys[j], precise) * decay_matrix(
          gamma_i, gammas[j], "none")
      r_w = r_w - mm(l_ij, ws[j], precise)
      r_u = r_u - mm(l_ij, us[j], precise)
      if store_a is not None:
        r_a = r_a - mm(l_ij, inverses[j], precise)
    l_ii = beta_i[:, None] * mm_nt(k_i, k_i, precise) * decay_matrix(gamma_i, gamma_i, "strict")
    inverse = invert_unit_lower_tile(l_ii)
    w_i, u_i = mm(inverse, r_w, precise), mm(inverse, r_u, precise)
    store_w(i, w_i)
    store_u(i, u_i)
    if store_a is not None:
      inverses.append(mm(inverse, r_a, precise))
      store_a(i, inverses[-1])
    keys.append(k_i)
    gammas.append(gamma_i)
    ws.append(w_i)
    us.append(u_i)


def state_chunk(q, k, u, w, gamma, gamma_last, state, scale, precise):
  """Outputs of one chunk and the state after it.

  Args:
    q, k: [C, K]; u: U (delta rule) or V (linear attention) [C, Vb]; w: W [C, K] or None
      (linear attention); gamma: [C] float32; gamma_last: gamma[C - 1], a scalar;
    state: S at the chunk's start, [K, Vb] float32.
    scale: output scale.
    precise: float32 matmuls (float32 inputs).

  Returns:
    `(o, state, v_new)`: outputs [C, Vb] float32, S at the chunk's end and the chunk's Vn
    [C, Vb] float32 (which the backward reads).
  """
  v_new = u.astype(jnp.float32)
  if w is not None:
    v_new = v_new - mm(w, state, precise)
  scores = mm_nt(q, k, precise) * decay_matrix(gamma, gamma, "inclusive")
  o = scale * (jnp.exp(gamma)[:, None] * mm(q, state, precise) + mm(scores, v_new, precise))
  k_decayed = k.astype(jnp.float32) * jnp.exp(gamma_last - gamma)[:, None]
  state = jnp.exp(gamma_last) * state + mm_tn(k_decayed, v_new, precise)
  return o, state, v_new
