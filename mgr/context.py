"""What the launcher hands a demo: seed, budget, run directory, and the one training loop that enforces the budget.

Demos never write their own loop. ``RunContext.train`` compiles the step once (ahead of time, so the FLOPs the
budget is planned with are the FLOPs of the very executable that runs), then steps without a host sync per step:
metrics are fetched every ``sync_every`` steps in one transfer, the newest step left queued so the device never
idles, and that is when losses are checked for NaN/inf and logged. A ``choose`` function (a schedule that picks
the next step's variant) and a time budget get them every step, one step late.

Time to quality and the decomposition (``mgr.quality``): every eval records the step, FLOPs and seconds reached,
and is checked against the budget's quality target; data loading, compilation, evals, hooks and host-side metric
handling are timed apart from the steps, and taken out of the synced windows that step times come from.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Hashable

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mgr.artifacts import RunWriter
from mgr.budget import Budget, BudgetTracker
from mgr.errors import Diverged, UserError
from mgr.flops import FlopsRecord, price
from mgr.mesh import DeviceMesh, devices_of
from mgr.meta import peak_memory_gb
from mgr.quality import EvalPoint, LoopClock, decomposition, time_to_quality
from mgr.timing import Timing

StepFn = Callable[[Any, Any], tuple[Any, dict]]

# CPU cannot donate buffers; the warning would fire on every compiled step and says nothing actionable.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


@dataclasses.dataclass
class TrainResult:
    state: Any
    steps: int
    stopped_by: str | None
    flops_per_step: float
    spent_flops: float
    step_ms: Timing
    wall_s: float
    losses: list
    evals: list[tuple[int, dict]]
    variant_steps: dict[str, int]
    final_metrics: dict
    flops_records: dict[str, FlopsRecord]
    eval_points: list[EvalPoint] = dataclasses.field(default_factory=list)
    time_to_quality: dict | None = None
    decomposition: dict | None = None
    devices: int = 1  # of the mesh; FLOPs are global (all devices), per-device figures divide by this

    @property
    def final_loss(self) -> Any:
        return self.losses[-1] if self.losses else None

    @property
    def tflops_per_s(self) -> float | None:
        """Achieved throughput from the estimator's FLOPs and the median step time (warm-up excluded)."""
        if not self.steps or not np.isfinite(self.step_ms.median_ms) or self.step_ms.median_ms <= 0:
            return None
        return (self.spent_flops / self.steps) / (self.step_ms.median_ms * 1e-3) / 1e12

    @property
    def tflops_per_s_per_device(self) -> float | None:
        """What MFU divides by one device's peak: every device runs the same SPMD program."""
        return None if self.tflops_per_s is None else self.tflops_per_s / self.devices

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "stopped_by": self.stopped_by,
            "final_loss": _mean_if_vector(self.final_loss),
            # Mean FLOPs charged per step: with several compiled variants (active depths) the first one's is not it.
            "flops_per_step": self.spent_flops / self.steps if self.steps else self.flops_per_step,
            "spent_flops": self.spent_flops,
            "step_ms": self.step_ms.to_dict(),
            "tflops_per_s": self.tflops_per_s,
            "devices": self.devices,
            "flops_per_step_per_device": (self.spent_flops / self.steps if self.steps else self.flops_per_step)
            / self.devices,
            "tflops_per_s_per_device": self.tflops_per_s_per_device,
            "wall_s": self.wall_s,
            "variant_steps": self.variant_steps,
            "flops": {k: r.to_dict() for k, r in self.flops_records.items()},
            "time_to_quality": self.time_to_quality,
            "decomposition": self.decomposition,
            "eval_points": [p.to_dict() for p in self.eval_points],
        }


def _mean_if_vector(x: Any) -> Any:
    return float(np.mean(x)) if isinstance(x, (list, np.ndarray)) else x


def _host(metrics: dict) -> dict:
    return {k: (np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}


def _copy_tree(tree: Any) -> Any:
    # The loop donates its state; copying once keeps the caller's arrays (e.g. a shared init) alive.
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


@dataclasses.dataclass
class _Executable:
    fn: Callable  # kept so its id is not reused
    exe: Any
    record: FlopsRecord
    compile_s: float  # trace + lower + XLA compile
    pricing_s: float  # mgr.flops pricing of the compiled program
    done_at: float  # perf_counter when it was ready
    claimed: bool = False  # its time is charged to the first variant that trains with it


class PlanOnly(Exception):
    """Raised by ``train`` in a context that only plans (``plan_only``): the budget is resolved, nothing trains."""


class RunContext:
    def __init__(self, *, seed: int, budget: Budget, writer: RunWriter, console: Console | None = None,
                 quality_metric: str = "val_loss", plot_prefix: str = "", log_extra: dict | None = None,
                 mesh: DeviceMesh | None = None):
        self.seed = seed
        # None: one device, and the loop is exactly the single-device one (mgr.mesh).
        self.mesh = mesh
        self.rng = jax.random.key(seed)
        self.budget = budget
        self.writer = writer
        self.console = console or Console(stderr=True)
        self.budget_records: dict[str, dict] = {}
        self.train_summaries: dict[str, dict] = {}
        # Steps between metric reads when no schedule needs them sooner: each read syncs host and device, which
        # cost ~3% of a 10 ms CPU step when done every step (bench/harness_overhead.py).
        self.sync_every = 8
        # Compiled steps by function identity and argument shapes.
        self._executables: dict[tuple, _Executable] = {}
        # The eval metric a --target-loss is checked against (the demo declares it, mgr.demo.Demo.quality_metric).
        self.quality_metric = quality_metric
        # A seed of a --seeds run: its plots get their own names, its metrics.jsonl records name the seed.
        self.plot_prefix = plot_prefix
        self.log_extra = log_extra or {}
        self.plan_only = False  # `mgr sweep --dry-run`: train() stops once the budget is resolved

    @property
    def run_dir(self) -> Path:
        return self.writer.run_dir

    @property
    def seed_dir(self) -> Path:
        """Where this seed keeps its own files (checkpoints): the run directory, or run_dir/seed<k> in a --seeds
        run, so seeds never write over each other."""
        if not self.plot_prefix:
            return self.run_dir
        path = self.run_dir / self.plot_prefix.rstrip("_")
        path.mkdir(exist_ok=True)
        return path

    def plot_path(self, name: str) -> Path:
        return self.writer.plot_path(self.plot_prefix + name)

    def log(self, record: dict) -> None:
        self.writer.log({**self.log_extra, **record})

    def compile(self, fn: Callable, state: Any, batch: Any) -> tuple[Any, FlopsRecord]:
        """The executable ``train`` runs for ``fn`` on these argument shapes (state donated), and its FLOPs;
        compiled once per run, so a demo that times a step variant itself times the very program that trained."""
        entry = self._compiled(fn, state, batch)
        return entry.exe, entry.record

    def _compiled(self, fn: Callable, state: Any, batch: Any) -> _Executable:
        leaves, treedef = jax.tree.flatten((state, batch))
        key = (id(fn), treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        if key not in self._executables:
            # Compilation, then pricing, timed apart for the decomposition.
            t0 = time.perf_counter()
            if self.mesh is None:
                exe = jax.jit(fn, donate_argnums=0).lower(state, batch).compile()
                t1 = time.perf_counter()
                record = dataclasses.replace(price(exe), compile_s=t1 - t0)
            else:  # mgr.mesh: explicit in/out shardings, state donated, global FLOPs (pricing inside compile_s)
                record, exe = self.mesh.compile_and_count(fn, state, batch)
                t1 = time.perf_counter()
            t2 = time.perf_counter()
            self._executables[key] = _Executable(fn, exe, record, t1 - t0, t2 - t1, t2)
        return self._executables[key]

    def plan(self, step_fn: StepFn, state: Any, batch: Any) -> BudgetTracker:
        """Compile ``step_fn`` (cached for ``train``) and resolve the budget against its measured FLOPs, for demos
        whose step needs the planned step count, e.g. an LR schedule (pass it in ``state`` as a traced value)."""
        _, record = self.compile(step_fn, state, batch)
        return BudgetTracker(self.budget, record.flops)

    def train(self, name: str, step_fn: StepFn | dict[Hashable, StepFn], state: Any,
              batch_fn: Callable[[int], Any], *, eval_fn: Callable[[Any], dict] | None = None,
              eval_every: int = 0, choose: Callable[[int, dict | None], Hashable] | None = None,
              start_step: int = 0, hooks: tuple[tuple[int, Callable[[int, Any], None]], ...] = (),
              on_interrupt: Callable[[int, Any], None] | None = None) -> TrainResult:
        """Train ``state`` with ``step_fn`` until the run's budget is spent; see the module docstring.

        ``start_step`` resumes a run: those steps count as already spent (at the first step's FLOPs).
        ``hooks`` are ``(every, fn(step, state))`` pairs called after every ``every``-th step, e.g. checkpointing;
        they sync with the device, so their time is excluded from step times and the time budget like evals.
        ``on_interrupt(step, state)`` runs once on Ctrl-C/SIGTERM after the last metrics are read (e.g. a checkpoint
        of the state reached, so the run can be resumed); the interrupt then propagates.
        """
        if name in self.budget_records:
            raise ValueError(f"variant {name!r} trained twice in one run")
        variants = step_fn if isinstance(step_fn, dict) else {None: step_fn}
        if choose is None and len(variants) > 1:
            raise ValueError("several step variants need a `choose` function")
        compiled: dict[Hashable, tuple[Any, FlopsRecord]] = {}
        clock = LoopClock()
        entered = time.perf_counter()
        compiled_before_s = 0.0  # compilation done before this call (ctx.plan) that this variant is charged

        def executable(key, st, batch):
            nonlocal compiled_before_s
            if key not in compiled:
                entry = self._compiled(variants[key], st, batch)
                if not entry.claimed:
                    entry.claimed = True
                    clock.add("compile_s", entry.compile_s, in_window=False)
                    clock.add("flops_pricing_s", entry.pricing_s, in_window=False)
                    if entry.done_at < entered:
                        compiled_before_s += entry.compile_s + entry.pricing_s
                    else:  # compiled inside a read window: not step time
                        clock.window_host_s += entry.compile_s + entry.pricing_s
                compiled[key] = (entry.exe, entry.record)
            return compiled[key]

        def next_batch(at_step: int):
            with clock.timed("data_s"):
                return batch_fn(at_step)

        state = _copy_tree(state)
        if self.mesh is not None:  # mgr.mesh: state and every batch onto the mesh (one device: untouched)
            state = self.mesh.put_state(state)
            feed = batch_fn
            batch_fn = lambda s: self.mesh.put_batch(feed(s))  # noqa: E731
        first_key = choose(start_step, None) if choose else None
        batch = next_batch(start_step)
        _, first_record = executable(first_key, state, batch)
        tracker = BudgetTracker(self.budget, first_record.flops)
        for _ in range(start_step):
            tracker.charge(first_record.flops)
        self.budget_records[name] = tracker.record()
        if self.plan_only:
            raise PlanOnly(name)

        losses: list = []
        evals: list[tuple[int, dict]] = []
        points: list[EvalPoint] = []
        # (time a read window finished, steps it read, host time inside it); 0 steps: the end of an eval or a hook,
        # after which the device is idle, so the next window starts there.
        windows: list[tuple[float, int, float]] = []
        variant_steps: dict[str, int] = {}
        last: dict | None = None
        pending: list[tuple[int, dict]] = []
        # A schedule choosing the next step needs every step's metrics, and a time budget needs the host clock to
        # track the device (async dispatch could queue a window of steps past the deadline); else one sync a window.
        window = 1 if choose or self.budget.time_budget is not None else self.sync_every
        timed_from = start_step + max(self.budget.warmup_steps, 1)
        paused_s = 0.0
        start = time.perf_counter()

        def read(keep_newest: bool) -> None:
            """Fetch pending metrics in one transfer; the newest step may stay queued so the device never idles."""
            nonlocal last
            batch_read = pending[:-1] if keep_newest else pending[:]
            if not batch_read:
                return
            # Steps leave `pending` only once logged: an interrupt during the blocking transfer leaves them for
            # the interrupt handler's read, so metrics.jsonl holds every step the summary counts.
            hosts = jax.device_get([m for _, m in batch_read])
            windows.append((time.perf_counter(), len(batch_read), clock.take_window()))
            with clock.timed("host_sync_s"):
                for (at_step, _), host in zip(batch_read, hosts):
                    host = _host(host)
                    self.log({"variant": name, "step": at_step, **host})
                    pending.pop(0)
                    losses.append(host["loss"])
                    if not np.all(np.isfinite(np.asarray(host["loss"], dtype=np.float64))):
                        raise Diverged(f"{name}: non-finite loss at step {at_step}")
                    last = host
                progress.update(task, advance=len(batch_read), loss=f"{np.mean(last['loss']):.4f}")


        def paused(bucket: str, fn: Callable[[], None]) -> None:
            nonlocal paused_s
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            paused_s += dt
            clock.add(bucket, dt, in_window=False)
            windows.append((time.perf_counter(), 0, clock.take_window()))

        def run_eval(at_step: int) -> None:
            reached = EvalPoint(at_step, tracker.spent_flops, time.perf_counter() - start - paused_s,
                                time.perf_counter() - entered + compiled_before_s, None)
            result = _host(eval_fn(state))
            evals.append((at_step, result))
            self.log({"variant": name, "step": at_step, "eval": result})
            value = result.get(self.quality_metric)
            if self.budget.target_loss is not None and value is None:
                raise UserError(f"--target-loss: {name}'s evals report {', '.join(result) or 'nothing'}, not "
                                f"{self.quality_metric!r}")
            value = None if value is None else float(np.mean(value))
            points.append(dataclasses.replace(reached, value=value))
            if self.budget.target_loss is not None and value is not None and value <= self.budget.target_loss:
                tracker.target_reached = True

        progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=self.console,
                            transient=True, disable=not self.console.is_terminal)
        task = progress.add_task(name, total=tracker.max_steps, loss="—")
        step = start_step
        try:
            with progress:
                while True:
                    elapsed = time.perf_counter() - start - paused_s
                    tracker.stopped_by = tracker.stop_reason(elapsed)
                    if tracker.stopped_by:
                        break
                    key = choose(step, last) if choose else None
                    if step > start_step:
                        batch = next_batch(step)
                    exe, record = executable(key, state, batch)
                    state, metrics = exe(state, batch)
                    tracker.charge(record.flops)
                    label = name if key is None else str(key)
                    variant_steps[label] = variant_steps.get(label, 0) + 1
                    pending.append((step, metrics))
                    step += 1
                    # Warm-up steps end a window of their own, so timed windows hold timed steps only.
                    if len(pending) > window or step == timed_from + 1:
                        read(keep_newest=True)
                    due_eval = eval_fn is not None and eval_every > 0 and step % eval_every == 0
                    due_hooks = [fn for every, fn in hooks if every > 0 and step % every == 0]
                    if due_eval or due_hooks:
                        read(keep_newest=False)
                    if due_eval:
                        paused("eval_s", lambda: run_eval(step))
                    for fn in due_hooks:
                        paused("hooks_s", lambda: fn(step, state))
                read(keep_newest=False)
                if eval_fn is not None and (not evals or evals[-1][0] != step):
                    paused("eval_s", lambda: run_eval(step))
        except KeyboardInterrupt:
            tracker.stopped_by = "interrupted"
            read(keep_newest=False)  # the steps that ran keep their metrics
            if on_interrupt is not None and step > start_step:
                on_interrupt(step, state)
            raise
        except Diverged:
            tracker.stopped_by = "diverged"
            raise
        finally:
            wall = time.perf_counter() - start - paused_s
            self.budget_records[name] = tracker.record()
            step_ms = _step_times(windows)
            ttq = time_to_quality(points, self.budget.target_loss, self.quality_metric, eval_every or None)
            result = TrainResult(
                state=state, steps=tracker.steps, stopped_by=tracker.stopped_by,
                flops_per_step=first_record.flops, spent_flops=tracker.spent_flops,
                step_ms=step_ms, wall_s=wall, losses=losses, evals=evals,
                variant_steps=variant_steps, final_metrics=last or {},
                flops_records={name if k is None else str(k): r for k, (_, r) in compiled.items()},
                eval_points=points, time_to_quality=ttq,
                decomposition=decomposition(
                    steps=tracker.steps - start_step, spent_flops=tracker.spent_flops - start_step * first_record.flops,
                    step_samples_ms=step_ms.samples_ms, wall_s=time.perf_counter() - entered + compiled_before_s,
                    overheads=clock.buckets, required_flops=ttq["flops"] if ttq and ttq["reached"] else None),
                devices=devices_of(self.mesh))
            self.train_summaries[name] = {**result.summary(), "peak_memory_gb": peak_memory_gb()}
        return result


def _step_times(windows: list[tuple[float, int, float]]) -> Timing:
    """One sample per timed step: a window's wall time, less the host time timed inside it (data loading, a
    compilation, metric handling), over the steps it read. The first window (warm-up) only starts the clock, and so
    does the end of every eval or hook."""
    samples: list[float] = []
    for prev, cur in zip(windows, windows[1:]):
        if cur[1]:
            samples += [max(cur[0] - prev[0] - cur[2], 0.0) * 1e3 / cur[1]] * cur[1]
    return Timing.from_samples(samples)
