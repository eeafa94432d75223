"""Orbax checkpoints of a training run: arrays (params, optimizer state) plus JSON metadata (step, data position,
model config), so `--resume` continues exactly where a run stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mgr.errors import UserError

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Saves into ``<run_dir>/checkpoints/<step>/`` and keeps the newest ``keep``."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.directory = Path(run_dir).resolve() / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, step: int, arrays: Any, meta: dict[str, Any]) -> None:
        try:
            self._manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        except OSError as e:  # a full disk (ENOSPC): one line naming where, the run's summary is still written
            raise UserError(f"cannot write checkpoint {self.directory / str(step)}: {e.strerror or e}") from None

    def has(self, step: int) -> bool:
        return step in self._manager.all_steps()

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
        except OSError as e:  # an asynchronous save that failed on disk
            raise UserError(f"cannot write checkpoint under {self.directory}: {e.strerror or e}") from None
        finally:
            self._manager.close()


def _locate(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoint root, step) for a run directory or its checkpoints/ directory (step None: the newest), or for
    one step's directory such as <run>/checkpoints/3 (that step)."""
    path = Path(path).resolve()
    if not path.exists():
        raise UserError(f"checkpoint {path}: no such directory")
    if (path / CHECKPOINT_DIR).is_dir():
        return path / CHECKPOINT_DIR, None
    if path.is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    return path, None


def read_meta(path: str | Path) -> tuple[Path, int, dict[str, Any]]:
    """The checkpoint ``path`` names (see _locate): (root, step, metadata)."""
    root, step = _locate(path)
    if step is None:
        steps = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
        if not steps:
            raise UserError(f"checkpoint {path}: no checkpoint found")
        step = steps[-1]
    try:
        with ocp.CheckpointManager(root) as manager:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for unreadable checkpoints
        raise UserError(f"checkpoint {path}: unreadable checkpoint metadata in {root / str(step)} "
                        f"({e.__class__.__name__}: {_first_line(e)})") from None
    return root, step, meta


def restore_arrays(root: Path, step: int, like: Any) -> Any:
    """Restore the arrays of checkpoint ``step`` into the structure, shapes and dtypes of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        with ocp.CheckpointManager(root) as manager:
            restored = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # orbax raises many types for corrupt or mismatched trees
        raise UserError(f"checkpoint {root}: cannot restore step {step}: the arrays in {root / str(step) / 'arrays'} "
                        f"are damaged or of another model ({e.__class__.__name__}: {_first_line(e)})") from None
    return restored["arrays"]


def _first_line(e: BaseException) -> str:
    """A readable line of a library's error: some (tensorstore through pybind11) print as a bound method's repr."""
    text = str(e).strip()
    line = text.splitlines()[0][:160] if text else ""
    return "no details" if not line or line.startswith("<bound method") else line
