"""The neural long-term memory of Titans (arXiv 2501.00663, §3) and its Miras variants.

A memory M with weights W (a linear map or a residual MLP, `memjax.ops.titans_memory`)
learns at test time. For each token, with data-dependent learning rate `theta_t`, momentum
`eta_t` and forget gate `alpha_t`:

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t),
    M_t = (1 - alpha_t) M_{t-1} + S_t,          y_t = M_t(q_t),

with `l(M; k, v) = ||M(k) - v||^2` (or a Miras loss, `memjax.ops.miras`). `t'` is the start
of t's chunk: the gradients of a chunk are all taken at the weights its first token saw
(Titans eqs 16-18), which is what makes the chunk parallel; `chunk_size=1` is exact online
gradient descent. The non-linear Miras retentions ("lq", "kl") map an accumulator to the
weights where a chunk ends (see `memjax.ops.miras`).

The state knows how far into the current chunk it is, so a sequence can be cut anywhere
(and decoded token by token) with the same result as one call.

Layouts follow DESIGN.md: q, k [B, T, H, K]; v [B, T, H, V]; per-token gates [B, T, H];
every state array float32 per batch element and head.
"""

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from memjax.kernels.titans import chunked as titans_kernels
from memjax.kernels.titans import common as kernel_common
from memjax.kernels.titans import mlp_common
from memjax.ops import dispatch
from memjax.ops import miras
from memjax.ops import titans_chunked
from memjax.ops import titans_memory
from memjax.ops import validation


class NeuralMemoryState(NamedTuple):
  """Recurrent state of the neural memory; each tuple holds one array per memory layer.

  Attributes:
    weights: the memory weights M_t, layer i [B, H, d_in_i, d_out_i] float32.
    momentum: the surprise momentum S_t, shapes of `weights`.
    anchor: the weights at the start of the current chunk, where the gradients are taken.
    accumulator: for the non-linear retentions ("lq", "kl"), the accumulator whose map the
      weights are at chunk ends; None for "l2".
    position: int32 [], tokens already seen of the current chunk (0 at a chunk start).
  """
  weights: Tuple[jax.Array, ...]
  momentum: Tuple[jax.Array, ...]
  anchor: Tuple[jax.Array, ...]
  accumulator: Optional[Tuple[jax.Array, ...]]
  position: jax.Array


def init_state(initial_weights: Sequence[jax.Array], batch_size: int, *,
               rule: Union[str, miras.MirasRule] = "titans") -> NeuralMemoryState:
  """The state at the start of a sequence, from the memory's initial (meta-learned) weights.

  Args:
    initial_weights: per layer [H, d_in, d_out], shared by the batch: one matrix [H, K, V]
      for the linear memory; L >= 2 matrices K -> hidden -> ... -> K for the MLP. For the
      non-linear retentions they are the accumulator, and the weights are their map.
    batch_size: B.
    rule: a `miras.MirasRule` or a preset name ("titans", "moneta", "yaad", "memora").

  Returns:
    The state: weights broadcast to [B, H, d_in, d_out] float32, zero momentum, position 0.
  """
  rule = miras.resolve(rule)
  if not initial_weights:
    raise ValueError("initial_weights must hold at least one layer [H, d_in, d_out], got none")
  for i, w in enumerate(initial_weights):
    if w.ndim != 3:
      raise ValueError(
          f"initial_weights[{i}] must have 3 dims [H, d_in, d_out], got shape {tuple(w.shape)}")
  start = tuple(jnp.broadcast_to(w.astype(jnp.float32), (batch_size,) + w.shape)
                for w in initial_weights)
  weights = start
  if rule.has_accumulator:
    weights = tuple(miras.retention_map(rule, a) for a in start)
  return NeuralMemoryState(
      weights=weights, momentum=tuple(jnp.zeros_like(w) for w in weights), anchor=weights,
      accumulator=start if rule.has_accumulator else None,
      position=jnp.zeros((), jnp.int32))


def _check_state(state: NeuralMemoryState, b: int, h: int, dk: int, dv: int,
                 rule: miras.MirasRule) -> None:
  if not isinstance(state, NeuralMemoryState):
    raise ValueError(f"initial_state must be a NeuralMemoryState, got {type(state).__name__}")
  depth = len(state.weights)
  if depth == 0:
    raise ValueError("initial_state.weights must hold at least one layer, got none")
  d_in = dk
  for i, w in enumerate(state.weights):
    if w.ndim != 4 or w.shape[:3] != (b, h, d_in):
      raise ValueError(
          f"initial_state.weights[{i}] must have shape [B, H, d_in, d_out] = "
          f"({b}, {h}, {d_in}, d_out), got {tuple(w.shape)}")
    d_in = w.shape[-1]
  if d_in != dv:
    raise ValueError(
        f"the last memory layer must output V = {dv} (the value dim of v), got "
        f"initial_state.weights[-1] of shape {tuple(state.weights[-1].shape)}")
  if depth > 1 and dk != dv:
    raise ValueError(
        f"the MLP memory M(x) = x + LN(...) needs K == V, got K = {dk} (q, k) and V = {dv} (v)")
  if rule.has_accumulator != (state.accumulator is not None):
    raise ValueError(
        f"retention={rule.retention!r} needs initial_state.accumulator to be "
        f"{'a tuple of arrays' if rule.has_accumulator else 'None'}; build the state with "
        f"init_state(..., rule=...) of the same rule")
  groups = {"weights": state.weights, "momentum": state.momentum, "anchor": state.anchor}
  if state.accumulator is not None:
    groups["accumulator"] = state.accumulator
  for name, arrays in groups.items():
    if len(arrays) != depth:
      raise ValueError(f"initial_state.{name} must hold {depth} layers, got {len(arrays)}")
    for i, (x, w) in enumerate(zip(arrays, state.weights)):
      validation.check_shape(f"initial_state.{name}[{i}]", x, w.shape, "like weights")
      if x.dtype != jnp.float32:
        raise ValueError(f"initial_state.{name}[{i}] must be float32 (the state is always "
                         f"float32), got {x.dtype}")
  if jnp.shape(state.position) != ():
    raise ValueError(
        f"initial_state.position must be a scalar, got shape {jnp.shape(state.position)}")


def _prepare(q, k, v, theta, eta, alpha, huber_delta, rule, activation, initial_state,
             chunk_size, check_finite):
  """Validates the arguments; returns `(rule, state)` with the defaults filled in."""
  rule = miras.resolve(rule)
  titans_memory.check_activation(activation)
  gates = {"theta": theta, "eta": eta, "alpha": alpha, "huber_delta": huber_delta}
  validation.check_memory_inputs(q, k, v, gates, None)
  validation.check_chunk_size(chunk_size)
  if (rule.loss == "huber") != (huber_delta is not None):
    raise ValueError(
        f"huber_delta [B, T, H] is needed by loss='huber' and only by it; loss={rule.loss!r}, "
        f"huber_delta {'given' if huber_delta is not None else 'None'}")
  b, _, h, dk = q.shape
  dv = v.shape[-1]
  if initial_state is None:
    initial_state = init_state((jnp.zeros((h, dk, dv)),), b, rule=rule)
  _check_state(initial_state, b, h, dk, dv, rule)
  if check_finite:
    validation.check_all_finite(q=q, k=k, v=v, **gates,
                                **{f"initial_state.weights[{i}]": w
                                   for i, w in enumerate(initial_state.weights)})
  return rule, initial_state


def neural_memory_step(q, k, v, theta, eta=None, alpha=None, huber_delta=None, *, state,
                       chunk_size: int = 1, rule: Union[str, miras.MirasRule] = "titans",
                       activation: str = "gelu"):
  """One token of the neural memory, for decoding; the reference runs it over time.

  Args:
    q, k: query and key [B, H, K].
    v: value [B, H, V].
    theta: learning rate [B, H] (>= 0).
    eta: momentum [B, H] in [0, 1], or None for none (plain gradient descent).
    alpha: forget gate [B, H] in [0, 1], or None for no forgetting.
    huber_delta: threshold of loss="huber" [B, H], else None.
    state: the `NeuralMemoryState` after the previous tokens.
    chunk_size: chunk length of the sequence this token belongs to (the gradient is taken
      at the weights of the chunk start); 1 is online gradient descent.
    rule: a `miras.MirasRule` or a preset name.
    activation: sigma of the MLP memory.

  Returns:
    `(y, state)`: the retrieval `M_t(q_t)` [B, H, V] in the dtype of `v`, and the new state.
  """
  expand = lambda x: None if x is None else x[:, None]
  rule, state = _prepare(expand(q), expand(k), expand(v), expand(theta), expand(eta),
                         expand(alpha), expand(huber_delta), rule, activation, state,
                         chunk_size, False)
  y, state = _step(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, rule, activation)
  return y.astype(v.dtype), state


def _step(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, rule, activation):
  f32 = jnp.float32
  hi = lax.Precision.HIGHEST
  q, k, v, theta = (x.astype(f32) for x in (q, k, v, theta))
  keep = jnp.ones_like(theta) if alpha is None else 1.0 - alpha.astype(f32)
  carry = jnp.zeros_like(theta) if eta is None else eta.astype(f32)
  delta = None if huber_delta is None else huber_delta.astype(f32)[:, :, None]
  error = lambda pred: miras.error_signal(rule, pred, v[:, :, None], delta)
  inputs, deltas = titans_memory.gradient_factors(state.anchor, k[:, :, None], error,
                                                  activation, hi)
  scale = lambda x: x[..., None, None]
  momentum, weights, acc = [], [], []
  for i, (x_i, g_i) in enumerate(zip(inputs, deltas)):
    grad = jnp.einsum("bhd,bhe->bhde", x_i[:, :, 0], g_i[:, :, 0], precision=hi)
    s = scale(carry) * state.momentum[i] - scale(theta) * grad
    momentum.append(s)
    weights.append(scale(keep) * state.weights[i] + s)
    if state.accumulator is not None:
      acc.append(scale(keep) * state.accumulator[i] + s)
  position = state.position + 1
  done = position == chunk_size
  if state.accumulator is not None:
    weights = [jnp.where(done, miras.retention_map(rule, a), w) for a, w in zip(acc, weights)]
  anchor = tuple(jnp.where(done, w, a) for w, a in zip(weights, state.anchor))
  y, _ = titans_memory.forward(weights, q[:, :, None], activation, hi)
  state = NeuralMemoryState(tuple(weights), tuple(momentum), anchor,
                            tuple(acc) if state.accumulator is not None else None,
                            jnp.where(done, 0, position).astype(jnp.int32))
  return y[:, :, 0], state


def _reference(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, rule, activation,
               fresh):
  del fresh  # The reference goes token by token from wherever the state is.
  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)

  def step(s, x):
    y_t, s = _step(*x, s, chunk_size, rule, activation)
    return s, y_t

  xs = tuple(map(time_major, (q, k, v, theta, eta, alpha, huber_delta)))
  final, y = lax.scan(step, state, xs)
  return jnp.moveaxis(y, 0, 1), final


def _xla(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, rule, activation, fresh):
  y, final = titans_chunked.chunked(q, k, v, theta, eta, alpha, huber_delta, state,
                                    chunk_size, rule, activation, fresh)
  return y, NeuralMemoryState(*final)


def _pallas(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, rule, activation,
            fresh):
  del rule  # `_kernel_unsupported` admitted only what the kernels run.
  t = q.shape[1]
  chunks = titans_chunked.to_chunks(q, k, v, theta, eta, alpha, huber_delta, state,
                                    chunk_size, fresh)
  # [B, H, N, C, ...] -> [B, H, N * C, ...]: the kernels' heads-first layout.
  flat = lambda x: x.reshape(x.shape[:2] + (-1,) + x.shape[4:])
  coefficients = {"cw": chunks.coef_w, "d": chunks.d, "b": chunks.b, "cs": chunks.coef_s_end,
                  "e": chunks.e, "mask": chunks.mask}
  y, weights, momentum, last_anchor = titans_kernels.on_default_backend(
      flat(chunks.q), flat(chunks.k), flat(chunks.v),
      {name: flat(x) for name, x in coefficients.items()}, state.weights, state.momentum,
      state.anchor, chunk_size=chunk_size, activation=activation)
  y = titans_chunked.from_chunks(y.reshape(chunks.v.shape), chunks, t)
  position = titans_chunked.next_position(chunks, t, chunk_size)
  # A sequence that ends inside a chunk keeps that chunk's anchor for the tokens to come.
  anchor = tuple(jnp.where(position == 0, w, a) for w, a in zip(weights, last_anchor))
  return y, NeuralMemoryState(weights, momentum, anchor, None, position)


def _kernel_unsupported(q, v, state, rule, chunk_size):
  """Why no kernel runs this call (see `dispatch.choose`), or None."""
  depth = len(state.weights)
  if depth == 1:
    return kernel_common.unsupported(q, v, depth, rule.loss, rule.retention, chunk_size)
  return mlp_common.unsupported(q, v, depth, state.weights[0].shape[-1], rule.loss,
                                rule.retention, chunk_size)


_IMPLEMENTATIONS = {"reference": _reference, "xla": _xla, "pallas": _pallas}


def neural_memory(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    theta: jax.Array,
    eta: Optional[jax.Array] = None,
    alpha: Optional[jax.Array] = None,
    *,
    huber_delta: Optional[jax.Array] = None,
    rule: Union[str, miras.MirasRule] = "titans",
    activation: str = "gelu",
    initial_state: Optional[NeuralMemoryState] = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: Optional[str] = None,
    check_finite: bool = False,
):
  """The neural long-term memory over a whole sequence (see the module docstring).

  Args:
    q: queries [B, T, H, K] (usually L2-normalised).
    k: keys [B, T, H, K] (usually L2-normalised).
    v: values [B, T, H, V].
    theta: learning rates [B, T, H] (>= 0).
    eta: momentum [B, T, H] in [0, 1], or None for none (plain gradient descent).
    alpha: forget gates [B, T, H] in [0, 1], or None for no forgetting.
    huber_delta: per-token threshold [B, T, H] of loss="huber" (Yaad); None otherwise.
    rule: a `miras.MirasRule` or a preset: "titans" (l2 loss, l2 retention), "moneta" (lp,
      lq), "yaad" (huber, l2), "memora" (l2, kl).
    activation: sigma of the MLP memory ("gelu", "silu", "relu").
    initial_state: a `NeuralMemoryState` (see `init_state`); it also fixes the memory model
      (one layer: linear; more: MLP). None: a zero linear memory [B, H, K, V].
    return_final_state: also return the state after the last token.
    chunk_size: tokens whose gradients share the weights of their chunk's start (any
      positive int; T need not be a multiple of it). 1 is exact online gradient descent.
    implementation: "reference" (token by token), "xla" (chunkwise dual form), "pallas"
      (the chunk loop as one kernel: the "titans" rule, head dims 64 or 128, chunk
      16/32/64; the linear memory, or the MLP memory with K == V and a power-of-two
      hidden width) or None (the linear memory's kernel on GPU/TPU where it applies,
      else "xla"; the MLP memory's kernels are chosen only explicitly, as they are not
      yet timed on a chip).
    check_finite: raise a ValueError if an input holds NaN or inf (outside jit only).

  Returns:
    The retrievals [B, T, H, V] in the dtype of `v`, and, if `return_final_state`, the final
    `NeuralMemoryState`.
  """
  fresh = initial_state is None
  rule, state = _prepare(q, k, v, theta, eta, alpha, huber_delta, rule, activation,
                         initial_state, chunk_size, check_finite)
  impl = dispatch.choose(
      "neural_memory", implementation, _IMPLEMENTATIONS,
      _kernel_unsupported(q, v, state, rule, chunk_size),
      # Timed on an H100 (BENCHMARKS.md): the GPU body is 2.7x slower than the xla form;
      # the TPU body is not yet timed.
      pallas_slower=("the MLP-memory GPU kernel is slower than the xla form and the TPU "
                     "one is not yet timed" if len(state.weights) > 1 else None))
  y, final = impl(q, k, v, theta, eta, alpha, huber_delta, state, chunk_size, rule,
                  activation, fresh)
  y = y.astype(v.dtype)
  return (y, final) if return_final_state else y
