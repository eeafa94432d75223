"""Run budgets: the launcher stops a training loop at the first of max iterations, target FLOPs, wall time or a
quality target (the demo's validation metric reaching ``target_loss`` at an eval)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mgr.errors import UserError


@dataclasses.dataclass(frozen=True)
class Budget:
    max_iterations: int | None = None
    target_flops: float | None = None
    time_budget: float | None = None  # seconds of training, compilation and evaluation excluded
    warmup_steps: int = 0  # excluded from throughput figures, not from the budget
    # Quality target: checked at every eval against the demo's quality metric (mgr.demo.Demo.quality_metric). It
    # stops the run at the first eval at or below it unless stop_at_target is False (the crossing is recorded).
    # It bounds nothing by itself: a run that never reaches it stops at the other budgets.
    target_loss: float | None = None
    stop_at_target: bool = True

    def __post_init__(self):
        for flag, value in (("--max-iterations", self.max_iterations), ("--target-flops", self.target_flops),
                            ("--time-budget", self.time_budget), ("--target-loss", self.target_loss)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{flag} must be a positive number, got {value!r}")
        if self.max_iterations is not None and int(self.max_iterations) != self.max_iterations:
            raise UserError(f"--max-iterations must be a whole number, got {self.max_iterations!r}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be >= 0, got {self.warmup_steps!r}")
        check_warmup(self.warmup_steps, self.max_iterations, "--max-iterations")

    @property
    def is_bounded(self) -> bool:
        return any(v is not None for v in (self.max_iterations, self.target_flops, self.time_budget))

    def or_default(self, max_iterations: int) -> "Budget":
        """A run given no budget at all gets the demo's default iteration count."""
        return self if self.is_bounded else dataclasses.replace(self, max_iterations=max_iterations)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_warmup(warmup_steps: int, steps: int | None, what: str) -> None:
    """Warm-up must leave a step to time. One step is a smoke run: it is allowed, and reports no step time."""
    if steps is not None and steps > 1 and warmup_steps >= steps:
        raise UserError(f"--warmup-steps {warmup_steps} leaves none of the {steps} steps ({what}) to time; "
                        f"lower it below {steps}")


class BudgetTracker:
    """Charges each executed step its own measured FLOPs and says when (and why) to stop."""

    def __init__(self, budget: Budget, flops_per_step: float):
        if budget.target_flops is not None and flops_per_step > 0 and budget.target_flops < flops_per_step:
            raise UserError(f"--target-flops {budget.target_flops:.3g} is smaller than one step "
                            f"({flops_per_step:.3g} FLOPs measured)")
        self.budget = budget
        self.flops_per_step = flops_per_step
        self.steps = 0
        self.spent_flops = 0.0
        self.stopped_by: str | None = None
        self.target_reached = False  # set by the loop at the first eval at or below budget.target_loss
        planned = []
        if budget.max_iterations is not None:
            planned.append(int(budget.max_iterations))
        if budget.target_flops is not None and flops_per_step > 0:
            planned.append(math.ceil(budget.target_flops / flops_per_step))
        self.max_steps = min(planned) if planned else None
        check_warmup(budget.warmup_steps, self.max_steps, "planned from the budget")

    def charge(self, flops: float) -> None:
        self.steps += 1
        self.spent_flops += flops

    def stop_reason(self, elapsed_s: float) -> str | None:
        b = self.budget
        if b.max_iterations is not None and self.steps >= b.max_iterations:
            return "max_iterations"
        if b.target_flops is not None and self.spent_flops >= b.target_flops:
            return "target_flops"
        if b.time_budget is not None and elapsed_s >= b.time_budget:
            return "time_budget"
        if self.target_reached and b.stop_at_target:
            return "target_loss"
        return None

    def record(self) -> dict[str, Any]:
        return {
            "max_steps": self.max_steps,
            "flops_per_step_est": self.flops_per_step,
            "planned_total_flops_est": None if self.max_steps is None else self.max_steps * self.flops_per_step,
            "spent_flops": self.spent_flops,
            "steps": self.steps,
            "stopped_by": self.stopped_by,
        }


def combine_records(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Top-level budget fields over all variants: one variant's own, or sums and common values for several."""
    if len(records) == 1:
        return dict(next(iter(records.values())))

    def common(key):
        values = {r[key] for r in records.values()}
        return values.pop() if len(values) == 1 else None

    planned = [r["planned_total_flops_est"] for r in records.values()]
    return {
        "max_steps": common("max_steps"),
        "flops_per_step_est": common("flops_per_step_est"),
        "planned_total_flops_est": None if None in planned else sum(planned),
        "spent_flops": sum(r["spent_flops"] for r in records.values()),
        "steps": sum(r["steps"] for r in records.values()),
        "stopped_by": common("stopped_by") or ("mixed" if records else None),
    }
