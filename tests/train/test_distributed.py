"""The argument checks of `memjax.train.distributed.initialize`, and its one-process paths."""

import jax
import pytest

from memjax import sharding
from memjax.train import distributed
from memjax.train import sharded


def test_nothing_given_initialises_nothing(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  assert distributed.initialize() is False
  assert not calls


def test_all_three_or_auto_initialise(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(a))
  assert distributed.initialize("localhost:1234", 2, 1) is True
  assert distributed.initialize(auto=True) is True
  assert calls == [("localhost:1234", 2, 1), ()]


@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinator_address="localhost:1234"),
     r"missing \['num_processes', 'process_id'\]"),
    (dict(num_processes=2, process_id=0), r"missing \['coordinator_address'\]"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2),
     r"process_id=2, num_processes=2"),
    (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0),
     r"process_id=0, num_processes=0"),
    (dict(num_processes=2, auto=True), r"auto=True .* got also \{'num_processes': 2\}"),
])
def test_bad_arguments_raise(monkeypatch, kwargs, match):
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *a, **k: pytest.fail("must not initialise"))
  with pytest.raises(ValueError, match=match):
    distributed.initialize(**kwargs)


def test_one_process_reads_the_whole_batch_as_numpy():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  shapes = {"inputs": jax.ShapeDtypeStruct((8, 16), "int32")}
  shardings = sharded.batch_shardings(shapes, mesh, sharding.DEFAULT_RULES)
  assert distributed.batch_share(shardings["inputs"], (8, 16)) == (0, 1)
  batch = {"inputs": object()}
  assert distributed.global_batch(batch, shardings, 8) is batch


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


class _Sharding:
  """Stands in for a sharding over the devices of several processes: rows by device."""

  def __init__(self, rows_by_device):
    self._map = {_Device(process): (slice(start, stop), slice(None))
                 for process, start, stop in rows_by_device}

  def devices_indices_map(self, shape):
    del shape
    return self._map


@pytest.mark.parametrize("process, rows_by_device, want", [
    # Two processes of two devices, rows in process order: halves.
    (0, [(0, 0, 2), (0, 2, 4), (1, 4, 6), (1, 6, 8)], (0, 2)),
    (1, [(0, 0, 2), (0, 2, 4), (1, 4, 6), (1, 6, 8)], (1, 2)),
    # Rows replicated over the processes (the mesh splits something else across them).
    (1, [(0, 0, 4), (0, 4, 8), (1, 0, 4), (1, 4, 8)], (0, 1)),
    # A device order that gives process 1 the first block: process 0 reads the second.
    (0, [(1, 0, 4), (0, 4, 8)], (1, 2)),
    # Four processes, two of them per block of rows.
    (3, [(0, 0, 4), (1, 0, 4), (2, 4, 8), (3, 4, 8)], (1, 2)),
])
def test_batch_share_of_each_process(monkeypatch, process, rows_by_device, want):
  monkeypatch.setattr(jax, "process_index", lambda: process)
  assert distributed.batch_share(_Sharding(rows_by_device), (8, 16)) == want


@pytest.mark.parametrize("rows_by_device", [
    # Process 0's devices hold rows of process 1's half.
    [(0, 0, 2), (1, 2, 4), (0, 4, 6), (1, 6, 8)],
    # Blocks of unequal size.
    [(0, 0, 2), (1, 2, 8)],
])
def test_batch_rows_on_another_process_raise(monkeypatch, rows_by_device):
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with pytest.raises(ValueError, match=r"each process must hold one of equal, contiguous "
                                       r"blocks of rows"):
    distributed.batch_share(_Sharding(rows_by_device), (8, 16))
