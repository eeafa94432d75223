"""Training past one device: the device mesh, how state and batches lie on it, and several processes.

One mesh axis, ``data`` (``--mesh data=N``): the global batch is split along it; parameters and optimizer state are
replicated (data parallel) or, with ``--fsdp``, every leaf is split along ``data`` on its largest axis that divides
evenly (nanodo's rule), and XLA's SPMD partitioner inserts the all-gathers of weights and reduce-scatters of
gradients. The step stays one jitted program with explicit in/out shardings and donated state. Its metrics come out
replicated: the program itself reduces them over every device and process, so each process reads the same global
numbers and the loop's NaN checks, schedules and iteration/FLOPs budgets agree everywhere.

Several processes (one per host, or per GPU): ``init_distributed`` connects them (SLURM, or ``MGR_COORDINATOR``,
``MGR_NUM_PROCESSES``, ``MGR_PROCESS_ID``) before JAX touches a device; every process computes the same global
batch description but places only the rows its own devices hold; only process 0 writes the run directory (orbax
checkpoints are the exception: each process writes the shards it owns, into the same directory).

A mesh of one device is ``None`` throughout (``make_mesh``), so the single-device path is the old code exactly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mgr.errors import UserError
from mgr.flops import FlopsRecord, compile_and_count

AXIS = "data"
ENV = ("MGR_COORDINATOR", "MGR_NUM_PROCESSES", "MGR_PROCESS_ID")


# --- processes -------------------------------------------------------------------------------------------------

def init_distributed(environ: dict[str, str] | None = None) -> bool:
    """Join a multi-process run when a launcher started this process as one of several; True if it did.
    Must run before anything creates a JAX backend. ``MGR_*`` variables win over SLURM's."""
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    given = [name for name in ENV if env.get(name)]
    if given:
        if len(given) != len(ENV):
            raise UserError(f"multi-process run: set all of {', '.join(ENV)} (missing "
                            f"{', '.join(n for n in ENV if n not in given)})")
        try:
            n, rank = int(env["MGR_NUM_PROCESSES"]), int(env["MGR_PROCESS_ID"])
        except ValueError:
            raise UserError("MGR_NUM_PROCESSES and MGR_PROCESS_ID must be whole numbers") from None
        if not 0 <= rank < n:
            raise UserError(f"MGR_PROCESS_ID={rank} must lie in [0, MGR_NUM_PROCESSES={n})")
        if n == 1:
            return False
        jax.distributed.initialize(coordinator_address=env["MGR_COORDINATOR"], num_processes=n, process_id=rank)
        return True
    # srun sets these for every task of a step; JAX reads the coordinator, count and rank from SLURM itself.
    if int(env.get("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env:
        jax.distributed.initialize()
        return True
    return False


def is_writer() -> bool:
    """Process 0 writes the run directory; the others compute the same run silently."""
    return jax.process_index() == 0


def agree(text: str, max_len: int = 512) -> str:
    """Process 0's ``text`` on every process (e.g. a run id taken from the clock, which processes read apart)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils
    data = text.encode()[:max_len]
    buf = np.zeros(max_len + 1, np.int32)
    buf[0], buf[1:len(data) + 1] = len(data), list(data)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(buf[1:1 + int(buf[0])].astype(np.uint8)).decode(errors="replace")


class ScratchWriter:
    """The run writer of processes other than 0: same paths as process 0's (checkpoints go there), nothing
    written, and plots a demo draws land in a scratch directory removed on close."""

    def __init__(self, root: str | os.PathLike, kind: str, topic: str, run_id: str):
        self.run_dir = Path(root) / kind / topic / run_id
        self.plots_dir = Path(tempfile.mkdtemp(prefix="mgr-plots-"))

    def log(self, record: dict[str, Any]) -> None:
        pass

    def write_json(self, name: str, obj: Any) -> None:
        pass

    def write_text(self, name: str, text: str) -> None:
        pass

    def plot_path(self, name: str) -> Path:
        return self.plots_dir / name

    def close(self) -> None:
        shutil.rmtree(self.plots_dir, ignore_errors=True)


# --- the mesh --------------------------------------------------------------------------------------------------

def parse_mesh(text: str) -> int:
    """``--mesh data=N`` -> N (argparse type: a bad value is one error line)."""
    name, _, value = text.partition("=")
    if name.strip() != AXIS or not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected {AXIS}=N with N >= 1 (the only mesh axis is {AXIS!r}), "
                                         f"got {text!r}")
    return int(value)


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split along ``data`` the largest axis that ``n`` divides (the first of equals); replicate if none does."""
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] >= n and shape[axis] % n == 0:
            return P(*(AXIS if a == axis else None for a in range(len(shape))))
    return P()


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), tree)


class DeviceMesh:
    """A ``data`` mesh of more than one device, and the layout of a run's state and batches on it."""

    def __init__(self, mesh: Mesh, fsdp: bool):
        self.mesh, self.fsdp = mesh, fsdp
        self.devices = mesh.size
        self.replicated = NamedSharding(mesh, P())

    def state_shardings(self, state: Any) -> Any:
        if not self.fsdp:
            return jax.tree.map(lambda _: self.replicated, state)
        return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(np.shape(x), self.devices)), state)

    def along(self, axis: int) -> NamedSharding:
        """Split along ``data`` on ``axis`` (the batch axis), replicated on the others."""
        return NamedSharding(self.mesh, P(*(None,) * axis, AXIS))

    def batch_shardings(self, batch: Any, axis: int = 0) -> Any:
        def one(x):
            shape = np.shape(x)
            if len(shape) <= axis or shape[axis] % self.devices:
                raise UserError(f"a batch array of shape {shape} does not split over the mesh's {AXIS}="
                                f"{self.devices} devices along axis {axis}; use a batch size divisible by "
                                f"{self.devices}")
            return self.along(axis)
        return jax.tree.map(one, batch)

    def require_divisible(self, value: int, flag: str) -> None:
        if value % self.devices:
            raise UserError(f"{flag} {value} is the global batch and must divide by the mesh's {AXIS}="
                            f"{self.devices}")

    def put(self, tree: Any, shardings: Any) -> Any:
        """Global host or device values onto the mesh; with several processes each places only its own part."""
        if jax.process_count() == 1:
            return jax.device_put(tree, shardings)
        return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x), np.shape(x)),
                            tree, shardings)

    def put_state(self, state: Any) -> Any:
        """Note: the result may share the first device's buffers with ``state`` (so donate only a copy)."""
        return self.put(state, self.state_shardings(state))

    def put_batch(self, batch: Any, axis: int = 0) -> Any:
        return self.put(batch, self.batch_shardings(batch, axis))

    def process_rows(self, rows: int) -> slice:
        """The rows of a global batch of ``rows`` that this process's devices hold (all of them, one process);
        contiguous, as the mesh orders devices by process."""
        held = [idx[0] for idx in self.along(0).addressable_devices_indices_map((rows,)).values()]
        return slice(min(s.start or 0 for s in held), max(rows if s.stop is None else s.stop for s in held))

    def compile_and_count(self, fn: Callable, state: Any, batch: Any) -> tuple[FlopsRecord, Any]:
        """``fn`` as one SPMD program: state in and out with the mesh's shardings (donated), batch split along
        ``data``, metrics replicated. Its FLOPs are global: mgr.flops prices the partitioned program per device
        and multiplies by the device count (``record.flops_per_device`` is one device's share)."""
        state_sh = self.state_shardings(state)
        jitted = jax.jit(fn, in_shardings=(state_sh, self.batch_shardings(batch)),
                         out_shardings=(state_sh, self.replicated), donate_argnums=0)
        # Traced from shapes alone: the shardings are explicit, and host values may not carry any across processes.
        abstract = _abstract((state, batch))
        record, exe = compile_and_count(jitted, *abstract)
        return record, exe


def make_mesh(data: int | None, fsdp: bool) -> DeviceMesh | None:
    """The run's mesh over the first ``data`` devices (default: all of them, across processes); None for one."""
    devices = jax.devices()
    n = len(devices) if data is None else data
    if n > len(devices):
        raise UserError(f"--mesh {AXIS}={n}: only {len(devices)} {devices[0].platform} device(s) are visible")
    if jax.process_count() > 1 and n != len(devices):
        raise UserError(f"--mesh {AXIS}={n}: a run of {jax.process_count()} processes uses all {len(devices)} "
                        f"devices")
    if n == 1:
        return None
    return DeviceMesh(Mesh(np.array(devices[:n]), (AXIS,)), fsdp)


def describe(mesh: DeviceMesh | None) -> dict[str, Any]:
    """What the summary records about the mesh."""
    devices = 1 if mesh is None else mesh.devices
    return {"axes": {AXIS: devices}, "devices": devices, "fsdp": bool(mesh and mesh.fsdp),
            "processes": jax.process_count(), "local_devices": min(devices, jax.local_device_count())}


def devices_of(mesh: DeviceMesh | None) -> int:
    return 1 if mesh is None else mesh.devices
