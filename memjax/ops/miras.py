"""Miras choices of the neural memory: the attentional-bias loss and the retention.

"It's All Connected" (Miras, arXiv 2504.13173) writes a test-time memory as four choices:
architecture, attentional bias (the per-token loss), retention (how the past is kept) and
the learning algorithm. This file holds the second and third for `memjax.ops.neural_memory`:

Losses, given to the update as their gradient with respect to the memory's prediction
`p = M(k)` (the error signal, `e = p - v`):

* ``"l2"``: `||p - v||^2` (Titans), gradient `2 e`.
* ``"lp"``: `||p - v||_p^p` (Moneta, p = 3), gradient `p Sign(e) |e|^(p-1)` with the paper's
  smooth approximations `Sign(x) ~ tanh(a x)` and `|x| ~ sqrt(x^2 + eps)`.
* ``"huber"``: Yaad's Huber rule with a data-dependent threshold `delta_t` per token: the l2
  gradient `2 e` while `||e||_2 <= delta_t`, else `delta_t Sign(e)` (the l1 gradient scaled
  by `delta_t`).

Retentions. The linear part of every retention is the forget gate `alpha_t`, a weight decay
of the memory. The non-linear ones keep an accumulator `A` that follows the linear update and
map it to the memory weights, `W = phi(A)` (mirror descent):

* ``"l2"``: `phi(A) = A` (Titans, Yaad; the state then keeps no separate accumulator).
* ``"lq"``: `phi(A) = A / ||A||_q^(q-2)` (Moneta, q = 4), per layer matrix.
* ``"kl"``: `phi(A) = c softmax(A)` over each row's outputs (Memora): with `A` the logits,
  `A_t = (1 - alpha_t) A_{t-1} - theta_t grad` is Memora's
  `W_t = softmax((1 - alpha_t) log W_{t-1} - theta_t grad)` exactly, since a softmax ignores
  the per-row constant of `log W`.

As in the paper's parallel training, `phi` is applied at chunk boundaries only; inside a
chunk the weights follow the linear update (see `memjax.ops.titans`).
"""

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

LOSSES = ("l2", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")


@dataclasses.dataclass(frozen=True)
class MirasRule:
  """The loss and retention of a neural memory, with their constants.

  Attributes:
    loss: "l2", "lp" or "huber".
    retention: "l2", "lq" or "kl".
    p: exponent of the "lp" loss.
    q: exponent of the "lq" retention.
    sign_sharpness: `a` of the smooth `Sign(x) ~ tanh(a x)` of the "lp" loss.
    abs_eps: `eps` of the smooth `|x| ~ sqrt(x^2 + eps)` of the "lp" loss.
    kl_scale: total mass `c` of each row of the "kl" memory weights.
    norm_eps: floor of `||A||_q` in the "lq" map, so that `A = 0` maps to `W = 0`.
  """
  loss: str = "l2"
  retention: str = "l2"
  p: float = 3.0
  q: float = 4.0
  sign_sharpness: float = 10.0
  abs_eps: float = 1e-6
  kl_scale: float = 1.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
    if self.retention not in RETENTIONS:
      raise ValueError(f"retention must be one of {RETENTIONS}, got {self.retention!r}")

  @property
  def has_accumulator(self) -> bool:
    """Whether the weights are a non-linear map of a separately kept accumulator."""
    return self.retention != "l2"


# The named models of the Titans and Miras papers (momentum and forgetting come from the
# gates passed to the op: Moneta, Yaad and Memora use plain gradient descent, eta = 0).
PRESETS = {
    "titans": MirasRule(loss="l2", retention="l2"),
    "moneta": MirasRule(loss="lp", retention="lq", p=3.0, q=4.0),
    "yaad": MirasRule(loss="huber", retention="l2"),
    "memora": MirasRule(loss="l2", retention="kl"),
}


def resolve(rule: Union[str, MirasRule]) -> MirasRule:
  """A preset name or a `MirasRule` -> the `MirasRule`."""
  if isinstance(rule, MirasRule):
    return rule
  if rule not in PRESETS:
    raise ValueError(
        f"rule must be a MirasRule or one of the presets {tuple(PRESETS)}, got {rule!r}")
  return PRESETS[rule]


def error_signal(rule: MirasRule, prediction: jax.Array, target: jax.Array,
                 huber_delta=None) -> jax.Array:
  """Gradient of the per-token loss with respect to the memory's prediction.

  Args:
    rule: the Miras rule.
    prediction: `M(k)`, [..., C, V] float32.
    target: `v`, [..., C, V] float32.
    huber_delta: the "huber" threshold per token, [..., C]; unused by the other losses.

  Returns:
    `d loss / d prediction`, [..., C, V].
  """
  e = prediction - target
  if rule.loss == "l2":
    return 2.0 * e
  if rule.loss == "lp":
    smooth_abs = jnp.sqrt(jnp.square(e) + rule.abs_eps)
    return rule.p * jnp.tanh(rule.sign_sharpness * e) * smooth_abs ** (rule.p - 1.0)
  inside = jnp.linalg.norm(e, axis=-1, keepdims=True) <= huber_delta[..., None]
  return jnp.where(inside, 2.0 * e, huber_delta[..., None] * jnp.sign(e))


def retention_map(rule: MirasRule, accumulator: jax.Array) -> jax.Array:
  """`phi`: the memory weights of an accumulator, for the non-linear retentions.

  Args:
    rule: the Miras rule.
    accumulator: one layer's accumulator, [..., d_in, d_out] float32.

  Returns:
    The layer's weights, same shape.
  """
  if rule.retention == "l2":
    return accumulator
  if rule.retention == "lq":
    power_sum = jnp.sum(jnp.abs(accumulator) ** rule.q, axis=(-2, -1), keepdims=True)
    # The floor goes under the root: the root's derivative at 0 is infinite.
    norm = jnp.maximum(power_sum, rule.norm_eps ** rule.q) ** (1.0 / rule.q)
    return accumulator / norm ** (rule.q - 2.0)
  return rule.kl_scale * jax.nn.softmax(accumulator, axis=-1)
