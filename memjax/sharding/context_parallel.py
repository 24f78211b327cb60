"""Context-parallel (sequence-parallel) linear scan, linear attention and delta rule.

The time axis is split over the mesh axis `seq_axis`, and at the same time the batch over
`batch_axes` and the heads over `head_axis` (the scan's axis 2 over `feature_axis`), in one
`jax.shard_map`. Every one of these recurrences is affine in the state it starts from: a
shard that starts from `S_in` ends in `S_end = A S_in + U`, and its outputs are its outputs
from a zero state plus a linear response to `S_in`. Each shard gets all of it from two calls
of the unsharded op in `memjax.ops`:

* the *local* call, from a zero state: the outputs o_0 and the end state U;
* the *response* call, with zero inputs (b = 0, or v = 0) from the identity state (ones, or
  I_K as a [K, K] state): its end state is the transition A (the product of the decays; for
  the delta rules the K x K product of the `exp(g_t) (I - beta_t k_t k_t^T)`) and its
  outputs R are the outputs' response, `o = o_0 + R S_in` (R [T, K] against S_in [K, V]).

For linear attention and the delta rules the two are one call: every column of the state
follows its own column of the values, so the values `[v | 0]` from the state `[0 | I_K]`
give `[o_0 | R]` and `[U | A]` at once, with the per-chunk [C, C] work done once (two
calls remain where the Pallas kernels take width V but not V + K).

The shards all-gather their (A, U) over `seq_axis`, run the short recurrence over the seq
devices from the initial state, and each takes the state it starts from. No call of the op
waits for the collective, and since only the ops are called, each of their implementations
("reference", "xla", "pallas") runs sharded; gradients are JAX's autodiff through the ops,
the collectives and `jax.shard_map`.

The mixers of `memjax.nn.associative` (LinearAttention, DeltaNet, GatedDeltaNet) call these
by themselves when they run under a mesh whose "seq" axis has more than one device:
`current_seq_sharding` finds the mesh of the context (`memjax.train`'s steps set it, or
`jax.set_mesh` / `jax.sharding.use_abstract_mesh`) and the mesh axes of the logical axis
rules; so does the Titans NeuralMemory layer with a linear memory and the "titans" rule
(`memjax.sharding.context_parallel_titans`). The other mixers have no context-parallel op:
under such a mesh XLA partitions them, which is correct but gathers the sequence.
"""

import functools
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from memjax import ops
from memjax.kernels.delta_rule import common as kernel_common
from memjax.ops import chunking
from memjax.ops import validation
# The dtype linear_scan accumulates in: the shards' states must match the op's.
from memjax.ops.scan import accumulation_dtype
from memjax.sharding.rules import DEFAULT_RULES
from memjax.sharding.rules import Rules
from memjax.sharding.rules import logical_to_spec
from memjax.sharding.rules import mesh_axes

_BATCH_AXES = ("data", "fsdp")
# A `jax.sharding.Mesh`, or inside `jax.jit` the `AbstractMesh` of the context.
AnyMesh = Union[jax.sharding.Mesh, jax.sharding.AbstractMesh]



def _check_mesh(mesh, batch_axes, head_axis, seq_axis, head_arg):
  named = tuple(batch_axes) + mesh_axes(head_axis) + (seq_axis,)
  missing = [axis for axis in named if axis not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh axes {missing} are not in the mesh {dict(mesh.shape)}")
  if len(set(named)) != len(named):
    raise ValueError(f"batch_axes {tuple(batch_axes)}, {head_arg} {head_axis!r} and seq_axis "
                     f"{seq_axis!r} must be different mesh axes")


def _check_divisible(what: str, size: int, mesh, axes: Sequence[str]):
  devices = math.prod(mesh.shape[axis] for axis in axes)
  if size % devices:
    raise ValueError(f"{what} = {size} must be divisible by the {devices} devices of mesh "
                     f"axes {tuple(axes)}")


def _specs(batch_axes, head_axis, seq_axis):
  """PartitionSpecs of the per-token arrays [B, T, H, ...] and the states [B, H, ...]."""
  batch = tuple(batch_axes) or None
  # Without a head axis the specs stop early, so they also fit a [B, T] scan.
  heads = () if head_axis is None else (head_axis,)
  return PartitionSpec(batch, seq_axis, *heads), PartitionSpec(batch, *heads)


def _shard_map(shard, mesh, in_specs, out_specs):
  # Unchecked, because the Pallas kernels declare their outputs without the mesh axes they
  # vary over, which a checked shard_map refuses. The unchecked transpose takes what is not
  # split over a mesh axis to be computed alike on each of its devices, which holds here:
  # the final state is the same on every seq shard (and all_gather transposes to a sum).
  return jax.shard_map(shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def _matmul(transition, state):
  return jnp.matmul(transition, state, precision=lax.Precision.HIGHEST)


def _incoming_and_final(transition, offset, first, *, apply: Callable, seq_axis: str,
                        reverse: bool = False):
  """The state this shard starts from, and the state after the whole sequence.

  Inside `jax.shard_map`: shard i maps the state it starts from to
  `apply(transition_i, s) + offset_i`.

  Args:
    transition: this shard's A, [..., K, K] (matrix states) or like `offset`.
    offset: this shard's end state from a zero state, U.
    first: the state the sequence starts from, the same on every shard of `seq_axis`.
    apply: `apply(A, s)`, A applied to the state s.
    seq_axis: the mesh axis the sequence is split over.
    reverse: the sequence runs from the last shard of `seq_axis` to the first.

  Returns:
    `(incoming, final)`, both like `offset`; `final` is the same on every shard.
  """
  transitions = lax.all_gather(transition, seq_axis)
  offsets = lax.all_gather(offset, seq_axis)
  position = lax.axis_index(seq_axis)
  if reverse:
    transitions, offsets = transitions[::-1], offsets[::-1]
    position = transitions.shape[0] - 1 - position

  def step(state, summary):
    transition, offset = summary
    state = apply(transition, state) + offset
    return state, state

  # Sequential: the seq axis is short, and XLA's CPU compiler (JAX 0.11.2) crashes on the
  # backward of a lax.associative_scan inside a shard_map over several devices.
  final, after = lax.scan(step, first, (transitions, offsets))
  starts = jnp.concatenate([first[None], after[:-1]])
  return starts[position], final


def _with_incoming(local, response, incoming, dtype):
  """A shard's outputs from its true incoming state: `local + response @ incoming`.

  local [B, T, H, V] from a zero state; response [B, T, H, R] from the identity state;
  incoming [B, H, R, V] the state the shard starts from."""
  o = local.astype(jnp.float32) + jnp.einsum(
      "bthr,bhrv->bthv", response.astype(jnp.float32), incoming,
      precision=chunking.matmul_precision(dtype))
  return o.astype(dtype)


def _one_call(k: jax.Array, v: jax.Array, chunk_size: int) -> bool:
  """Whether a shard computes its local and response parts in one call of width V + K.

  Always, unless the Pallas kernels take width V but not V + K (they need widths in
  `HEAD_DIMS`): then two kernel calls beat one call of the xla form."""
  wide = jax.ShapeDtypeStruct(v.shape[:-1] + (v.shape[-1] + k.shape[-1],), v.dtype)
  return not (kernel_common.unsupported(k, v, chunk_size) is None
              and kernel_common.unsupported(k, wide, chunk_size) is not None)


def _memory_shard_map(shard, mesh, batch_axes, head_axis, seq_axis):
  """`shard(q, k, v, gates, first) -> (outputs, final state)` as a `jax.shard_map`: the
  per-token arrays split over batch, seq and heads, the states over batch and heads."""
  tokens, states = _specs(batch_axes, head_axis, seq_axis)
  return _shard_map(shard, mesh, (tokens, tokens, tokens, tokens, states), (tokens, states))


# Eagerly, jax.shard_map runs its body op by op on every device (seconds a call even for
# small inputs); compiled, it is one program. The configuration is static.
@functools.partial(jax.jit, static_argnames=(
    "op", "mesh", "scale", "chunk_size", "implementation", "batch_axes", "head_axis",
    "seq_axis"))
def _sharded_memory(q, k, v, gates, first, *, op, mesh, scale, chunk_size, implementation,
                    batch_axes, head_axis, seq_axis):
  """`op` on checked arguments, in shards; returns the outputs and the final state."""
  call = functools.partial(op, scale=scale, return_final_state=True, chunk_size=chunk_size,
                           implementation=implementation)
  dk, dv = q.shape[-1], v.shape[-1]
  widen = _one_call(k, v, chunk_size)

  def shard(q, k, v, gates, first):
    identity = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), first.shape[:2] + (dk, dk))
    zeros = jnp.zeros(k.shape, v.dtype)
    if widen:
      # Each column of the state follows its own column of v, so the local and response
      # calls are one call on [v | 0] from [0 | I], sharing the per-chunk [C, C] work.
      o, end = call(q, k, jnp.concatenate([v, zeros], -1), **gates,
                    initial_state=jnp.concatenate([jnp.zeros_like(first), identity], -1))
      o_local, response = o[..., :dv], o[..., dv:]
      end_local, transition = end[..., :dv], end[..., dv:]
    else:
      o_local, end_local = call(q, k, v, **gates)
      response, transition = call(q, k, zeros, **gates, initial_state=identity)
    incoming, final = _incoming_and_final(transition, end_local, first, apply=_matmul,
                                          seq_axis=seq_axis)
    return _with_incoming(o_local, response, incoming, v.dtype), final

  return _memory_shard_map(shard, mesh, batch_axes, head_axis, seq_axis)(
      q, k, v, gates, first)


def _context_parallel_memory(op, q, k, v, gates, *, mesh, scale, initial_state,
                             return_final_state, chunk_size, implementation, check_finite,
                             batch_axes, head_axis, seq_axis):
  """`op` (linear attention or a delta rule) with the sequence split over `seq_axis`."""
  scale, initial_state = validation.prepare_memory_call(
      q, k, v, gates, scale=scale, initial_state=initial_state, chunk_size=chunk_size,
      check_finite=check_finite)
  batch_axes = tuple(batch_axes)
  _check_mesh(mesh, batch_axes, head_axis, seq_axis, "head_axis")
  batch, length, heads, _ = q.shape
  _check_divisible("B", batch, mesh, batch_axes)
  _check_divisible("T", length, mesh, (seq_axis,))
  if head_axis is not None:
    _check_divisible("H", heads, mesh, mesh_axes(head_axis))
  o, final = _sharded_memory(
      q, k, v, {name: gate for name, gate in gates.items() if gate is not None}, initial_state,
      op=op, mesh=mesh, scale=scale, chunk_size=chunk_size, implementation=implementation,
      batch_axes=batch_axes, head_axis=head_axis, seq_axis=seq_axis)
  return (o, final) if return_final_state else o


def context_parallel_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: Optional[jax.Array] = None,
    *,
    mesh: AnyMesh,
    scale: Optional[float] = None,
    initial_state: Optional[jax.Array] = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: Optional[str] = None,
    check_finite: bool = False,
    batch_axes: Sequence[str] = _BATCH_AXES,
    head_axis: Union[None, str, Tuple[str, ...]] = "model",
    seq_axis: str = "seq",
):
  """`memjax.ops.linear_attention` with the time axis split over the mesh axis `seq_axis`.

  The defaults of the mesh axes are those of `memjax.sharding.DEFAULT_RULES` for "batch",
  "heads" and "seq", so activations laid out by those rules enter without resharding.

  Args:
    q: queries [B, T, H, K].
    k: keys [B, T, H, K].
    v: values [B, T, H, V].
    g: log-decays [B, T, H] (<= 0), or None for no decay.
    mesh: the device mesh, or its `AbstractMesh` (e.g. `jax.sharding.get_abstract_mesh()`)
      where the jit's shardings or `jax.set_mesh` name the devices.
    scale: output scale (a Python number), None for `K ** -0.5`.
    initial_state: [B, H, K, V] float32, the state before the first token; zeros when None.
    return_final_state: also return the state after the last token.
    chunk_size: chunk length of the chunkwise form; a shard's T / (seq devices) tokens need
      not be a multiple of it.
    implementation: the implementation of `memjax.ops.linear_attention` each shard runs.
    check_finite: raise a ValueError if an input holds NaN or inf (outside jit only).
    batch_axes: mesh axes that split B (none: an empty tuple).
    head_axis: mesh axis (or tuple of axes) that splits H, or None.
    seq_axis: mesh axis that splits T.

  Returns:
    As `memjax.ops.linear_attention`: the outputs [B, T, H, V] in the dtype of `v`, and, if
    `return_final_state`, the final state [B, H, K, V] float32.

  Raises:
    ValueError: as `memjax.ops.linear_attention`; for a mesh axis that `mesh` lacks or that
      is named twice; if B, T or H is not divisible by the devices of its mesh axes.
  """
  return _context_parallel_memory(
      ops.linear_attention, q, k, v, {"g": g}, mesh=mesh, scale=scale,
      initial_state=initial_state, return_final_state=return_final_state,
      chunk_size=chunk_size, implementation=implementation, check_finite=check_finite,
      batch_axes=batch_axes, head_axis=head_axis, seq_axis=seq_axis)


def context_parallel_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: Optional[jax.Array] = None,
    *,
    mesh: AnyMesh,
    scale: Optional[float] = None,
    initial_state: Optional[jax.Array] = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: Optional[str] = None,
    check_finite: bool = False,
    batch_axes: Sequence[str] = _BATCH_AXES,
    head_axis: Union[None, str, Tuple[str, ...]] = "model",
    seq_axis: str = "seq",
):
  """`memjax.ops.delta_rule` with the time axis split over the mesh axis `seq_axis`.

  The defaults of the mesh axes are those of `memjax.sharding.DEFAULT_RULES` for "batch",
  "heads" and "seq", so activations laid out by those rules enter without resharding.

  Args:
    q: queries [B, T, H, K].
    k: keys [B, T, H, K] (usually L2-normalised, which keeps the update stable).
    v: values [B, T, H, V].
    beta: write strengths [B, T, H], usually in (0, 1).
    g: log-decays [B, T, H] (<= 0), or None for DeltaNet.
    mesh: the device mesh, or its `AbstractMesh` (e.g. `jax.sharding.get_abstract_mesh()`)
      where the jit's shardings or `jax.set_mesh` name the devices.
    scale: output scale (a Python number), None for `K ** -0.5`.
    initial_state: [B, H, K, V] float32, the state before the first token; zeros when None.
    return_final_state: also return the state after the last token.
    chunk_size: chunk length of the chunkwise form; a shard's T / (seq devices) tokens need
      not be a multiple of it.
    implementation: the implementation of `memjax.ops.delta_rule` each shard runs.
    check_finite: raise a ValueError if an input holds NaN or inf (outside jit only).
    batch_axes: mesh axes that split B (none: an empty tuple).
    head_axis: mesh axis (or tuple of axes) that splits H, or None.
    seq_axis: mesh axis that splits T.

  Returns:
    As `memjax.ops.delta_rule`: the outputs [B, T, H, V] in the dtype of `v`, and, if
    `return_final_state`, the final state [B, H, K, V] float32.

  Raises:
    ValueError: as `memjax.ops.delta_rule`; for a mesh axis that `mesh` lacks or that is
      named twice; if B, T or H is not divisible by the devices of its mesh axes.
  """
  return _context_parallel_memory(
      ops.delta_rule, q, k, v, {"beta": beta, "g": g}, mesh=mesh, scale=scale,
      initial_state=initial_state, return_final_state=return_final_state,
      chunk_size=chunk_size, implementation=implementation, check_finite=check_finite,
      batch_axes=batch_axes, head_axis=head_axis, seq_axis=seq_axis)


@functools.partial(jax.jit, static_argnames=(
    "mesh", "reverse", "implementation", "batch_axes", "feature_axis", "seq_axis"))
def _sharded_scan(a, b, first, *, mesh, reverse, implementation, batch_axes, feature_axis,
                  seq_axis):
  """`memjax.ops.linear_scan` on checked arguments, in shards."""
  scan = functools.partial(ops.linear_scan, reverse=reverse, implementation=implementation)
  dtype = accumulation_dtype(a, b)
  end = 0 if reverse else -1

  def shard(a, b, first):
    first = first.astype(dtype)
    # b in the accumulation dtype: the states handed between shards stay unrounded, as the
    # unsharded op keeps them.
    local = scan(a, b.astype(dtype))
    # From ones, with no inputs, the states are the products of the decays so far.
    response = scan(a, jnp.zeros(b.shape, dtype), jnp.ones(first.shape, dtype))
    incoming, _ = _incoming_and_final(response[:, end], local[:, end], first,
                                      apply=jnp.multiply, seq_axis=seq_axis, reverse=reverse)
    return (local + response * incoming[:, None]).astype(b.dtype)

  tokens, states = _specs(batch_axes, feature_axis, seq_axis)
  return _shard_map(shard, mesh, (tokens, tokens, states), tokens)(a, b, first)


def context_parallel_linear_scan(
    a: jax.Array,
    b: jax.Array,
    h0: Optional[jax.Array] = None,
    *,
    mesh: AnyMesh,
    reverse: bool = False,
    implementation: Optional[str] = None,
    batch_axes: Sequence[str] = _BATCH_AXES,
    feature_axis: Union[None, str, Tuple[str, ...]] = "model",
    seq_axis: str = "seq",
) -> jax.Array:
  """`memjax.ops.linear_scan` (`h_t = a_t * h_{t-1} + b_t`) with axis 1 split over `seq_axis`.

  Args:
    a: decays, [B, T, ...] (any trailing shape).
    b: inputs, same shape as `a`.
    h0: initial state, [B, ...] (`a.shape` without axis 1); zeros when None. With
      `reverse=True`, the state after the last step.
    mesh: the device mesh, or its `AbstractMesh` (e.g. `jax.sharding.get_abstract_mesh()`)
      where the jit's shardings or `jax.set_mesh` name the devices.
    reverse: run the recurrence from the last step to the first.
    implementation: the implementation of `memjax.ops.linear_scan` each shard runs.
    batch_axes: mesh axes that split B (none: an empty tuple).
    feature_axis: mesh axis (or tuple of axes) that splits axis 2 of `a` and `b` (if they
      have one), or None.
    seq_axis: mesh axis that splits T.

  Returns:
    As `memjax.ops.linear_scan`: all states h, [B, T, ...], in the dtype of `b`.

  Raises:
    ValueError: as `memjax.ops.linear_scan`; for a mesh axis that `mesh` lacks or that is
      named twice; if B, T or axis 2 is not divisible by the devices of its mesh axes.
  """
  # The op's own checks, on the whole arrays (tracing only; nothing runs).
  jax.eval_shape(functools.partial(ops.linear_scan, reverse=reverse,
                                   implementation=implementation), a, b, h0)
  if a.ndim < 3:
    feature_axis = None  # no axis to split
  batch_axes = tuple(batch_axes)
  _check_mesh(mesh, batch_axes, feature_axis, seq_axis, "feature_axis")
  _check_divisible("B", a.shape[0], mesh, batch_axes)
  _check_divisible("T", a.shape[1], mesh, (seq_axis,))
  if feature_axis is not None:
    _check_divisible("a.shape[2]", a.shape[2], mesh, mesh_axes(feature_axis))
  if h0 is None:
    h0 = jnp.zeros(a.shape[:1] + a.shape[2:], accumulation_dtype(a, b))
  return _sharded_scan(a, b, h0, mesh=mesh, reverse=reverse, implementation=implementation,
                       batch_axes=batch_axes, feature_axis=feature_axis, seq_axis=seq_axis)


def current_seq_sharding(rules: Rules = DEFAULT_RULES) -> Optional[dict]:
  """How the context splits the sequence, as arguments of the context-parallel ops.

  The context's mesh is the one `jax.sharding.get_abstract_mesh` sees: set by
  `jax.set_mesh(mesh)` or `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)` (the steps
  of `memjax.train` trace the model so). The deprecated `with mesh:` does not set it.

  Args:
    rules: the logical axis rules the activations are laid out by; their "seq", "batch"
      and "heads" give the mesh axes (a logical name without a rule is not split).

  Returns:
    None if there is no mesh, or the rules do not split "seq" over exactly one of its axes
    with more than one device (and not a manual axis of an enclosing `jax.shard_map`).
    Otherwise the keyword arguments `mesh` (the abstract mesh), `seq_axis`, `batch_axes`
    and `head_axis` of `context_parallel_linear_attention` and
    `context_parallel_delta_rule`; mesh axes the mesh lacks, or that are manual, are left
    out.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  known = dict(rules)
  # Inside a jax.shard_map, its manual axes are already split by hand.
  free = set(mesh.axis_names) - set(mesh.manual_axes)
  batch, seq, heads = (
      tuple(axis for axis in mesh_axes(entry) if axis in free)
      for entry in logical_to_spec(
          [name if name in known else None for name in ("batch", "seq", "heads")], rules))
  if len(seq) != 1 or mesh.shape[seq[0]] == 1:
    return None
  return dict(mesh=mesh, seq_axis=seq[0], batch_axes=batch, head_axis=heads or None)

