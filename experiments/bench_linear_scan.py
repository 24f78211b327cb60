r"""Times memjax's linear_scan, xla (`lax.associative_scan`) against pallas (the kernel),
and prints a table.

  python experiments/bench_linear_scan.py                  # B=8 T=4096 C=2048, on a GPU
  python experiments/bench_linear_scan.py --batch=1 --seq_len=64 --channels=8 --repeats=2 \
      --copy_mib=1                                         # CPU smoke run (interpreted)

Each row: median time per call over `--repeats` samples of back-to-back calls (after
warm-up, inputs rotated among `--input_sets` sets), the ratio xla / pallas measured in the
same run, and the share of the memory roofline: the fewest bytes (`_bytes`) over the
measured copy bandwidth, divided by the time.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from memjax import ops

import benchmarking  # experiments/benchmarking.py, beside this script

_B = flags.DEFINE_integer("batch", 8, "B")
_T = flags.DEFINE_integer("seq_len", 4096, "T")
_C = flags.DEFINE_integer("channels", 2048, "C (trailing size)")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "input dtypes")
_IMPLS = flags.DEFINE_list("implementations", ["xla", "pallas"], "memjax implementations")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed runs per row")
_SETS = flags.DEFINE_integer("input_sets", 3, "input sets rotated between runs")
_COPY_MIB = flags.DEFINE_integer("copy_mib", 1024, "size of the copy-bandwidth probe")


def _inputs(key, dtype):
  shape = (_B.value, _T.value, _C.value)
  ka, kb, kh = jax.random.split(key, 3)
  a = jax.random.uniform(ka, shape, minval=0.9, maxval=1.0).astype(dtype)
  b = jax.random.normal(kb, shape).astype(dtype)
  h0 = jax.random.normal(kh, (_B.value, _C.value))
  return a, b, h0


def _bytes(mode, itemsize):
  """Fewest bytes: forward reads a, b and writes h; the backward reads a, g, h and writes
  da, db (h0 and dh0 are one step's worth and left out)."""
  per_array = _B.value * _T.value * _C.value * itemsize
  return per_array * (3 if mode == "forward" else 8)


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"B={_B.value} T={_T.value} C={_C.value}")
  bandwidth = benchmarking.copy_bandwidth(_COPY_MIB.value)
  print(f"measured copy bandwidth: {bandwidth / 1e12:.3f} TB/s")
  rows = []
  for dtype_name in _DTYPES.value:
    dtype = jnp.dtype(dtype_name)
    sets = [_inputs(jax.random.key(i + 1), dtype) for i in range(_SETS.value)]
    xla_ms = {}
    for impl in _IMPLS.value:
      run = lambda a, b, h0, impl=impl: ops.linear_scan(a, b, h0, implementation=impl)

      def fwd_bwd(a, b, h0, run=run):
        h, pullback = jax.vjp(run, a, b, h0)
        return pullback(h)  # the output as the cotangent: random, not zeros

      for mode, fn in (("forward", jax.jit(run)), ("forward+backward", jax.jit(fwd_bwd))):
        ms = benchmarking.median_ms(fn, sets, repeats=_REPEATS.value)
        if impl == "xla":
          xla_ms[mode] = ms
        ratio = f"{xla_ms[mode] / ms:.2f}x" if mode in xla_ms else ""
        roofline = 100 * _bytes(mode, dtype.itemsize) / bandwidth / (ms * 1e-3)
        rows.append(f"| {impl} | {dtype_name} | {mode} | {ms:.3f} | {ratio} | {roofline:.1f}% |")
        print(rows[-1], flush=True)
  print("\n| implementation | dtype | pass | median ms | xla / this | memory roofline |")
  print("|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
