"""Training on several hosts: starting `jax.distributed`, and each process's share of a batch.

Every process runs the same program on its own devices (multi-controller JAX). Each one
reads only the rows of every global batch that its devices hold (`batch_share`) and the
global `jax.Array` is assembled from the processes' parts (`global_batch`); with one
process, batches stay the numpy arrays the pipeline gives.
"""

from typing import Any, Mapping, Optional

import jax
import numpy as np


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    auto: bool = False,
) -> bool:
  """Starts `jax.distributed` if the arguments ask for it; call before touching devices.

  Either give all three of `coordinator_address`, `num_processes` and `process_id` (an
  explicit cluster, e.g. processes launched by hand on localhost), or `auto=True` and none
  of them (JAX detects the cluster: TPU pods, SLURM, Open MPI, ...), or nothing (one
  process, no initialisation).

  Args:
    coordinator_address: "host:port" of process 0's coordination service.
    num_processes: Number of processes P, >= 1.
    process_id: This process's id, in [0, P).
    auto: Let `jax.distributed.initialize()` detect the cluster.

  Returns:
    Whether `jax.distributed.initialize` was called.

  Raises:
    ValueError: If only some of the three are given, they are out of range, or they are
      given together with `auto`.
  """
  explicit = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  given = {name: value for name, value in explicit.items() if value is not None}
  if auto and given:
    raise ValueError(
        f"auto=True detects the cluster itself; got also {given}. Pass either auto or all "
        "of coordinator_address, num_processes and process_id.")
  if given and len(given) < len(explicit):
    missing = sorted(set(explicit) - set(given))
    raise ValueError(
        f"multi-process training needs all of coordinator_address, num_processes and "
        f"process_id; got {given}, missing {missing}.")
  if given:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
          f"process_id must be in [0, num_processes) and num_processes >= 1, got "
          f"process_id={process_id}, num_processes={num_processes}.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if auto:
    jax.distributed.initialize()
    return True
  return False


def batch_share(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
  """Which share of every global batch this process reads, for a batch sharding.

  The global batch of B rows is cut into S equal blocks of rows; this process's devices
  must hold exactly one of them, block s (several processes hold the same block when they
  are replicas along the batch, e.g. a mesh that splits only heads across processes;
  block s need not be process s's).
  `jax.make_mesh` orders devices process-major, so the batch axes of
  `memjax.sharding.make_mesh` (its outermost) give process p block p of P.

  Args:
    sharding: The sharding of a batch array, e.g. "inputs" [B, T].
    shape: Its global shape [B, ...].

  Returns:
    `(s, S)`, for `memjax.data.batched_dataset(..., process_index=s, process_count=S)`.

  Raises:
    ValueError: If this process's devices hold rows other than one such block (a mesh
      whose device order puts batch rows of one process on another's devices).
  """
  rows_by_process: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map(tuple(shape)).items():
    rows = range(*index[0].indices(shape[0]))
    rows_by_process.setdefault(device.process_index, set()).update(rows)
  blocks = sorted({(min(rows), max(rows) + 1) for rows in rows_by_process.values()})
  count = len(blocks)
  size = shape[0] // count
  expected = [(s * size, (s + 1) * size) for s in range(count)]
  mine = rows_by_process[jax.process_index()]
  if shape[0] % count or blocks != expected or any(
      len(rows) != size for rows in rows_by_process.values()):
    layout = {process: f"{min(rows)}..{max(rows)} ({len(rows)} rows)"
              for process, rows in sorted(rows_by_process.items())}
    raise ValueError(
        f"the batch sharding {sharding} puts the rows of a batch of shape {tuple(shape)} "
        f"on the processes' devices as {layout}; each process must hold one of equal, "
        "contiguous blocks of rows. Order the mesh's devices process-major (as "
        "jax.make_mesh does) with the batch axes outermost.")
  return blocks.index((min(mine), max(mine) + 1)), count


def global_batch(local_batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any],
                 global_rows: int) -> Mapping[str, Any]:
  """The global batch, from this process's rows of it (see `batch_share`).

  Args:
    local_batch: This process's rows, {name: [B/S, ...]}.
    shardings: The sharding of each array of the global batch, by name.
    global_rows: B, the rows of the global batch.

  Returns:
    `local_batch` itself with one process (jit places it, as always); otherwise
    {name: jax.Array [B, ...]} laid out by `shardings`.
  """
  if jax.process_count() == 1:
    return local_batch
  return {
      name: jax.make_array_from_process_local_data(
          shardings[name], array, (global_rows,) + array.shape[1:])
      for name, array in local_batch.items()
  }
