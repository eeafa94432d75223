"""Block-update schedules: how many top blocks (the active suffix) each training step updates.

Host-side, deterministic, no JAX. Every schedule answers the same two calls:

* ``decide(step) -> (active_depth, is_probe)``: the depth the step trains (the caller runs the step compiled for
  that depth, see ``mgr.methods.partial``). Deciding the same step again returns the recorded answer.
* ``observe(step, loss, block_relevance=None)``: the metrics of a decided step, possibly a step or two late (the
  training loop reads metrics one step behind). ``block_relevance`` is the per-block vector from
  ``mgr.methods.partial.block_relevance`` and is used only from steps that ran at full depth, where every block
  has a gradient.

``dynamic_suffix`` runs in three phases:

1. Full updates until ``freeze_start`` (``max(freeze_start_step, round(freeze_start_frac * total_steps))``) and,
   when ``stability_window > 0``, until the loss is also stable: the windowed mean loss moved by less than
   ``stability_rel_change`` (relative, last window vs the one before) and the last window's coefficient of
   variation is below ``stability_cv``. Once freezing starts it stays on.
2. Freezing. Every ``probe_every``-th step (``step % probe_every == 0``) is a probe: a full-depth step that
   refreshes the relevance of all blocks. A probe also updates every block: the full backward is paid anyway.
   Other steps train the depth the ``rule`` picks from the relevance EMA, clamped to ``[min_active,
   max_active]``, quantised UP to the next allowed level, then shifted by the adaptive offset. Until any
   relevance has been seen the depth is the largest allowed level. Rules:

   * ``cumulative``: the smallest top suffix whose relevance (top block down) reaches ``threshold`` of the
     total. With ``grad_ratio`` this asks for full depth whenever the bottom blocks carry the largest ratios,
     as they do in nanochat: a rule about *where* the signal is, not whether it is still changing.
   * ``plasticity``: relevance relative to each block's own peak (its EMA's running maximum; this rule also
     probes before freezing starts, to see the peak). The longest bottom run of blocks below
     ``decay_threshold`` of their peak is frozen: "the top is where learning still happens" whatever the
     blocks' absolute scales.
3. Full updates for the last ``final_full_frac`` of ``total_steps`` (recovery).

``progressive`` is the signal-free competitor (FreezeOut): blocks freeze bottom-up at fixed fractions of the
freezing phase, monotonically, through the same levels, warm-up and recovery phases.

Adaptive budget: losses of full-depth steps on the probe grid feed an EMA (``loss_beta``). At each probe the EMA is
compared with a reference: above ``upper_factor x reference`` the depth goes up one level, below
``lower_factor x reference`` it goes down one level. ``reference="freeze_start"``: the EMA when freezing started,
re-anchored to the current EMA after every attempted move (a ratchet: each further level needs a further change of
the same size). ``reference="running_min"``: the lowest EMA seen since freezing started (compared before the current
EMA joins it), also re-anchored after attempted moves; it guards against regressions and lowers only on sharp
drops. The level offset is bounded so that it never points past either end of the levels (no wind-up).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mgr.errors import UserError

# Probe signals (computed on device by mgr.methods.partial.block_relevance) and the depth rules that read them.
RELEVANCE_KINDS = ("grad_ratio", "saliency", "update", "snr")
RULES = ("cumulative", "plasticity")


@dataclass(frozen=True)
class DynamicSuffixConfig:
    levels: tuple[int, ...] = field(default=(), metadata={
        "help": "allowed active depths, quantised up to; empty = quarters of the stack (e.g. 2,4,6,8 of 8)"})
    min_active: int = field(default=1, metadata={"help": "fewest blocks ever trained"})
    max_active: int | None = field(default=None, metadata={
        "help": "most blocks trained on non-probe steps (None = all)"})
    threshold: float = field(default=0.9, metadata={
        "help": "fraction of total block relevance the trained top suffix must cover"})
    relevance: str = field(default="grad_ratio", metadata={
        "help": "probe signal per block: grad_ratio ||g||/||W||, saliency sum|g*W|, update -g.dW (loss decrease "
                "bought by the block's update), snr (cosine of the two half-batch gradients)",
        "choices": RELEVANCE_KINDS})
    rule: str = field(default="cumulative", metadata={
        "help": "depth rule: cumulative (smallest top suffix holding --threshold of the total signal) or "
                "plasticity (freeze the bottom blocks whose signal fell below --decay-threshold x its own peak)",
        "choices": RULES})
    decay_threshold: float = field(default=0.5, metadata={
        "help": "plasticity rule: a block whose signal EMA is below this fraction of its peak has stopped learning"})
    relevance_beta: float = field(default=0.9, metadata={"help": "EMA factor of per-block relevance across probes"})
    probe_every: int = field(default=10, metadata={"help": "steps between full-gradient probe steps"})
    freeze_start_step: int = field(default=0, metadata={"help": "no freezing before this step"})
    freeze_start_frac: float = field(default=0.1, metadata={"help": "no freezing before this fraction of total steps"})
    stability_window: int = field(default=0, metadata={
        "help": "losses per stability window; 0 = start freezing without a stability check"})
    stability_rel_change: float = field(default=0.01, metadata={
        "help": "max relative change of the windowed mean loss (last window vs previous) to count as stable"})
    stability_cv: float = field(default=0.05, metadata={
        "help": "max coefficient of variation of the loss in the last window to count as stable"})
    adaptive: bool = field(default=True, metadata={"help": "move the depth by one level on probe-loss drift"})
    loss_beta: float = field(default=0.5, metadata={"help": "EMA factor of the probe loss"})
    reference: str = field(default="freeze_start", metadata={
        "help": "adaptive reference loss", "choices": ("freeze_start", "running_min")})
    upper_factor: float = field(default=1.05, metadata={"help": "probe-loss EMA above this x reference: one level up"})
    lower_factor: float = field(default=0.9, metadata={"help": "probe-loss EMA below this x reference: one level down"})
    final_full_frac: float = field(default=0.1, metadata={"help": "last fraction of total steps run at full depth"})
    progressive_power: float = field(default=1.0, metadata={
        "help": "progressive schedule: block l (bottom = 0) freezes at fraction ((l+1)/L)^power of the freezing "
                "phase; 1 = linear, 3 = FreezeOut's cubic (bottom blocks go early)"})


def phase_bounds(config: DynamicSuffixConfig, total_steps: int | None) -> tuple[int, int | None]:
    """(first step freezing may start, first step of the final full-update phase or None)."""
    if total_steps is None:
        if config.freeze_start_frac or config.final_full_frac:
            raise UserError("freeze_start_frac and final_full_frac need a known total step count")
        return config.freeze_start_step, None
    if total_steps < 1:
        raise UserError(f"total_steps must be >= 1, got {total_steps}")
    # round, not ceil: 0.1 * 100 is 10.000000000000002 in floating point.
    start = max(config.freeze_start_step, round(config.freeze_start_frac * total_steps))
    return start, total_steps - round(config.final_full_frac * total_steps)


def allowed_levels(config: DynamicSuffixConfig, n_blocks: int) -> tuple[int, ...]:
    """The configured levels inside [min_active, max_active], ascending."""
    levels = config.levels or tuple(math.ceil(n_blocks * i / 4) for i in range(1, 5))
    if any(not 1 <= level <= n_blocks for level in levels):
        raise UserError(f"levels must lie in [1, {n_blocks}], got {levels}")
    max_active = n_blocks if config.max_active is None else config.max_active
    if not 1 <= config.min_active <= max_active <= n_blocks:
        raise UserError(f"need 1 <= min_active <= max_active <= {n_blocks}, "
                        f"got {config.min_active} and {max_active}")
    allowed = tuple(sorted({lv for lv in levels if config.min_active <= lv <= max_active}))
    if not allowed:
        raise UserError(f"no level of {levels} lies in [{config.min_active}, {max_active}]")
    return allowed


def relevance_depth(relevance_L: np.ndarray, threshold: float) -> int:
    """Smallest k whose top-k blocks hold at least ``threshold`` of the total relevance (all blocks if none)."""
    top_down = np.cumsum(np.asarray(relevance_L, np.float64)[::-1])
    total = top_down[-1]
    if not total > 0:
        return len(top_down)
    reached = np.flatnonzero(top_down >= threshold * total)
    return int(reached[0]) + 1 if reached.size else len(top_down)


def plasticity_depth(relevance_L: np.ndarray, peak_L: np.ndarray, decay_threshold: float) -> int:
    """L minus the longest bottom run of blocks whose signal fell below ``decay_threshold`` of its own peak: a
    suffix schedule can only freeze a prefix, so one still-learning low block keeps everything above it active."""
    ratio_L = np.asarray(relevance_L, np.float64) / np.maximum(np.asarray(peak_L, np.float64), 1e-30)
    learning = np.flatnonzero(ratio_L >= decay_threshold)
    frozen = int(learning[0]) if learning.size else len(ratio_L)
    return max(len(ratio_L) - frozen, 1)


def quantize_up(depth: int, levels: tuple[int, ...]) -> int:
    """Index into ascending ``levels`` of the smallest level >= depth (the largest level if none is)."""
    return next((i for i, level in enumerate(levels) if level >= depth), len(levels) - 1)


class Schedule:
    """Records every decision; subclasses choose the depth in ``_choose``."""

    name = "schedule"

    def __init__(self, n_blocks: int):
        if n_blocks < 1:
            raise UserError(f"n_blocks must be >= 1, got {n_blocks}")
        self.n_blocks = n_blocks
        self.timeline: list[tuple[int, int, bool]] = []  # (step, active depth, is_probe) in decision order
        self._decided: dict[int, tuple[int, bool]] = {}

    def decide(self, step: int) -> tuple[int, bool]:
        if step not in self._decided:
            depth, probe = self._choose(step)
            self._decided[step] = (depth, probe)
            self.timeline.append((step, depth, probe))
        return self._decided[step]

    def observe(self, step: int, loss: float, block_relevance: np.ndarray | None = None) -> None:
        if step not in self._decided:
            raise ValueError(f"observe(step={step}) for a step that was never decided")

    def _choose(self, step: int) -> tuple[int, bool]:
        raise NotImplementedError

    @property
    def n_probes(self) -> int:
        return sum(probe for _, _, probe in self.timeline)

    @property
    def mean_active_depth(self) -> float:
        return float(np.mean([depth for _, depth, _ in self.timeline])) if self.timeline else float("nan")

    def summary(self) -> dict:
        depths, counts = np.unique([depth for _, depth, _ in self.timeline], return_counts=True)
        return {"schedule": self.name, "steps": len(self.timeline), "n_probes": self.n_probes,
                "mean_active_depth": self.mean_active_depth,
                "steps_per_depth": {int(d): int(c) for d, c in zip(depths, counts)}}


class FullUpdate(Schedule):
    name = "full_update"

    def _choose(self, step: int) -> tuple[int, bool]:
        return self.n_blocks, False


class StaticSuffix(Schedule):
    """A fixed active depth on steps in [freeze_start, full_from); full depth outside."""

    name = "static_suffix"

    def __init__(self, n_blocks: int, active_depth: int, *, freeze_start: int = 0, full_from: int | None = None):
        super().__init__(n_blocks)
        if not 1 <= active_depth <= n_blocks:
            raise UserError(f"active depth must be in [1, {n_blocks}], got {active_depth}")
        self.active_depth, self.freeze_start, self.full_from = active_depth, freeze_start, full_from

    def _choose(self, step: int) -> tuple[int, bool]:
        frozen = step >= self.freeze_start and (self.full_from is None or step < self.full_from)
        return (self.active_depth if frozen else self.n_blocks), False


class DynamicSuffix(Schedule):
    """Relevance-driven active depth with probes, stability gating, adaptive budget and final recovery."""

    name = "dynamic_suffix"

    def __init__(self, n_blocks: int, total_steps: int | None, config: DynamicSuffixConfig = DynamicSuffixConfig()):
        super().__init__(n_blocks)
        _validate(config)
        self.config = config
        self.levels = allowed_levels(config, n_blocks)
        self.freeze_start, self.full_from = phase_bounds(config, total_steps)
        self.freezing_since: int | None = None
        self.relevance_ema: np.ndarray | None = None
        self.relevance_peak: np.ndarray | None = None
        self.probe_loss_ema: float | None = None
        self.reference: float | None = None
        self.level_offset = 0
        self._losses: deque[float] = deque(maxlen=2 * config.stability_window)

    def _choose(self, step: int) -> tuple[int, bool]:
        if self.full_from is not None and step >= self.full_from:
            return self.n_blocks, False
        if self.freezing_since is None:
            if step < self.freeze_start or not self.loss_is_stable():
                # The plasticity rule measures decay from each block's own peak, so it probes from the start.
                return self.n_blocks, self.config.rule == "plasticity" and step % self.config.probe_every == 0
            self.freezing_since = step
            self.reference = self.probe_loss_ema
        if step % self.config.probe_every == 0:
            return self.n_blocks, True
        return self.target_depth(), False

    def target_depth(self) -> int:
        """Depth for a non-probe freezing step from the current relevance EMA and adaptive offset."""
        index = self._relevance_level() + self.level_offset
        return self.levels[min(max(index, 0), len(self.levels) - 1)]

    def _relevance_level(self) -> int:
        if self.relevance_ema is None:
            return len(self.levels) - 1
        if self.config.rule == "plasticity":
            depth = plasticity_depth(self.relevance_ema, self.relevance_peak, self.config.decay_threshold)
        else:
            depth = relevance_depth(self.relevance_ema, self.config.threshold)
        return quantize_up(depth, self.levels)

    def loss_is_stable(self) -> bool:
        w = self.config.stability_window
        if not w:
            return True
        if len(self._losses) < 2 * w:
            return False
        losses = np.asarray(self._losses)
        previous, recent = losses[:w], losses[w:]
        rel_change = abs(recent.mean() - previous.mean()) / abs(previous.mean())
        cv = recent.std() / abs(recent.mean())
        return bool(rel_change < self.config.stability_rel_change and cv < self.config.stability_cv)

    def observe(self, step: int, loss: float, block_relevance: np.ndarray | None = None) -> None:
        super().observe(step, loss, block_relevance)
        loss = float(loss)
        self._losses.append(loss)
        depth, probe = self._decided[step]
        if depth != self.n_blocks:
            return
        cfg = self.config
        if block_relevance is not None:
            relevance_L = np.asarray(block_relevance, np.float64)
            if relevance_L.shape != (self.n_blocks,):
                raise UserError(f"block relevance must have shape ({self.n_blocks},), got {relevance_L.shape}")
            self.relevance_ema = relevance_L if self.relevance_ema is None else (
                cfg.relevance_beta * self.relevance_ema + (1 - cfg.relevance_beta) * relevance_L)
            self.relevance_peak = self.relevance_ema if self.relevance_peak is None else np.maximum(
                self.relevance_peak, self.relevance_ema)
        if step % cfg.probe_every:
            return
        self.probe_loss_ema = loss if self.probe_loss_ema is None else (
            cfg.loss_beta * self.probe_loss_ema + (1 - cfg.loss_beta) * loss)
        if probe and cfg.adaptive:
            self._adapt(self.probe_loss_ema)

    def _adapt(self, ema: float) -> None:
        if self.reference is None:
            self.reference = ema
            return
        cfg = self.config
        step_levels = (ema > cfg.upper_factor * self.reference) - (ema < cfg.lower_factor * self.reference)
        # Bounded by the current relevance level, so the offset cannot wind up past the ends of the levels.
        base = self._relevance_level()
        self.level_offset = min(max(base + self.level_offset + step_levels, 0), len(self.levels) - 1) - base
        if step_levels:
            self.reference = ema
        elif cfg.reference == "running_min":
            self.reference = min(self.reference, ema)

    def summary(self) -> dict:
        return {**super().summary(), "freezing_since": self.freezing_since, "level_offset": self.level_offset,
                "levels": list(self.levels)}


class Progressive(Schedule):
    """FreezeOut-style: blocks freeze bottom-up at fixed points of the freezing phase, no signal, never thawed
    (until the final recovery phase). Block l of L freezes at fraction ((l+1)/L)^power of [freeze_start,
    full_from); the depth is quantised up to the allowed levels, so it falls through them monotonically."""

    name = "progressive"

    def __init__(self, n_blocks: int, total_steps: int | None, config: DynamicSuffixConfig = DynamicSuffixConfig()):
        super().__init__(n_blocks)
        _validate(config)
        if total_steps is None:
            raise UserError("the progressive schedule needs a known total step count")
        self.levels = allowed_levels(config, n_blocks)
        self.freeze_start, self.full_from = phase_bounds(config, total_steps)
        span = max(self.full_from - self.freeze_start, 1)
        self.freeze_at = [self.freeze_start + span * ((l + 1) / n_blocks) ** config.progressive_power
                          for l in range(n_blocks - 1)]

    def _choose(self, step: int) -> tuple[int, bool]:
        if step < self.freeze_start or step >= self.full_from:
            return self.n_blocks, False
        frozen = sum(step >= t for t in self.freeze_at)
        return self.levels[quantize_up(self.n_blocks - frozen, self.levels)], False


def _validate(cfg: DynamicSuffixConfig) -> None:
    checks = [
        (0 < cfg.threshold <= 1, f"threshold must be in (0, 1], got {cfg.threshold}"),
        (cfg.relevance in RELEVANCE_KINDS,
         f"relevance must be one of {', '.join(RELEVANCE_KINDS)}, got {cfg.relevance!r}"),
        (cfg.rule in RULES, f"rule must be one of {', '.join(RULES)}, got {cfg.rule!r}"),
        (0 < cfg.decay_threshold < 1, f"decay_threshold must be in (0, 1), got {cfg.decay_threshold}"),
        (cfg.progressive_power > 0 and math.isfinite(cfg.progressive_power),
         f"progressive_power must be a positive number, got {cfg.progressive_power}"),
        (0 <= cfg.relevance_beta < 1, f"relevance_beta must be in [0, 1), got {cfg.relevance_beta}"),
        (cfg.probe_every >= 1, f"probe_every must be >= 1, got {cfg.probe_every}"),
        (cfg.freeze_start_step >= 0, f"freeze_start_step must be >= 0, got {cfg.freeze_start_step}"),
        (0 <= cfg.freeze_start_frac <= 1, f"freeze_start_frac must be in [0, 1], got {cfg.freeze_start_frac}"),
        (cfg.stability_window >= 0, f"stability_window must be >= 0, got {cfg.stability_window}"),
        (cfg.stability_rel_change > 0 and cfg.stability_cv > 0, "stability thresholds must be > 0"),
        (0 <= cfg.loss_beta < 1, f"loss_beta must be in [0, 1), got {cfg.loss_beta}"),
        (cfg.reference in ("freeze_start", "running_min"),
         f"reference must be freeze_start or running_min, got {cfg.reference!r}"),
        (0 < cfg.lower_factor <= 1 <= cfg.upper_factor,
         f"need 0 < lower_factor <= 1 <= upper_factor, got {cfg.lower_factor} and {cfg.upper_factor}"),
        (0 <= cfg.final_full_frac <= 1, f"final_full_frac must be in [0, 1], got {cfg.final_full_frac}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


SCHEDULES = ("full_update", "static_suffix", "progressive", "dynamic_suffix")


def make_schedule(kind: str, n_blocks: int, total_steps: int | None, *, static_depth: int | None = None,
                  config: DynamicSuffixConfig = DynamicSuffixConfig()) -> Schedule:
    """One schedule by name. ``static_suffix`` uses the dynamic config's phase bounds (warm-up and final
    recovery, no stability gating), so static and dynamic runs differ only in how the depth is chosen."""
    if kind == "full_update":
        return FullUpdate(n_blocks)
    if kind == "static_suffix":
        if static_depth is None:
            raise UserError("static_suffix needs a static depth")
        freeze_start, full_from = phase_bounds(config, total_steps)
        return StaticSuffix(n_blocks, static_depth, freeze_start=freeze_start, full_from=full_from)
    if kind == "dynamic_suffix":
        return DynamicSuffix(n_blocks, total_steps, config)
    if kind == "progressive":
        return Progressive(n_blocks, total_steps, config)
    raise UserError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
