"""Context-parallel Titans neural memory: the linear memory with the "titans" rule.

The method of `memjax.sharding.context_parallel`, carried to `memjax.ops.neural_memory`.
With a linear memory W [K, V], the l2 loss and the l2 retention, every gradient
`2 k_t^T (k_t A - v_t)` is affine in the chunk's anchor A, and the momentum S and the
weights W are linear recurrences in it, so a shard maps the state it starts from affinely
to the state it ends in. The columns of W and S (one per value channel) do not mix, so the
map acts on each column of the stacked state X = [W; S] (2K x V) alike:

    X_end = A X_in + U,         y_t = y_t^0 + R_t X_in,

with A [2K, 2K] and R_t [1, 2K] shared by the V columns. Each shard gets U and y^0 from a
call of the unsharded op from a zero state, and A and R from a call with zero values
(V' = 2K) from the identity state X = I_2K (W = [I_K 0], S = [0 I_K]). The shards then
pass their (A, U) through the same scan over the seq devices as the other ops.

What it needs, and why:
* a linear memory (one layer) and the "titans" rule (loss "l2", retention "l2"): the MLP
  memory and the other Miras rules are not affine in the state, so a shard cannot start
  before the state it starts from is known;
* shards that start at chunk boundaries (T / seq devices a multiple of `chunk_size`) and an
  initial state at a chunk start (position 0): a chunk's gradients are taken at its first
  token's weights.
"""

import functools
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from memjax import ops
from memjax.ops import miras
from memjax.ops import validation
from memjax.sharding.context_parallel import _BATCH_AXES
from memjax.sharding.context_parallel import AnyMesh
from memjax.sharding.context_parallel import _check_divisible
from memjax.sharding.context_parallel import _check_mesh
from memjax.sharding.context_parallel import _incoming_and_final
from memjax.sharding.context_parallel import _matmul
from memjax.sharding.context_parallel import _memory_shard_map
from memjax.sharding.context_parallel import _with_incoming
from memjax.sharding.rules import mesh_axes


def unsupported(rule: Union[str, miras.MirasRule], memory_depth: int) -> Optional[str]:
  """Why a neural memory cannot run context-parallel, or None if it can."""
  rule = miras.resolve(rule)
  if memory_depth != 1:
    return (f"needs the linear memory (one layer): the update of a {memory_depth}-layer MLP "
            "memory is not affine in its weights")
  if rule.loss != "l2" or rule.retention != "l2":
    return (f"needs loss 'l2' and retention 'l2' (the 'titans' rule), got loss="
            f"{rule.loss!r}, retention={rule.retention!r}: the update is not affine in the "
            "state otherwise")
  return None


def _identity_state(b: int, h: int, dk: int) -> ops.NeuralMemoryState:
  """X = I_2K: weights [I_K 0] and momentum [0 I_K], [B, H, K, 2K], at a chunk start."""
  eye, zero = jnp.eye(dk, dtype=jnp.float32), jnp.zeros((dk, dk), jnp.float32)
  spread = lambda x: jnp.broadcast_to(x, (b, h, dk, 2 * dk))
  weights = spread(jnp.concatenate([eye, zero], axis=-1))
  momentum = spread(jnp.concatenate([zero, eye], axis=-1))
  return ops.NeuralMemoryState((weights,), (momentum,), (weights,), None,
                               jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=(
    "mesh", "chunk_size", "implementation", "batch_axes", "head_axis", "seq_axis"))
def _sharded_neural_memory(q, k, v, gates, first, *, mesh, chunk_size, implementation,
                           batch_axes, head_axis, seq_axis):
  """The linear-memory neural_memory on checked arguments, in shards.

  `first` is the stacked initial state [W; S], [B, H, 2K, V]; returns the outputs and the
  stacked final state.
  """
  call = functools.partial(ops.neural_memory, rule="titans", return_final_state=True,
                           chunk_size=chunk_size)
  # The response call has V' = 2K values, which the kernel may not take (K = 128): an
  # explicit "pallas" there means "the kernel where it applies".
  response_implementation = None if implementation == "pallas" else implementation

  def shard(q, k, v, gates, first):
    b, _, h, dk = q.shape
    y_local, end_local = call(q, k, v, **gates, implementation=implementation)
    response, end_response = call(
        q, k, jnp.zeros(q.shape[:-1] + (2 * dk,), v.dtype), **gates,
        initial_state=_identity_state(b, h, dk), implementation=response_implementation)
    stack = lambda state: jnp.concatenate([state.weights[0], state.momentum[0]], axis=-2)
    incoming, final = _incoming_and_final(stack(end_response), stack(end_local), first,
                                          apply=_matmul, seq_axis=seq_axis)
    return _with_incoming(y_local, response, incoming, v.dtype), final

  return _memory_shard_map(shard, mesh, batch_axes, head_axis, seq_axis)(
      q, k, v, gates, first)


def context_parallel_neural_memory(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    theta: jax.Array,
    eta: Optional[jax.Array] = None,
    alpha: Optional[jax.Array] = None,
    *,
    mesh: AnyMesh,
    rule: Union[str, miras.MirasRule] = "titans",
    initial_state: Optional[ops.NeuralMemoryState] = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: Optional[str] = None,
    check_finite: bool = False,
    batch_axes: Sequence[str] = _BATCH_AXES,
    head_axis: Union[None, str, Tuple[str, ...]] = "model",
    seq_axis: str = "seq",
):
  """`memjax.ops.neural_memory` (linear memory, "titans" rule) with T split over `seq_axis`.

  Args:
    q: queries [B, T, H, K].
    k: keys [B, T, H, K].
    v: values [B, T, H, V].
    theta: learning rates [B, T, H].
    eta: momentum [B, T, H], or None.
    alpha: forget gates [B, T, H], or None.
    mesh: the device mesh, or its `AbstractMesh` inside `jax.jit`.
    rule: must resolve to loss "l2" and retention "l2" (see `unsupported`).
    initial_state: a one-layer `NeuralMemoryState` at a chunk start (position 0), or None
      for a zero memory. A concrete nonzero position is refused; a traced one is trusted.
    return_final_state: also return the state after the last token.
    chunk_size: as in `memjax.ops.neural_memory`; T / (seq devices) must be a multiple.
    implementation: the implementation of `memjax.ops.neural_memory` each shard runs for
      its outputs ("pallas": the kernel where its head dims allow, for the 2K-wide
      response call too).
    check_finite: raise a ValueError if an input holds NaN or inf (outside jit only).
    batch_axes: mesh axes that split B (none: an empty tuple).
    head_axis: mesh axis (or tuple of axes) that splits H, or None.
    seq_axis: mesh axis that splits T.

  Returns:
    As `memjax.ops.neural_memory`: the outputs [B, T, H, V] in the dtype of `v`, and, if
    `return_final_state`, the final `NeuralMemoryState` (position 0).

  Raises:
    ValueError: as `memjax.ops.neural_memory`; for a memory or rule that is not affine in
      its state; for an initial state inside a chunk; for a mesh axis that `mesh` lacks or
      that is named twice; if B or H is not divisible by the devices of its mesh axes, or T
      not by chunk_size times the seq devices.
  """
  # The op's own checks, on the whole arrays (tracing only; nothing runs).
  jax.eval_shape(functools.partial(
      ops.neural_memory, rule=rule, initial_state=initial_state, chunk_size=chunk_size,
      implementation=implementation), q, k, v, theta, eta, alpha)
  if check_finite:
    validation.check_all_finite(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha)
  depth = 1 if initial_state is None else len(initial_state.weights)
  reason = unsupported(rule, depth)
  if reason is not None:
    raise ValueError(f"context_parallel_neural_memory {reason}")
  batch, length, heads, dk = q.shape
  if initial_state is None:
    first = jnp.zeros((batch, heads, 2 * dk, v.shape[-1]), jnp.float32)
  else:
    position = initial_state.position
    if not isinstance(position, jax.core.Tracer) and int(position) != 0:
      raise ValueError(
          f"initial_state.position must be 0 (a chunk start), got {int(position)}: shards "
          "start at chunk boundaries")
    first = jnp.concatenate([initial_state.weights[0], initial_state.momentum[0]], axis=-2)
  batch_axes = tuple(batch_axes)
  _check_mesh(mesh, batch_axes, head_axis, seq_axis, "head_axis")
  _check_divisible("B", batch, mesh, batch_axes)
  _check_divisible("T", length, mesh, (seq_axis,))
  shard_length = length // mesh.shape[seq_axis]
  if shard_length % chunk_size:
    raise ValueError(
        f"each shard's T / {mesh.shape[seq_axis]} seq devices = {shard_length} tokens must "
        f"be a multiple of chunk_size = {chunk_size}: a chunk's gradients are taken at its "
        "first token's weights, so shards must start chunks")
  if head_axis is not None:
    _check_divisible("H", heads, mesh, mesh_axes(head_axis))
  gates = {name: gate for name, gate in (("theta", theta), ("eta", eta), ("alpha", alpha))
           if gate is not None}
  y, final = _sharded_neural_memory(
      q, k, v, gates, first, mesh=mesh, chunk_size=chunk_size,
      implementation=implementation, batch_axes=batch_axes, head_axis=head_axis,
      seq_axis=seq_axis)
  if not return_final_state:
    return y
  weights, momentum = final[..., :dk, :], final[..., dk:, :]
  return y, ops.NeuralMemoryState((weights,), (momentum,), (weights,), None,
                                  jnp.zeros((), jnp.int32))
