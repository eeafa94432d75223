"""Partial updates and dynamic block-update scheduling: suffix freezing that really saves compute.

Three schedules train the same model from the same init on the same batches, each through ``ctx.train`` under
the same launcher budget (--max-iterations, --target-flops, or --time-budget for equal time):

* ``full_update``: every step trains all L blocks.
* ``static_suffix``: only the top --static-depth blocks, between the warm-up and the final recovery phase.
* ``progressive``: FreezeOut-style, blocks frozen bottom-up at fixed fractions of the freezing phase, no signal:
  the simple competitor every adaptive rule must beat.
* ``dynamic_suffix``: ``mgr.methods.schedule.DynamicSuffix`` picks the active depth from per-block relevance
  measured on probe steps (full-depth steps that also return ``mgr.methods.partial.block_relevance`` of their
  gradient), by ``--rule`` (cumulative coverage, or plasticity: decay from each block's own peak) over
  ``--relevance`` (grad_ratio, saliency, update -g.dW, or the half-batch gradient snr).

The saving is real, not masked: the step compiled for k active blocks puts stop_gradient on the activation
entering block L-k, so autodiff builds no backward for the frozen prefix (forward only), and the optimizer is
``freeze_prefix_rows`` over ``suffix_labels``, so frozen rows and their Adam moments are never touched and one
optimizer state serves every depth. There is one compiled step per active depth (plus the probe); the scheduler
picks among them through ``choose(step, last_metrics)`` and the loop charges each step its own variant's measured
FLOPs. All variants are compiled before any schedule trains, so compilation is in no schedule's time.

The harness reads metrics one step late: ``choose(step, ...)`` sees the metrics of step-2 (step-1 right after an
eval), so the scheduler acts on relevance and losses a step or two old, and the metrics of the step just before an
eval are read together with the eval's step and never reach the scheduler. Relevance changes slowly; the lag is
harmless.

Planned length: the LR warm-down (nanochat's ``lr_multiplier``) and the schedules' warm-up/recovery fractions are
resolved against the planned step count: --max-iterations, or ceil(--target-flops / full-step FLOPs); under a
time-only budget against the steps full_update reached (it runs first), with the LR flat after warm-up. A schedule
cheaper per step runs past that count under a FLOPs or time budget, at full depth (the recovery phase) and, under a
FLOPs budget, at the final LR.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mgr.demo import Demo
from mgr.errors import UserError
from mgr.methods.partial import block_relevance, freeze_prefix_rows, suffix_labels, suffix_scan, value_and_half_grads
from mgr.plots import plot_curves
from mgr.report import register_section, tradeoff_section
from mgr.quality import time_to_quality, value_at
from mgr.results import Results, Table, fmt
from mgr.timing import interleaved
from mgr.methods.schedule import SCHEDULES, DynamicSuffixConfig, Schedule, allowed_levels, make_schedule
from nanochat import train as nanochat
from nanochat.model import rms_norm
from nanochat.tokenizer import load_tokenizer

MODELS = ("resmlp", "nanochat")
PROBE = "probe"  # the step-variant key of probe steps; the other keys are active depths
RESMLP_CLASSES = 16
# Training rows when the budget fixes no step count, and the most ever labelled (beyond, epochs repeat).
RESMLP_ROWS, RESMLP_MAX_ROWS = 65536, 2**18
DEFAULT_DEPTH = {"resmlp": 12, "nanochat": 4}
DEFAULT_BATCH = {"resmlp": 256, "nanochat": 8}


def _retuned(name: str, default: Any):
    """A DynamicSuffixConfig knob with this demo's default and the scheduler's own help text."""
    return field(default=default, metadata=DynamicSuffixConfig.__dataclass_fields__[name].metadata)


@dataclass(frozen=True)
class Config(DynamicSuffixConfig):
    """The dynamic schedule's knobs (inherited from DynamicSuffixConfig, one flag each), then the demo's own."""

    # Freezing the prefix while every block still learns fast costs quality that the recovery phase does not win
    # back, so this demo starts later than the scheduler's default 10%.
    freeze_start_frac: float = _retuned("freeze_start_frac", 0.3)

    model: str = field(default="resmlp", metadata={
        "help": "resmlp: deep residual MLP classifier on a teacher's labels (fast); nanochat: the GPT",
        "choices": MODELS})
    schedules: tuple[str, ...] = field(default=SCHEDULES, metadata={"help": "comma-separated subset to run"})
    static_depth: int | None = field(default=None, metadata={
        "help": "active blocks of static_suffix (None: half the blocks)"})
    depth: int | None = field(default=None, metadata={"help": "blocks L (None: 12 resmlp, 4 nanochat)"})
    width: int = field(default=128, metadata={"help": "resmlp residual width (MLP hidden = 2x); nanochat: 64*depth"})
    sequence_len: int = field(default=128, metadata={"help": "nanochat tokens per row"})
    batch_size: int | None = field(default=None, metadata={"help": "rows per step (None: 256 resmlp, 8 nanochat)"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})
    eval_every: int = field(default=0, metadata={"help": "steps between evals (0: only at the end)"})
    eval_tokens: int = field(default=8192, metadata={"help": "validation tokens (nanochat) or rows (resmlp)"})
    data: str | None = field(default=None, metadata={"help": "nanochat text/parquet/.bin data; default synthetic"})
    timing_rounds: int = field(default=10, metadata={
        "help": "after training, time every depth's step this many times in turn (0: skip)"})


def nanochat_config(config: Config) -> nanochat.Config:
    """nanochat's training config for this run: its optimizer (AdamW, clip 1) and LR shape serve both models. The
    classic recipe as one scan with the dense "xla" attention: the analytic FLOPs below assume its uniform stack
    of blocks, a scanned suffix and full T^2 attention."""
    return nanochat.Config(depth=config.depth, sequence_len=config.sequence_len, batch_size=config.batch_size,
                           recipe="classic", scan_layers=True, lr=config.lr, eval_every=config.eval_every,
                           eval_tokens=config.eval_tokens, data=config.data, attention_type="xla")


def check_config(config: Config) -> Config:
    """Validated config with the per-model defaults filled in."""
    if config.model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, got {config.model!r}")
    unknown = [s for s in config.schedules if s not in SCHEDULES]
    if unknown or not config.schedules or len(set(config.schedules)) != len(config.schedules):
        raise UserError(f"--schedules must be distinct names from {','.join(SCHEDULES)}, got "
                        f"{','.join(config.schedules) or 'nothing'}")
    config = dataclasses.replace(config, depth=DEFAULT_DEPTH[config.model] if config.depth is None else config.depth,
                                 batch_size=DEFAULT_BATCH[config.model] if config.batch_size is None
                                 else config.batch_size,
                                 schedules=tuple(s for s in SCHEDULES if s in config.schedules))
    for name in ("depth", "width", "sequence_len", "batch_size", "eval_tokens"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    for name in ("eval_every", "timing_rounds"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.static_depth is not None and not 1 <= config.static_depth <= config.depth:
        raise UserError(f"--static-depth must be in [1, {config.depth}], got {config.static_depth}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise UserError(f"--lr must be a positive finite number, got {config.lr}")
    if config.model == "nanochat":
        nanochat.check_config(nanochat_config(config))
    return config


def check(config: Config, budget) -> None:
    """Demo.check: the launcher refuses bad options before making the run directory."""
    check_config(config)


# --- models: one step per active depth, eval, data, analytic FLOPs ----------------------------------------------

class Task(NamedTuple):
    n_blocks: int
    state: dict  # nanochat's train state: params, optimizer state, step, total_steps
    make_step: Callable[[int, str | None], Callable]  # (active blocks, relevance kind or None) -> pure step
    batch_fn: Callable[[int], dict]
    eval_fn: Callable[[dict], dict]  # jitted inside
    matmul_flops: Callable[[int], float]  # analytic matmul FLOPs of a step with k active blocks
    flops_formula: str


def suffix_optimizer(nc: nanochat.Config, params, n_blocks: int, n_active: int, below_blocks: tuple = ()):
    """nanochat's optimizer on the top ``n_active`` blocks only; its state is the same for every depth."""
    labels = suffix_labels(params, n_blocks, n_active, below_blocks=below_blocks)
    return freeze_prefix_rows(nanochat.make_optimizer(nc, params), labels)


def init_resmlp(key, width: int, n_blocks: int, residual_scale: float) -> dict:
    """Stacked block weights (axis 0 = block) so the blocks run as suffix_scan; no biases: all compute is matmul.
    No input layer: the inputs are the residual stream, so freezing blocks freezes nothing else."""
    k1, k2, k_out = jax.random.split(key, 3)
    hidden = 2 * width
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape) * fan_in ** -0.5
    return {"blocks": {"w1": normal(k1, (n_blocks, width, hidden), width),
                       "w2": residual_scale * normal(k2, (n_blocks, hidden, width), hidden)},
            "w_out": normal(k_out, (width, RESMLP_CLASSES), width)}


def resmlp_logits(params: dict, x_BD: jax.Array, n_active: int) -> jax.Array:
    def block(h_BD, w):
        return h_BD + jax.nn.relu(rms_norm(h_BD) @ w["w1"]) @ w["w2"]

    return rms_norm(suffix_scan(block, x_BD, params["blocks"], n_active)) @ params["w_out"]


def cross_entropy(logits_BC: jax.Array, y_B: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.logsumexp(logits_BC, axis=-1) - jnp.take_along_axis(logits_BC, y_B[:, None], -1)[:, 0])


def resmlp_task(config: Config, nc: nanochat.Config, seed: int, train_rows: int) -> Task:
    """Classify Gaussian inputs by the argmax of a random deep teacher of the same shape (a stronger residual
    branch than the student's init): every block of the student has something to fit. The rows are labelled
    once, before training, in chunks."""
    L, B, D = config.depth, config.batch_size, config.width
    if train_rows < B:
        raise UserError(f"--batch-size {B} exceeds the {train_rows} training rows")
    k_teacher, k_student = jax.random.split(jax.random.key(seed))
    teacher = init_resmlp(k_teacher, D, L, residual_scale=1.0)
    x_ND = np.random.default_rng(seed % 2**32).standard_normal((train_rows + config.eval_tokens, D), np.float32)
    label = jax.jit(lambda x: jnp.argmax(resmlp_logits(teacher, x, L), axis=-1).astype(jnp.int32))
    y_N = np.concatenate([label(x_ND[i:i + 16384]) for i in range(0, len(x_ND), 16384)])
    x_val, y_val = jnp.asarray(x_ND[train_rows:]), jnp.asarray(y_N[train_rows:])
    per_epoch = train_rows // B

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed % 2**32, epoch]).permutation(train_rows)

    def batch_fn(step: int) -> dict:
        epoch, i = divmod(step, per_epoch)
        rows = order(epoch)[i * B:(i + 1) * B]
        return {"x_BD": x_ND[rows], "y_B": y_N[rows]}

    params = init_resmlp(k_student, D, L, residual_scale=L ** -0.5)

    def make_step(n_active: int, relevance: str | None):
        tx = suffix_optimizer(nc, params, L, n_active)

        grad_fn = jax.value_and_grad(lambda p, x_BD, y_B: cross_entropy(resmlp_logits(p, x_BD, n_active), y_B))

        def step(state, batch):
            half_grads = None
            if relevance == "snr":
                loss, grads, half_grads = value_and_half_grads(grad_fn, state["params"], batch["x_BD"], batch["y_B"])
            else:
                loss, grads = grad_fn(state["params"], batch["x_BD"], batch["y_B"])
            updates, opt = tx.update(grads, state["opt"], state["params"])
            lrm = nanochat.lr_multiplier(state["step"], state["total_steps"], nc)
            updates = jax.tree.map(lambda u: lrm * u, updates)
            params = optax.apply_updates(state["params"], updates)
            metrics = {"loss": loss, "lr_mult": lrm}
            if relevance is not None:
                metrics["block_relevance"] = block_relevance(grads, state["params"], L, kind=relevance,
                                                             updates=updates, half_grads=half_grads)
            return {**state, "params": params, "opt": opt, "step": state["step"] + 1}, metrics

        return step

    @jax.jit
    def evaluate(params):
        logits_NC = resmlp_logits(params, x_val, L)
        loss_N = jax.nn.logsumexp(logits_NC, axis=-1) - jnp.take_along_axis(logits_NC, y_val[:, None], -1)[:, 0]
        # The standard error of the mean says which val-loss gaps this validation set can resolve at all.
        return {"val_loss": jnp.mean(loss_N), "val_loss_se": jnp.std(loss_N) / loss_N.size ** 0.5,
                "val_accuracy": jnp.mean(jnp.argmax(logits_NC, axis=-1) == y_val)}

    F, C = 2 * D, RESMLP_CLASSES

    def matmul_flops(k: int) -> float:
        return float((L - k) * 4 * B * D * F + k * 12 * B * D * F - (2 * B * D * F if k < L else 0) + 6 * B * D * C)

    formula = (f"resmlp matmul FLOPs with k of L={L} active blocks (B={B} rows, width D={D}, MLP hidden F={F}, "
               f"C={C} classes): (L-k)*4BDF + k*12BDF - 2BDF (if k < L) + 6BDC. A frozen block runs forward only "
               "(4BDF), an active block forward plus both backward matmuls (12BDF), the head forward + backward "
               "(6BDC). Below k=L the first active block skips its input gradient (suffix_scan peels it out of "
               "the scan: 10BDF); at k=L block 0's input gradient is computed inside the one scan and unused.")
    state = nanochat.init_state(params, suffix_optimizer(nc, params, L, L))
    return Task(L, state, make_step, batch_fn, lambda s: evaluate(s["params"]), matmul_flops, formula)


def nanochat_task(config: Config, nc: nanochat.Config, seed: int) -> Task:
    tokenizer = load_tokenizer(nc.tokenizer)
    train, val = nanochat.build_data(nc, seed, tokenizer)
    cfg = nanochat.model_config(nc, train.vocab_size)
    graphdef, params = nnx.split(nanochat.build_model(nc, cfg, seed), nnx.Param)
    L, below = cfg.n_layer, (("wte",),)

    def make_step(n_active: int, relevance: str | None):
        tx = suffix_optimizer(nc, params, L, n_active, below)
        return nanochat.make_train_step(graphdef, tx, nc, n_frozen=L - n_active, relevance=relevance)

    B, T, D, H, G, K, V = (nc.batch_size, nc.sequence_len, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
                           cfg.vocab_size)
    block_params = D * (H + 2 * G) * K + H * K * D + 8 * D * D
    fwd_block = 2 * B * T * block_params + 4 * B * T * T * H * K
    fwd_head = 2 * B * T * D * V

    def matmul_flops(k: int) -> float:
        # A one-block suffix is a one-trip scan, which XLA inlines: the input gradient of its q, k, v is then dead.
        unused_input_grad = 2 * B * T * D * (H + 2 * G) * K if k == 1 < L else 0
        return float(3 * fwd_head + (L - k) * fwd_block + 3 * k * fwd_block - unused_input_grad)

    formula = (f"nanochat matmul FLOPs with k of L={L} active blocks: 3*F_head + (L-k)*F_block + 3k*F_block, "
               f"F_block = 2*B*T*P_block + 4*B*T^2*H*K = {fwd_block:.4g} (P_block = {block_params} matmul params, "
               f"B={B}, T={T}, H={H}, K={K}; full T^2 attention), F_head = 2*B*T*D*V = {fwd_head:.4g}. A frozen "
               "block runs forward only, an active one forward + backward (3x); the suffix is one scan, so the "
               "first active block also computes its input gradient, which the stop_gradient then discards "
               "(except at k=1: a one-trip scan is inlined and that gradient is dropped). "
               "At k=L this is nanochat's 6N + 12*L*H*K*T per token.")
    state = nanochat.init_state(params, suffix_optimizer(nc, params, L, L, below))
    return Task(L, state, make_step, train, nanochat.make_eval(graphdef, val), matmul_flops, formula)


# --- the comparison: one ctx.train per schedule, same budget, same init, same batches ---------------------------

def tag_step(step_fn: Callable) -> Callable:
    """Metrics carry their step's index, so the scheduler can tell fresh metrics from ones it has already seen."""
    def step(state, batch):
        new_state, metrics = step_fn(state, batch)
        return new_state, {**metrics, "step": state["step"]}
    return step


class Driver:
    """Connects a schedule to ctx.train: feeds it the (late) metrics, maps its decisions to step-variant keys and
    keeps a training-time clock (evals excluded) for the loss-vs-time plot."""

    def __init__(self, schedule: Schedule, eval_fn: Callable[[dict], dict]):
        self.schedule, self.eval_fn = schedule, eval_fn
        self.observed = -1
        self.start: float | None = None
        self.paused_s = 0.0
        self.dispatch_s: dict[int, float] = {}
        self.eval_s: list[float] = []

    def now(self) -> float:
        if self.start is None:
            self.start = time.perf_counter()
        return time.perf_counter() - self.start - self.paused_s

    def choose(self, step: int, last: dict | None):
        if last is not None and last["step"] > self.observed:
            self.observed = last["step"]
            self.schedule.observe(self.observed, last["loss"], last.get("block_relevance"))
        self.dispatch_s.setdefault(step, self.now())
        depth, probe = self.schedule.decide(step)
        return PROBE if probe else depth

    def evaluate(self, state: dict) -> dict:
        self.eval_s.append(self.now())
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.eval_fn(state))
        self.paused_s += time.perf_counter() - t0
        return out

    def done_s(self, steps: int, wall_s: float) -> list[float]:
        # The loop dispatches step s+1 and then blocks on the metrics of step s: step s has finished about when
        # step s+2 is dispatched.
        return [self.dispatch_s.get(s + 2, wall_s) for s in range(steps)]


def time_variants(ctx, variants: dict, state: dict, batch: dict, rounds: int) -> dict[Any, list[float]]:
    """ms per call of every step variant, called in turn (mgr.timing.interleaved): the schedules train one after
    another, so their own step times also differ by whatever else loads the machine meanwhile. The executables are
    the ones ctx.train ran (ctx.compile), so nothing compiles again and the timed program is the trained one."""
    calls = {key: (ctx.compile(fn, state, batch)[0], state, batch) for key, fn in variants.items()}
    return {key: list(t.samples_ms) for key, t in interleaved(calls, rounds).items()}


def run(config: Config, ctx) -> Results:
    config = check_config(config)
    nc = nanochat_config(config)
    if config.model == "resmlp":
        # Fresh rows for every step of an iteration budget: no row is seen twice, so no schedule overfits.
        steps = ctx.budget.max_iterations
        task = resmlp_task(config, nc, ctx.seed, min(config.batch_size * steps if steps else RESMLP_ROWS,
                                                     RESMLP_MAX_ROWS))
    else:
        task = nanochat_task(config, nc, ctx.seed)
    L = task.n_blocks
    static_depth = config.static_depth or max(L // 2, 1)
    time_only = ctx.budget.max_iterations is None and ctx.budget.target_flops is None
    if time_only and "full_update" not in config.schedules and (config.freeze_start_frac or config.final_full_frac):
        raise UserError("a time-only budget resolves --freeze-start-frac/--final-full-frac against full_update's "
                        "steps: add full_update to --schedules or set both to 0")
    for name in config.schedules:  # bad schedule flags fail here, before anything trains
        make_schedule(name, L, 1, static_depth=static_depth, config=config)

    depths = {L}
    if "static_suffix" in config.schedules:
        depths.add(static_depth)
    if {"dynamic_suffix", "progressive"} & set(config.schedules):
        depths.update(allowed_levels(config, L))
    variants: dict[Any, Callable] = {k: tag_step(task.make_step(k, None)) for k in sorted(depths)}
    if "dynamic_suffix" in config.schedules:
        variants[PROBE] = tag_step(task.make_step(L, config.relevance))
    # Compile every variant now (ctx caches them for train), so no schedule's time includes a compilation.
    batch0 = task.batch_fn(0)
    plans = {key: ctx.plan(fn, task.state, batch0) for key, fn in variants.items()}
    planned = plans[L].max_steps

    runs, drivers = {}, {}
    for name in config.schedules:
        total = planned if planned is not None else runs["full_update"].steps if "full_update" in runs else None
        drivers[name] = Driver(make_schedule(name, L, total, static_depth=static_depth, config=config), task.eval_fn)
        state = {**task.state, "total_steps": jnp.asarray(planned or 0, jnp.int32)}
        runs[name] = ctx.train(name, variants, state, task.batch_fn, eval_fn=drivers[name].evaluate,
                               eval_every=config.eval_every, choose=drivers[name].choose)
    step_ms = time_variants(ctx, variants, task.state, batch0, config.timing_rounds) if config.timing_rounds else {}
    return report(config, ctx, task, {k: p.flops_per_step for k, p in plans.items()}, step_ms, runs, drivers,
                  planned)


# --- the result table ----------------------------------------------------------------------------------------

def report(config: Config, ctx, task: Task, variant_flops: dict, step_ms: dict, runs: dict, drivers: dict,
           planned: int | None) -> Results:
    L = task.n_blocks
    per_schedule = {}
    for name, r in runs.items():
        samples = r.step_ms.samples_ms
        per_schedule[name] = {
            **drivers[name].schedule.summary(), "steps": r.steps, "stopped_by": r.stopped_by,
            "val_loss": r.evals[-1][1]["val_loss"], "final_eval": r.evals[-1][1], "final_train_loss": r.final_loss,
            "mean_ms_per_step": float(np.mean(samples)) if samples else 1e3 * r.wall_s / max(r.steps, 1),
            "wall_s": r.wall_s, "spent_flops": r.spent_flops, "variant_steps": r.variant_steps}
    best_ms = {str(key): min(samples) for key, samples in step_ms.items()}
    full = per_schedule.get("full_update")
    for e in per_schedule.values():
        e["flops_per_step"] = e["spent_flops"] / e["steps"]
        e["timed_ms_per_step"] = (sum(n * best_ms[k] for k, n in e["variant_steps"].items()) / e["steps"]
                                  if best_ms else None)
    for e in per_schedule.values():
        for speedup, cost in (("speedup_ms_per_step", "mean_ms_per_step"), ("speedup_wall", "wall_s"),
                              ("speedup_timed_depths", "timed_ms_per_step"), ("flops_speedup", "flops_per_step")):
            e[speedup] = full[cost] / e[cost] if full and e[cost] else None
        e["gap_vs_full_pct"] = 100 * (e["val_loss"] / full["val_loss"] - 1) if full else None
    # Time to quality: when each schedule's evals first reached full_update's final val loss (interpolated).
    ttq_rows = []
    if full:
        for name, r in runs.items():
            q = time_to_quality(r.eval_points, full["val_loss"], "val_loss", config.eval_every or None)
            e = per_schedule[name]
            e["time_to_full_final"] = q
            base_q = per_schedule["full_update"]["time_to_full_final"]
            for clock in ("train_s", "wall_s"):
                e[f"speedup_to_full_final_{clock}"] = (base_q[clock] / q[clock] if q["reached"] and base_q["reached"]
                                                       and q[clock] else None)
            # Equal time: this schedule's final val loss against full_update's at the same training seconds.
            full_then = value_at(runs["full_update"].eval_points, "train_s", r.eval_points[-1].train_s)
            e["gap_equal_time_pct"] = 100 * (e["val_loss"] / full_then - 1) if full_then else None
            ttq_rows.append([name, q["reached"], q["steps"], q["flops"], q["train_s"], q["wall_s"],
                             e["speedup_to_full_final_train_s"], e["speedup_to_full_final_wall_s"],
                             e["gap_equal_time_pct"]])

    rows = [[name, e["steps"], e["val_loss"], e["mean_ms_per_step"], e["speedup_ms_per_step"], e["speedup_wall"],
             e["speedup_timed_depths"], e["flops_speedup"], e["gap_vs_full_pct"], e["spent_flops"],
             e["n_probes"], e["mean_active_depth"]] for name, e in per_schedule.items()]
    schedule_table = Table(
        f"Block-update schedules ({config.model}, L={L}, same budget)",
        ["schedule", "steps", "val loss", "ms/step", "speedup", "speedup (wall)", "speedup (timed depths)",
         "FLOPs speedup", "gap vs full (%)", "FLOPs", "probes", "mean depth"], rows,
        note="ms/step: mean over timed steps (warm-up excluded); speedup: full's mean ms/step over this one's; "
             "speedup (wall): full's training wall time over this one's (evals and compilation excluded); speedup "
             "(timed depths): the same ratio for the schedule's steps priced at each depth's interleaved time (see "
             "the next table; robust to load that changes between the runs); FLOPs speedup: full's FLOPs per step "
             "over this one's; gap: "
             "relative val-loss difference to full_update; FLOPs: sum over steps of each step's compiled-variant "
             "FLOPs (mgr.flops).")

    measured = {key: rec for r in runs.values() for key, rec in r.flops_records.items()}
    full_ms = best_ms.get(str(L))
    per_depth, depth_rows = {}, []
    for key, flops in variant_flops.items():
        k = L if key == PROBE else key
        rec = measured.get(str(key))
        per_depth[str(key)] = entry = {
            "active_blocks": k, "flops": flops, "ratio_to_full": flops / variant_flops[L],
            "matmul_flops_measured": rec.matmul_flops if rec else None, "matmul_flops_analytic": task.matmul_flops(k),
            "analytic_ratio_to_full": task.matmul_flops(k) / task.matmul_flops(L),
            "steps_run": sum(r.variant_steps.get(str(key), 0) for r in runs.values()),
            "best_ms": best_ms.get(str(key))}
        entry["ms_ratio_to_full"] = entry["best_ms"] / full_ms if best_ms else None
        depth_rows.append([key] + [entry[c] for c in (
            "flops", "ratio_to_full", "matmul_flops_measured", "matmul_flops_analytic", "analytic_ratio_to_full",
            "steps_run", "best_ms", "ms_ratio_to_full")])
    depth_table = Table(
        "FLOPs per step by active depth k", ["k", "FLOPs/step (XLA)", "ratio to full", "matmul FLOPs (jaxpr)",
                                             "matmul FLOPs (analytic)", "analytic ratio", "steps run",
                                             "ms/step (best, interleaved)", "time ratio"],
        depth_rows, note=f"{task.flops_formula} 'probe' is the full-depth step that also returns per-block "
                         "relevance. FLOPs/step: the compiled variant's optimised HLO priced by mgr.flops (what the "
                         "budget charges); matmul FLOPs: exact dot count of the variants that ran; ms/step: "
                         f"fastest of {config.timing_rounds} calls of each variant, the variants called in turn "
                         "after training.")

    tables = [schedule_table, depth_table]
    if ttq_rows:
        tables.insert(1, Table(
            f"Time to full_update's final val loss ({fmt(full['val_loss'])})",
            ["schedule", "reached", "steps", "FLOPs", "train s", "wall s", "speedup (train s)", "speedup (wall s)",
             "gap at equal time (%)"],
            ttq_rows, note="Interpolated between the first eval at or below the target and the one before (linear "
                           "in log-loss, mgr.quality); --eval-every sets the resolution (0: only the final eval, so "
                           "a schedule either reaches it at its end or not at all). train s: evals and compilation "
                           "excluded; wall s: everything since the schedule started training. Gap at equal time: "
                           "this schedule's final val loss vs full_update's at the same training seconds "
                           "(interpolated between its evals)."))
    _plots(ctx, L, runs, drivers)
    notes = [
        "choose(step, last_metrics) sees the metrics of step-2 (step-1 right after an eval): the harness reads them "
        "one step late, so the dynamic schedule acts on relevance and losses a step or two old.",
        f"planned steps for the LR warm-down and the warm-up/recovery fractions: {planned or 'from full_update'}; "
        "cheaper schedules run past it under a FLOPs or time budget (at full depth).",
    ]
    metrics = {"model": config.model, "n_blocks": L, "planned_steps": planned, "schedules": per_schedule,
               "per_depth": per_depth}
    return Results(metrics=metrics, tables=tables, notes=notes)


def _plots(ctx, L: int, runs: dict, drivers: dict) -> None:
    timelines = {name: d.schedule.timeline for name, d in drivers.items()}
    probes = {f"{name} probes": ([s for s, _, p in tl if p], [L for _, _, p in tl if p])
              for name, tl in timelines.items() if any(p for _, _, p in tl)}
    plot_curves(ctx.plot_path("active_depth.png"),
                {name: ([s for s, _, _ in tl], [d for _, d, _ in tl]) for name, tl in timelines.items()},
                markers=probes, xlabel="step", ylabel="active blocks", title="active depth per step")
    plot_curves(ctx.plot_path("loss_vs_time.png"),
                {name: (drivers[name].done_s(len(r.losses), r.wall_s), r.losses) for name, r in runs.items()},
                markers={f"{name} val": (drivers[name].eval_s, [e["val_loss"] for _, e in r.evals])
                         for name, r in runs.items()},
                xlabel="training seconds (compilation and evals excluded)", ylabel="loss", title="loss vs time")


DEMO = Demo(name="block-update-schedule",
            description="full vs static vs dynamic suffix freezing under one budget: real FLOPs and time saved",
            config=Config, run=run, check=check, kind="demos", topic="block_update_schedule",
            default_max_iterations=60)


def _schedule_tradeoff(results: dict) -> dict[str, dict]:
    """One seed's schedules as points of the sweep's Pareto study, each paired in-process with full_update."""
    return {name: {"group": name, "speedup": e["speedup_timed_depths"], "gap_pct": e["gap_vs_full_pct"],
                   "speedup_to_full_final": e.get("speedup_to_full_final_train_s"),
                   "gap_equal_time_pct": e.get("gap_equal_time_pct"), "mean_depth": e["mean_active_depth"]}
            for name, e in (results.get("schedules") or {}).items() if name != "full_update"}


register_section(DEMO.name, lambda report: tradeoff_section(
    report, _schedule_tradeoff, title="Speedup (timed depths) vs val-loss gap to full_update, over seeds",
    reference_group="static_suffix", plot_file="schedules_tradeoff.png"))
