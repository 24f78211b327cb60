"""Greedy generation with a DecoderLM's explicit decoding state."""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from memjax.models.decoder import DecoderLM


def greedy_generate(model: DecoderLM, params: Any, prompt: jax.Array, num_tokens: int,
                    max_length: Optional[int] = None) -> jax.Array:
  """Continues each prompt with its `num_tokens` most likely next tokens, one at a time.

  The prompt is one prefill call; every further token is one `decode` step of a
  `lax.scan`, all in one jitted computation.

  Args:
    model: the DecoderLM.
    params: its parameters (`variables["params"]`).
    prompt: int [B, T], T >= 1.
    num_tokens: tokens to generate, >= 1.
    max_length: the cache size of attention and Hopfield layers; default T + num_tokens.

  Returns:
    int32 [B, num_tokens]: the generated tokens.
  """
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be integers [B, T] with T >= 1, got {prompt.dtype} "
                     f"{tuple(prompt.shape)}")
  if not isinstance(num_tokens, int) or num_tokens < 1:
    raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
  batch_size, length = prompt.shape
  # The last generated token is returned, never fed back, so it needs no cache slot.
  needed = length + num_tokens - 1
  max_length = needed if max_length is None else max_length
  if max_length < needed:
    raise ValueError(f"max_length={max_length} cannot hold the prompt ({length} tokens) and "
                     f"{num_tokens - 1} fed-back tokens")

  @jax.jit
  def run(params, prompt):
    variables = {"params": params}
    decode = lambda tokens, state: model.apply(variables, tokens, state,
                                               method=DecoderLM.decode)
    state = model.apply(variables, batch_size, max_length, method=DecoderLM.init_state)
    logits, state = decode(prompt, state)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
      token, state = carry
      logits, state = decode(token[:, None], state)
      return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), state), token

    (last, _), fed = jax.lax.scan(step, (first, state), None, length=num_tokens - 1)
    return jnp.concatenate([fed.T, last[:, None]], axis=1)

  return run(params, prompt)
