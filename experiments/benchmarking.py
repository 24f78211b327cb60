"""Timing and device-ceiling helpers shared by the `bench_*.py` scripts."""

import statistics
import time

import jax
import jax.numpy as jnp


def median_ms(fn, input_sets, *, repeats: int, calls_per_sample: int = 10) -> float:
  """Median time of one call of `fn`, in milliseconds.

  Each sample times `calls_per_sample` back-to-back calls, rotating through `input_sets`,
  and waits once at the end, so the host's dispatch and wait overheads are spread over many
  calls instead of landing on each sub-millisecond kernel.

  Args:
    fn: a jitted function.
    input_sets: argument tuples; rotating among several keeps caches from flattering.
    repeats: number of samples; the median is taken over them.
    calls_per_sample: calls timed together in one sample.

  Returns:
    Median milliseconds per call.
  """
  for args in input_sets:  # Compile and warm up.
    jax.block_until_ready(fn(*args))
  samples = []
  for r in range(repeats):
    start = time.perf_counter()
    out = [fn(*input_sets[(r + i) % len(input_sets)]) for i in range(calls_per_sample)]
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / calls_per_sample)
  return 1e3 * statistics.median(samples)


def copy_bandwidth(mib: int = 1024, repeats: int = 20) -> float:
  """Measured elementwise copy bandwidth of the default device, bytes/s (read + write)."""
  x = jnp.ones((mib * 1024 * 1024 // 4,), jnp.float32)
  ms = median_ms(jax.jit(lambda y: y * 1.0001), [(x,)], repeats=repeats, calls_per_sample=3)
  return 2 * x.nbytes / (ms * 1e-3)


def bf16_matmul_rate(n: int = 8192, repeats: int = 20) -> float:
  """Measured bf16 matmul rate of the default device on [n, n] x [n, n], FLOP/s."""
  x = jnp.ones((n, n), jnp.bfloat16) * 0.5
  ms = median_ms(jax.jit(lambda y: y @ y), [(x,)], repeats=repeats, calls_per_sample=3)
  return 2 * n ** 3 / (ms * 1e-3)
