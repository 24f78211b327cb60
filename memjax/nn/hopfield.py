"""Modern Hopfield layers: `Hopfield`, `HopfieldPooling` and `HopfieldLayer`.

They take hflayers' constructor arguments (ml-jku/hopfield-layers), with hflayers' defaults
and meanings, so that code ports line by line; the math runs in
`memjax.ops.hopfield_retrieval`. On top of hflayers: `normalizer=` ("softmax", "sparsemax",
"entmax" with optionally learnable `alpha`, "softmax1"), `scaling_trainable`, and the fast
path of the op (`jax.nn.dot_product_attention` / key blocks) for one-step softmax layers.

Where the behaviour differs from hflayers, and why:

* Inputs are always batch first, [B, N, D] (hflayers' default `batch_first=True`); the
  argument is gone because JAX has no sequence-first convention to serve.
* Stopping (`update_steps_eps`) is decided per batch element and head, not per head over
  the whole batch, so one example never changes the result of another.
* `concat_bias_pattern=True` appends the learned bias pattern (hflayers' condition for it is
  never true, so there it has no effect); the value bias has the pattern size, not the
  Hopfield size, so that it fits when `pattern_size` differs from `hidden_size`.
* Input sizes left at None are taken from the input (Flax infers shapes at `init`).
* `trainable=False` / `lookup_targets_as_trainable=False` keep the weights in `params` but
  stop their gradient (Flax has no `requires_grad`); an optimizer's weight decay still
  sees them.
* A stored pattern row that is fully masked retrieves zeros instead of NaN.
* With `update_steps_max=None` the gradient is the implicit one at the fixed point (see
  `memjax.ops.hopfield`), not backpropagation through every step.

Logical axes of the parameters: the projections into heads [D, H * K] ("embed", "heads"),
the output projection [H * V, D_out] ("heads", "embed"), per-head vectors and bias patterns
("heads", ...), the norms of the inputs ("embed",) and of each head's Hopfield space (None,),
the learned patterns [1, quantity, D] (None, None, "embed").
"""

import math
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.nn import partitioning
from memjax.ops import hopfield as hopfield_ops

Input = Union[jax.Array, Tuple[jax.Array, jax.Array, jax.Array]]

_INIT = nn.initializers.normal(0.02)  # hflayers initialises every weight with N(0, 0.02).


def _param(module: nn.Module, name: str, init, shape, names):
  """`module.param` with logical axis names (see `memjax.nn.partitioning`)."""
  return module.param(name, partitioning.partitioned(init, names), shape)


def _activation(name: Optional[str]):
  """hflayers looks the activation up in `torch`; here in `jax.nn`, then `jax.numpy`."""
  if name is None:
    return None
  fn = getattr(jax.nn, name, None) or getattr(jnp, name, None)
  if fn is None:
    raise ValueError(f"association_activation {name!r} is neither in jax.nn nor jax.numpy")
  return fn


def _check_patterns(name: str, x: jax.Array) -> None:
  if x.ndim != 3:
    raise ValueError(f"{name} must have 3 dims [B, N, D], got shape {tuple(x.shape)}")


class Hopfield(nn.Module):
  """Multi-head modern Hopfield association; hflayers' `Hopfield`.

  Attributes (hflayers' names and defaults):
    input_size: depth of the state patterns (None: from the input).
    hidden_size: depth of the association (Hopfield) space per head; default
      `input_size // num_heads`.
    output_size: depth of the output projection; default `input_size`.
    pattern_size: depth of the projected patterns per head; default `hidden_size`.
    num_heads: number of parallel association heads.
    scaling: beta, a float or one per head; default `1 / sqrt(hidden_size)`, or 1 when
      everything is static (pure retrieval).
    update_steps_max: 0 = one update; n = up to n more; None or negative = until
      convergence; or one int per head.
    update_steps_eps: a head stops once its association changes by at most this much.
    normalize_{stored_pattern, state_pattern, pattern_projection}[_affine, _eps]: layer norm
      of the raw inputs (default on, affine).
    normalize_hopfield_space[_affine, _eps]: layer norm of the projected state and stored
      patterns per head (default off).
    stored_pattern_as_static, state_pattern_as_static, pattern_projection_as_static: use the
      input as it is (replicated over heads) instead of projecting it.
    pattern_projection_as_connected: the pattern projection goes through the stored
      patterns' projection first.
    stored_pattern_size, pattern_projection_size: depth of those inputs; default
      `input_size`.
    association_activation: name of a function applied to the output (e.g. "tanh").
    dropout: dropout on the association (active when `deterministic=False`).
    input_bias: biases in the input and output projections.
    concat_bias_pattern: append a learned bias pattern to the stored patterns and
      projections.
    add_zero_association: append a zero pattern to the stored patterns and projections.
    disable_out_projection: return the heads' retrievals concatenated, unprojected.

  memjax additions:
    normalizer: "softmax" (default), "sparsemax", "entmax" or "softmax1".
    alpha: entmax's alpha in (1, 2] (initial value when trainable).
    alpha_trainable: learn one alpha per head, kept in (1, 2) by a sigmoid.
    scaling_trainable: learn one beta per head, initialised from `scaling`.
    key_block_size, implementation: passed to `memjax.ops.hopfield_retrieval`.
  """
  input_size: Optional[int] = None
  hidden_size: Optional[int] = None
  output_size: Optional[int] = None
  pattern_size: Optional[int] = None
  num_heads: int = 1
  scaling: Optional[Union[float, Sequence[float]]] = None
  update_steps_max: Optional[Union[int, Sequence[int]]] = 0
  update_steps_eps: Union[float, Sequence[float]] = 1e-4
  normalize_stored_pattern: bool = True
  normalize_stored_pattern_affine: bool = True
  normalize_stored_pattern_eps: float = 1e-5
  normalize_state_pattern: bool = True
  normalize_state_pattern_affine: bool = True
  normalize_state_pattern_eps: float = 1e-5
  normalize_pattern_projection: bool = True
  normalize_pattern_projection_affine: bool = True
  normalize_pattern_projection_eps: float = 1e-5
  normalize_hopfield_space: bool = False
  normalize_hopfield_space_affine: bool = False
  normalize_hopfield_space_eps: float = 1e-5
  stored_pattern_as_static: bool = False
  state_pattern_as_static: bool = False
  pattern_projection_as_static: bool = False
  pattern_projection_as_connected: bool = False
  stored_pattern_size: Optional[int] = None
  pattern_projection_size: Optional[int] = None
  association_activation: Optional[str] = None
  dropout: float = 0.0
  input_bias: bool = True
  concat_bias_pattern: bool = False
  add_zero_association: bool = False
  disable_out_projection: bool = False
  normalizer: str = "softmax"
  alpha: float = 1.5
  alpha_trainable: bool = False
  scaling_trainable: bool = False
  key_block_size: Optional[int] = 1024
  implementation: Optional[str] = None

  @property
  def static_execution(self) -> bool:
    """Pure retrieval: no parameter touches the patterns (hflayers' static execution)."""
    return (self.stored_pattern_as_static and self.state_pattern_as_static
            and self.pattern_projection_as_static and not self.pattern_projection_as_connected
            and not self.normalize_hopfield_space and self.disable_out_projection)

  @nn.compact
  def __call__(self, input: Input, stored_pattern_padding_mask: Optional[jax.Array] = None,
               association_mask: Optional[jax.Array] = None, *, deterministic: bool = True,
               return_association: bool = False):
    """Hopfield association of the input.

    Args:
      input: one array [B, N, D] (self-association) or a tuple `(stored_pattern [B, S, Ds],
        state_pattern [B, L, D], pattern_projection [B, S, Dv])`, hflayers' order.
      stored_pattern_padding_mask: None or bool [B, S]; True marks padding.
      association_mask: None, [L, S] or [B, H, L, S]; bool True blocks, float is added.
      deterministic: no dropout.
      return_association: also return the association [B, H, L, S] (before dropout).

    Returns:
      The output [B, L, output_size] (or [B, L, H * pattern_size] without the output
      projection), and the association if asked for.
    """
    if isinstance(input, (tuple, list)):
      if len(input) != 3:
        raise ValueError(
            "input must be one array or a tuple (stored_pattern, state_pattern, "
            f"pattern_projection), got a tuple of {len(input)}")
      stored, state, projection = input
    else:
      stored = state = projection = input
    return self._associate(stored, state, projection, stored_pattern_padding_mask,
                           association_mask, deterministic, return_association)

  def get_association_matrix(self, input: Input, stored_pattern_padding_mask=None,
                             association_mask=None) -> jax.Array:
    """The association [B, H, L, S] (gradient stopped), for `apply(..., method=...)`."""
    _, p = self(input, stored_pattern_padding_mask, association_mask, return_association=True)
    return jax.lax.stop_gradient(p)

  def _sizes(self, stored, state, projection):
    """(input_size, head_dim, pattern_dim) from the attributes and the inputs."""
    for name, x in (("stored_pattern", stored), ("state_pattern", state),
                    ("pattern_projection", projection)):
      _check_patterns(name, x)
    b, s = stored.shape[:2]
    if state.shape[0] != b or projection.shape[:2] != (b, s):
      raise ValueError(
          f"stored_pattern [B, S, .] {tuple(stored.shape)}, state_pattern [B, L, .] "
          f"{tuple(state.shape)} and pattern_projection [B, S, .] {tuple(projection.shape)} "
          "must agree in B (and S)")
    h = self.num_heads
    if self.state_pattern_as_static and self.stored_pattern_as_static:
      if state.shape[-1] != stored.shape[-1]:
        raise ValueError(
            f"static state_pattern {tuple(state.shape)} and stored_pattern "
            f"{tuple(stored.shape)} need the same depth")
      head_dim = state.shape[-1]
      input_size = self.input_size or head_dim
    else:
      input_size = self.input_size or (
          h * (self.hidden_size or state.shape[-1]) if self.state_pattern_as_static
          else state.shape[-1])
      head_dim = self.hidden_size or input_size // h
      if self.hidden_size is None and head_dim * h != input_size:
        raise ValueError(f"input_size {input_size} must be divisible by num_heads {h}")
      want = head_dim if self.state_pattern_as_static else input_size
      if state.shape[-1] != want:
        raise ValueError(f"state_pattern must have depth {want}, got shape {tuple(state.shape)}")
      want = head_dim if self.stored_pattern_as_static else (
          self.stored_pattern_size or input_size)
      if stored.shape[-1] != want:
        raise ValueError(
            f"stored_pattern must have depth {want}, got shape {tuple(stored.shape)}")
    if not self.pattern_projection_as_static or self.pattern_projection_as_connected:
      want = (self.stored_pattern_size or input_size) if self.pattern_projection_as_connected \
          else (self.pattern_projection_size or input_size)
      if projection.shape[-1] != want:
        raise ValueError(
            f"pattern_projection must have depth {want}, got shape {tuple(projection.shape)}")
    pattern_dim = self.pattern_size or head_dim
    if self.pattern_projection_as_connected and pattern_dim != head_dim:
      raise ValueError("pattern_projection_as_connected needs pattern_size == hidden_size")
    return input_size, head_dim, pattern_dim

  def _associate(self, stored, state, projection, padding_mask, association_mask,
                 deterministic, return_association):
    """The whole layer on [B, S, Ds], [B, L, D], [B, S, Dv] inputs; see `__call__`."""
    input_size, head_dim, pattern_dim = self._sizes(stored, state, projection)
    h = self.num_heads
    b, l = state.shape[:2]

    def layer_norm(x, on, affine, eps, name):
      if not on:
        return x
      return partitioning.layer_norm(("embed",), epsilon=eps, use_scale=affine,
                                     use_bias=affine, name=name)(x)

    stored = layer_norm(stored, self.normalize_stored_pattern,
                        self.normalize_stored_pattern_affine,
                        self.normalize_stored_pattern_eps, "norm_stored_pattern")
    state = layer_norm(state, self.normalize_state_pattern, self.normalize_state_pattern_affine,
                       self.normalize_state_pattern_eps, "norm_state_pattern")
    projection = layer_norm(projection, self.normalize_pattern_projection,
                            self.normalize_pattern_projection_affine,
                            self.normalize_pattern_projection_eps, "norm_pattern_projection")

    dense = lambda n, name: partitioning.dense(n, ("embed", "heads"), use_bias=self.input_bias,
                                               kernel_init=_INIT, name=name)
    heads = lambda x, d: x.reshape(x.shape[:2] + (h, d))
    replicate = lambda x: jnp.broadcast_to(x[:, :, None, :], x.shape[:2] + (h, x.shape[-1]))

    q = replicate(state) if self.state_pattern_as_static else heads(
        dense(h * head_dim, "state_pattern_proj")(state), head_dim)
    v_in = projection
    if self.stored_pattern_as_static:
      k = replicate(stored)
    else:
      stored_proj = dense(h * head_dim, "stored_pattern_proj")
      k = heads(stored_proj(stored), head_dim)
      if self.pattern_projection_as_connected:
        v_in = stored_proj(projection)
    if not self.pattern_projection_as_static:
      v = heads(dense(h * pattern_dim, "pattern_projection_proj")(v_in), pattern_dim)
    elif v_in is not projection:  # Connected: already split into heads of the stored size.
      v = heads(v_in, head_dim)
    else:
      v = replicate(projection)

    if self.normalize_hopfield_space:
      # One layer norm, shared by state and stored patterns, over each head's depth.
      norm = partitioning.layer_norm((None,), epsilon=self.normalize_hopfield_space_eps,
                                     use_scale=self.normalize_hopfield_space_affine,
                                     use_bias=self.normalize_hopfield_space_affine,
                                     name="norm_hopfield_space")
      q, k = norm(q), norm(k)

    extra = []
    if self.concat_bias_pattern:
      if self.stored_pattern_as_static or self.pattern_projection_as_static:
        raise ValueError("concat_bias_pattern needs projected (not static) stored patterns "
                         "and pattern projections")
      bias_k = _param(self, "bias_stored_pattern", _INIT, (h, head_dim), ("heads", None))
      bias_v = _param(self, "bias_pattern_projection", _INIT, (h, pattern_dim),
                      ("heads", None))
      extra.append((bias_k, bias_v))
    if self.add_zero_association:
      extra.append((jnp.zeros((h, k.shape[-1])), jnp.zeros((h, v.shape[-1]))))
    for row_k, row_v in extra:
      k = jnp.concatenate([k, jnp.broadcast_to(row_k.astype(k.dtype), (b, 1) + row_k.shape)], 1)
      v = jnp.concatenate([v, jnp.broadcast_to(row_v.astype(v.dtype), (b, 1) + row_v.shape)], 1)
    padding_mask, association_mask = self._extend_masks(
        padding_mask, association_mask, len(extra), (b, h, l, stored.shape[1]))

    default_scaling = 1.0 if self.static_execution else 1.0 / math.sqrt(head_dim)
    scaling = default_scaling if self.scaling is None else self.scaling
    if self.scaling_trainable:
      scaling = _param(self, "scaling", lambda _, shape: jnp.broadcast_to(
          jnp.asarray(scaling, jnp.float32), shape), (h,), ("heads",))
    alpha = self.alpha
    if self.alpha_trainable:
      if not 1.0 < self.alpha < 2.0:
        raise ValueError(f"a trainable alpha starts inside (1, 2), got {self.alpha}")
      logit = math.log((self.alpha - 1.0) / (2.0 - self.alpha))
      alpha = 1.0 + jax.nn.sigmoid(_param(self, "alpha_logit", nn.initializers.constant(logit),
                                          (h,), ("heads",)))

    use_dropout = self.dropout > 0.0 and not deterministic
    result = hopfield_ops.hopfield_retrieval(
        q, k, v, scaling=scaling, update_steps_max=self.update_steps_max,
        update_steps_eps=self.update_steps_eps, normalizer=self.normalizer, alpha=alpha,
        stored_pattern_padding_mask=padding_mask, association_mask=association_mask,
        dropout_rate=self.dropout if use_dropout else 0.0,
        dropout_key=self.make_rng("dropout") if use_dropout else None,
        return_association=return_association, key_block_size=self.key_block_size,
        implementation=self.implementation)
    out, p = result if return_association else (result, None)
    out = out.reshape(b, l, h * out.shape[-1])
    if not self.disable_out_projection:
      out = partitioning.dense(self.output_size or input_size, ("heads", "embed"),
                               use_bias=self.input_bias, kernel_init=_INIT,
                               name="out_proj")(out)
    activation = _activation(self.association_activation)
    if activation is not None:
      out = activation(out)
    return (out, p) if return_association else out

  @staticmethod
  def _extend_masks(padding_mask, association_mask, extra, shape):
    """Lets the appended bias / zero patterns be attended by every state pattern."""
    if extra == 0:
      return padding_mask, association_mask
    b, h, l, s = shape
    # Check against the user's S first, so that errors name the shapes they passed.
    hopfield_ops.hopfield_masks(padding_mask, association_mask, shape)
    if padding_mask is not None:
      padding_mask = jnp.pad(padding_mask, [(0, 0), (0, extra)], constant_values=False)
    if association_mask is not None:
      pad = [(0, 0)] * (association_mask.ndim - 1) + [(0, extra)]
      association_mask = jnp.pad(association_mask, pad,
                                 constant_values=False if association_mask.dtype == bool else 0)
    return padding_mask, association_mask


class HopfieldPooling(Hopfield):
  """Hopfield pooling: `quantity` learned state patterns query the input; hflayers'
  `HopfieldPooling`.

  Attributes: those of `Hopfield`, plus
    quantity: number of learned state patterns (N(0, 0.02) initialised).
    trainable: whether they learn (False stops their gradient).
  """
  quantity: int = 1
  trainable: bool = True

  @nn.compact
  def __call__(self, input, stored_pattern_padding_mask: Optional[jax.Array] = None,
               association_mask: Optional[jax.Array] = None, *, deterministic: bool = True,
               return_association: bool = False):
    """Pools [B, S, D] (or a tuple `(stored_pattern, pattern_projection)`) to
    [B, quantity * output_size]; the association is [B, H, quantity, S]."""
    if isinstance(input, (tuple, list)):
      if len(input) != 2:
        raise ValueError("input must be one array or a tuple (stored_pattern, "
                         f"pattern_projection), got a tuple of {len(input)}")
      stored, projection = input
    else:
      stored = projection = input
    _check_patterns("stored_pattern", stored)
    size = (self.hidden_size if self.state_pattern_as_static else self.input_size) or (
        self.input_size or stored.shape[-1])
    # A static state pattern has the depth of one head, which is never split.
    depth_axis = None if self.state_pattern_as_static else "embed"
    weights = _param(self, "pooling_weights", _INIT, (1, self.quantity, size),
                     (None, None, depth_axis))
    if not self.trainable:
      weights = jax.lax.stop_gradient(weights)
    state = jnp.broadcast_to(weights, (stored.shape[0],) + weights.shape[1:])
    out = self._associate(stored, state, projection, stored_pattern_padding_mask,
                          association_mask, deterministic, return_association)
    flat = lambda y: y.reshape(y.shape[0], -1)
    return (flat(out[0]), out[1]) if return_association else flat(out)


class HopfieldLayer(Hopfield):
  """Hopfield lookup: the input queries `quantity` learned stored patterns; hflayers'
  `HopfieldLayer`.

  Attributes: those of `Hopfield`, plus
    quantity: number of learned stored patterns (N(0, 0.02) initialised).
    trainable: whether the stored patterns (lookup weights) learn.
    lookup_weights_as_separated: separate learned pattern projections (targets) instead of
      reusing the stored patterns.
    lookup_targets_as_trainable: whether those targets learn.
  """
  quantity: int = 1
  trainable: bool = True
  lookup_weights_as_separated: bool = False
  lookup_targets_as_trainable: bool = True

  @nn.compact
  def __call__(self, input: jax.Array, stored_pattern_padding_mask: Optional[jax.Array] = None,
               association_mask: Optional[jax.Array] = None, *, deterministic: bool = True,
               return_association: bool = False):
    """Looks up [B, L, D] in the learned patterns: [B, L, output_size]; the association is
    [B, H, L, quantity]."""
    _check_patterns("input", input)
    input_size = self.input_size or input.shape[-1]
    size = self.hidden_size if self.stored_pattern_as_static else (
        self.stored_pattern_size or input_size)
    if size is None:
      raise ValueError("stored_pattern_as_static needs hidden_size for the lookup weights")

    def learned(name, depth, trainable):
      # Static stored patterns have the depth of one head, which is never split.
      depth_axis = None if self.stored_pattern_as_static else "embed"
      w = _param(self, name, _INIT, (1, self.quantity, depth), (None, None, depth_axis))
      w = w if trainable else jax.lax.stop_gradient(w)
      return jnp.broadcast_to(w, (input.shape[0],) + w.shape[1:])

    stored = learned("lookup_weights", size, self.trainable)
    projection = stored
    if self.lookup_weights_as_separated:
      projection = learned("target_weights", self.pattern_projection_size or size,
                           self.lookup_targets_as_trainable)
    return self._associate(stored, input, projection, stored_pattern_padding_mask,
                           association_mask, deterministic, return_association)
