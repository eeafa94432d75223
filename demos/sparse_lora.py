"""sparse-lora: LoRA fine-tuning whose FFN runs only the channels an SVD estimator predicts, measured honestly.

A nanochat base model (``--base <nanochat run dir>``, or pretrained here for --pretrain-steps on --pretrain-data) is
fine-tuned on another distribution (by default the synthetic language with another seed: other words, another
transition matrix, an exact entropy floor). Variants, same batches, same seed, same budget, each through ctx.train:

* ``full_ft``: every weight trained (6N FLOPs per token);
* ``lora``: rank-r adapters on the frozen base (mgr.methods.lora; ~4N per token);
* ``sparse_lora@s``: LoRA whose MLPs run only the (1 - s)·F hidden channels the SVD estimator picks per batch
  (mgr.methods.sparse_ffn), dense for the first --sparse-warmup-ratio of the steps;
* ``random@s``: the same, channels drawn at random per batch: does the estimator beat chance?

Every variant runs the same block-by-block forward (``Forward``, a Python loop over the layers so each layer has its
own static kept-channel count), so layout differences between variants do not pollute the comparison. The fine-tuned
models are evaluated dense (the adapters are what is trained; sparsity only makes the training step cheaper).

Times: the step executables that trained, called in turn ``--timing-rounds`` times after training (interleaved, so
load on a shared machine hits every variant alike); speedup is dense LoRA's median over the variant's. The
break-even sweep times sparse steps over --sweep-sparsities x --sweep-ranks against dense LoRA the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mgr.demo import Demo
from mgr.errors import UserError
from mgr.methods import lora
from mgr.methods import sparse_ffn as sf
from mgr.plots import plot_curves
from mgr.results import Results, Table
from mgr.timing import interleaved
from nanochat import train as nanochat
from nanochat.checkpoint import read_meta, restore_arrays
from nanochat.model import RECIPES, GPTConfig, loss_fn, rms_norm
from nanochat.tokenizer import load_tokenizer

TARGETS = {"q": ("attn", "c_q"), "k": ("attn", "c_k"), "v": ("attn", "c_v"), "o": ("attn", "c_proj"),
           "fc": ("mlp", "c_fc"), "proj": ("mlp", "c_proj")}


@dataclass
class Config:
    base: str | None = field(default=None, metadata={
        "help": "nanochat run directory (or checkpoint step dir) to fine-tune; None: pretrain one here"})
    depth: int = field(default=2, metadata={"help": "depth of the model pretrained here (width 64·depth)"})
    sequence_len: int = field(default=128, metadata={"help": "tokens per row"})
    batch_size: int = field(default=8, metadata={"help": "rows per step"})
    pretrain_steps: int = field(default=200, metadata={"help": "steps of pretraining when no --base is given"})
    pretrain_data: str = field(default="synthetic:seed=0", metadata={"help": "pretraining data (nanochat --data)"})
    data: str = field(default="synthetic:seed=1", metadata={"help": "fine-tuning data (nanochat --data)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of pretraining and full fine-tuning"})
    lora_lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the adapters"})
    lora_rank: int = field(default=8, metadata={"help": "adapter rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "adapter scale alpha (update = alpha/r · x A B)"})
    lora_targets: tuple[str, ...] = field(default=tuple(TARGETS), metadata={
        "help": "adapted projections: attention q,k,v,o and MLP fc,proj"})
    ffn_sparsity: tuple[float, ...] = field(default=(0.5, 0.75), metadata={
        "help": "MLP sparsities of the sparse LoRA variants (fraction of hidden channels skipped), in [0, 1)"})
    layer_sparsity: dict[str, float] = field(default_factory=dict, metadata={
        "help": "per-layer sparsity overriding --ffn-sparsity, e.g. layer.0=0,layer.1=0.8 (0: dense layer)"})
    svd_rank: int = field(default=16, metadata={"help": "rank of the estimator's truncated SVD of W_fc"})
    sparse_warmup_ratio: float = field(default=0.1, metadata={
        "help": "fraction of the planned steps a sparse variant runs dense first"})
    random_control: bool = field(default=True, metadata={
        "help": "also train random channels at the highest --ffn-sparsity"})
    sweep_sparsities: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 0.9), metadata={
        "help": "break-even sweep: sparsities timed against dense LoRA (empty: no sweep)"})
    sweep_ranks: tuple[int, ...] = field(default=(4, 16, 64), metadata={"help": "break-even sweep: SVD ranks"})
    timing_rounds: int = field(default=10, metadata={"help": "interleaved timed calls per step after training"})
    eval_tokens: int = field(default=8192, metadata={"help": "validation tokens"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype (params fp32); auto = bf16 on GPU",
                                                 "choices": ("auto", "float32", "bfloat16")})


def nanochat_config(config: Config, data: str, lr: float) -> nanochat.Config:
    """The base's nanochat config: the classic recipe, whose plain pre-norm block the block-by-block forward and
    the exact step FLOPs below are written for."""
    return nanochat.Config(depth=config.depth, sequence_len=config.sequence_len, batch_size=config.batch_size,
                           lr=lr, eval_tokens=config.eval_tokens, data=data, dtype=config.dtype, eval_every=0,
                           recipe="classic")


def check_config(config: Config) -> None:
    for name in ("depth", "sequence_len", "batch_size", "pretrain_steps", "lora_rank", "svd_rank", "eval_tokens"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.timing_rounds < 0:
        raise UserError(f"--timing-rounds must be >= 0, got {config.timing_rounds}")
    if not config.lr > 0 or not config.lora_lr > 0 or not config.lora_alpha > 0:
        raise UserError("--lr, --lora-lr and --lora-alpha must be positive")
    unknown = sorted(set(config.lora_targets) - set(TARGETS))
    if unknown or not config.lora_targets:
        raise UserError(f"--lora-targets must be a non-empty subset of {','.join(TARGETS)}, got "
                        f"{','.join(config.lora_targets) or 'nothing'}")
    for s in config.ffn_sparsity:
        sf.check_sparsity(s, "--ffn-sparsity")
    for s in config.sweep_sparsities:
        sf.check_sparsity(s, "--sweep-sparsities")
    for name, s in config.layer_sparsity.items():
        sf.check_sparsity(s, f"--layer-sparsity {name}")
    if not 0 <= config.sparse_warmup_ratio < 1:
        raise UserError(f"--sparse-warmup-ratio must lie in [0, 1), got {config.sparse_warmup_ratio}")


def layer_plan(config: Config, n_layer: int, hidden: int, sparsity: float) -> tuple[int | None, ...]:
    """Kept hidden channels per layer (None: dense) at the default ``sparsity``, with --layer-sparsity applied."""
    names = {f"layer.{i}": i for i in range(n_layer)}
    unknown = [name for name in config.layer_sparsity if name not in names]
    if unknown:
        raise UserError(f"--layer-sparsity: unknown layer {unknown[0]!r}; layers are layer.0 .. layer.{n_layer - 1}")
    per_layer = [config.layer_sparsity.get(f"layer.{i}", sparsity) for i in range(n_layer)]
    return tuple(None if s == 0 else sf.kept_count(s, hidden) for s in per_layer)


# --- the model: a frozen base with adapters, one forward for every variant --------------------------------------

class Forward:
    """The GPT's forward block by block (``loss_fn`` calls it like the model), every layer's MLP dense or restricted
    to the channels chosen for it: by the SVD estimator (``selector="svd"``) or at random. ``recalls``, if a list,
    collects each sparse layer's recall of the true top channels."""

    def __init__(self, model, plan, selector: str, est: dict, key: jax.Array, recalls: list | None = None):
        self.model, self.plan, self.selector, self.est, self.key, self.recalls = \
            model, plan, selector, est, key, recalls

    def __call__(self, idx_BT: jax.Array, *, n_frozen: int = 0) -> jax.Array:
        m = self.model
        x_BTD, cos_sin = m._embed(idx_BT, jnp.arange(idx_BT.shape[1]))
        graphdef, state = m._block_state()
        for i, keep in enumerate(self.plan):
            block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            a_BTD, _ = block.attn(rms_norm(x_BTD), cos_sin, implementation=m.attention)
            x_BTD = x_BTD + a_BTD
            x_BTD = x_BTD + self._mlp(block.mlp, rms_norm(x_BTD), i, keep).astype(x_BTD.dtype)
        return m._head((x_BTD, x_BTD, None))  # (residual, x0, backout): the classic block has no x0/backout

    def _mlp(self, mlp, x_BTD, layer: int, keep: int | None):
        if keep is None:
            return mlp(x_BTD)
        hidden = self.est["sv"].shape[-1]
        if self.selector == "svd":
            idx_K = sf.top_channels(sf.predicted_scores(x_BTD, self.est["u"][layer], self.est["sv"][layer]), keep)
        else:
            idx_K = sf.random_channels(jax.random.fold_in(self.key, layer), hidden, keep)
        if self.recalls is not None:
            true_F = sf.channel_scores(sf.relu_squared(lora.restricted_linear(mlp.c_fc, x_BTD)))
            self.recalls.append(sf.recall(idx_K, true_F))
        return sf.sparse_mlp(x_BTD, mlp.c_fc, mlp.c_proj, idx_K)


def estimator_state(model, rank: int) -> dict:
    """The SVD factors of every layer's frozen up-projection, computed once: u [L, D, r], sv [L, r, F]."""
    mlp = model.blocks.mlp
    fc = mlp.c_fc.base if isinstance(mlp.c_fc, lora.LoRALinear) else mlp.c_fc
    u, sv = sf.svd_factors(fc.kernel[...], rank)
    return {"u": u, "sv": sv}


def make_step(graphdef, tx, plan, selector: str, seed: int):
    """Pure step over {"train", "frozen", "est", "opt", "step"}: the gradient of the trainable part only."""
    def step(state, batch):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])

        def loss_of(train):
            model = nnx.merge(graphdef, train, state["frozen"])
            return loss_fn(Forward(model, plan, selector, state["est"], key), batch["inputs_BT"],
                           batch["targets_BT"])[0]

        loss, grads = jax.value_and_grad(loss_of)(state["train"])
        updates, opt = tx.update(grads, state["opt"], state["train"])
        train = jax.tree.map(jnp.add, state["train"], updates)
        return {**state, "train": train, "opt": opt, "step": state["step"] + 1}, {"loss": loss}
    return step


# --- exact matmul FLOPs ---------------------------------------------------------------------------------------

def step_flops(cfg: GPTConfig, plan, *, full: bool, targets=(), rank: int = 0, svd_rank: int = 0) -> dict:
    """Matmul FLOPs per token of one training step, split by part; the jaxpr count of the step must match.

    A linear layer is priced by mgr.methods.lora.linear_step_flops: it needs an input gradient only when its input
    depends on something trained. Under LoRA the residual stream entering layer 0 does not (the embedding is
    frozen), so layer 0's q/k/v base matmuls have no backward at all; from the first adapter on every base matmul
    has an input gradient and none has a weight gradient (4·d_in·d_out per token instead of 6). Attention scores:
    forward QK^T and PV (2·T·H·K each per token, full T^2), backward dP and dV, dQ, dK only for the sides that carry
    a gradient. The estimator runs forward only, 2r(D + F) per sparse layer; the MLP of a sparse layer has
    d_hidden = kept channels.
    """
    D, H, G, K, T, V = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.sequence_len, cfg.vocab_size
    F = 4 * D
    parts = dict.fromkeys(("estimator", "ffn", "attention", "lora", "head"), 0.0)

    def linear(part, name, d_in, d_out, grad_in):
        r = rank if name in targets else 0
        base = lora.linear_step_flops(d_in, d_out, input_grad=grad_in, weight_grad=full)
        parts[part] += base
        parts["lora"] += lora.linear_step_flops(d_in, d_out, input_grad=grad_in, weight_grad=full, rank=r) - base
        return grad_in or full or bool(r)

    grad = full  # does the residual stream carry a gradient? (the embedding is trained only under full_ft)
    for keep in plan:
        kept = F if keep is None else keep
        q, k, v = (linear("attention", n, D, d, grad) for n, d in (("q", H * K), ("k", G * K), ("v", G * K)))
        score = 2.0 * T * H * K
        parts["attention"] += 2 * score + score * ((q or k) + q + k + v)
        grad = linear("attention", "o", H * K, D, q or k or v) or grad
        h = linear("ffn", "fc", D, kept, grad)
        grad = linear("ffn", "proj", kept, D, h) or grad
        if keep is not None:
            parts["estimator"] += sf.estimator_flops(D, F, svd_rank)
    parts["head"] += lora.linear_step_flops(D, V, input_grad=grad, weight_grad=full)
    return {**parts, "total": sum(parts.values())}


# --- the run ----------------------------------------------------------------------------------------------------

def _budget(ctx, steps: int):
    """ctx.train charges ctx.budget; pretraining runs its own step count, so it is swapped in for that call."""
    saved = ctx.budget
    ctx.budget = dataclasses.replace(saved, max_iterations=steps, target_flops=None, time_budget=None)
    return saved


def base_model(config: Config, ctx, tokenizer) -> tuple[Any, str]:
    """(GPT, description): restored from --base, or pretrained here on --pretrain-data."""
    nc = nanochat_config(config, config.pretrain_data, config.lr)
    if config.base:
        root, step, meta = read_meta(config.base)
        cfg = GPTConfig(**meta["model"])
        classic = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
        if any(getattr(cfg, k) != classic[k] for k in RECIPES["current"]):
            raise UserError(f"--base {config.base}: sparse-lora needs a --recipe classic base model")
        if cfg.vocab_size != tokenizer.vocab_size:
            raise UserError(f"--base {config.base}: vocabulary {cfg.vocab_size} differs from the byte tokenizer's "
                            f"{tokenizer.vocab_size}")
        nc = dataclasses.replace(nc, optimizer_type=meta.get("optimizer_type", "adamw"))
        model = nanochat.build_model(nc, cfg, ctx.seed)
        _, params = nnx.split(model, nnx.Param)
        restored = restore_arrays(root, step, nanochat.init_state(params, nanochat.make_optimizer(nc, params)))
        nnx.update(model, restored["params"])
        return model, f"{config.base} (step {step})"
    train, val = nanochat.build_data(nc, ctx.seed, tokenizer)
    cfg = nanochat.model_config(nc, train.vocab_size)
    model = nanochat.build_model(nc, cfg, ctx.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = nanochat.make_optimizer(nc, params)
    saved = _budget(ctx, config.pretrain_steps)
    try:
        result = ctx.train("pretrain", nanochat.make_train_step(graphdef, tx, nc), nanochat.init_state(params, tx),
                           train, eval_fn=nanochat.make_eval(graphdef, val))
    finally:
        ctx.budget = saved
    nnx.update(model, result.state["params"])
    return model, f"pretrained here: {config.pretrain_steps} steps on {config.pretrain_data}, " \
                  f"val loss {result.evals[-1][1]['val_loss']:.4f}"


class Setup:
    """Everything the fine-tuning variants share: data, the two models' graphs and initial states, evaluation."""

    def __init__(self, config: Config, ctx, model, tokenizer):
        nc = nanochat_config(config, config.data, config.lr)
        self.train, val = nanochat.build_data(dataclasses.replace(nc, sequence_len=model.cfg.sequence_len), ctx.seed,
                                              tokenizer)
        self.cfg = model.cfg
        self.floor = self.train.entropy_rate
        # full fine-tuning: every Param of a copy of the base
        full_model = nnx.clone(model)
        self.full_graph, full_params, full_rest = nnx.split(full_model, nnx.Param, ...)
        self.full_tx = nanochat.make_optimizer(nc, full_params)
        self.full_state = {"train": full_params, "frozen": full_rest, "est": {}, "opt": self.full_tx.init(full_params),
                           "step": jnp.zeros((), jnp.int32)}
        # LoRA: adapters on the base; the base kernels become constants of the step
        lora_model = nnx.clone(model)
        lora.add_adapters(lora_model.blocks, [TARGETS[t] for t in config.lora_targets], rank=config.lora_rank,
                          alpha=config.lora_alpha, rngs=nnx.Rngs(ctx.seed + 1))
        self.lora_graph, adapters, frozen = nnx.split(lora_model, lora.Adapter, ...)
        self.lora_tx = nanochat.make_optimizer(dataclasses.replace(nc, lr=config.lora_lr), adapters)
        self.est_by_rank = {r: estimator_state(lora_model, r) for r in {config.svd_rank, *config.sweep_ranks}}
        self.lora_state = {"train": adapters, "frozen": frozen, "est": self.est_by_rank[config.svd_rank],
                           "opt": self.lora_tx.init(adapters), "step": jnp.zeros((), jnp.int32)}
        self.val = val
        self._evals = {"full": nanochat.make_eval(nnx.split(full_model)[0], val),
                       "lora": nanochat.make_eval(nnx.split(lora_model)[0], val)}

    def evaluate(self, kind: str, state: dict) -> dict:
        """Val loss and bits per byte of the fine-tuned model, evaluated dense with its adapters unmerged."""
        return self._evals[kind]({"params": nnx.merge_state(state["train"], state["frozen"])})


def model_config(config: Config, tokenizer) -> GPTConfig:
    """The base model's shape, known before anything trains, so bad ranks and layer names fail first."""
    if config.base:
        _, _, meta = read_meta(config.base)
        return GPTConfig(**meta["model"])
    return nanochat.model_config(nanochat_config(config, config.pretrain_data, config.lr), tokenizer.vocab_size)


def check_shapes(config: Config, cfg: GPTConfig) -> dict[str, tuple]:
    """Validate ranks and layer names against the model; the per-variant layer plans."""
    D, F = cfg.n_embd, 4 * cfg.n_embd
    for r in (config.svd_rank, *config.sweep_ranks):
        sf.check_rank(r, D, F)
    smallest = min(D, cfg.n_kv_head * cfg.head_dim)
    if config.lora_rank > smallest:
        raise UserError(f"--lora-rank must be <= {smallest} (the smallest adapted dimension), got {config.lora_rank}")
    variants = {"full_ft": ("full", (None,) * cfg.n_layer, "svd"), "lora": ("lora", (None,) * cfg.n_layer, "svd")}
    for s in config.ffn_sparsity:
        variants[f"sparse_lora@{s:g}"] = ("lora", layer_plan(config, cfg.n_layer, F, s), "svd")
    if config.random_control and config.ffn_sparsity:
        s = max(config.ffn_sparsity)
        variants[f"random@{s:g}"] = ("lora", layer_plan(config, cfg.n_layer, F, s), "random")
    return variants


def phase(warm: int | None):
    """``choose`` for ctx.train: the dense step for the first ``warm`` steps, then the sparse one (None: dense only;
    under a time-only budget ``warm`` is resolved against dense LoRA's step count, as it trains first)."""
    return lambda step, last: "dense" if warm is None or step < warm else "sparse"


def run(config: Config, ctx) -> Results:
    check_config(config)
    tokenizer = load_tokenizer("byte")
    variants = check_shapes(config, model_config(config, tokenizer))
    model, base_desc = base_model(config, ctx, tokenizer)
    setup = Setup(config, ctx, model, tokenizer)
    cfg = setup.cfg
    kinds = {"full": (setup.full_graph, setup.full_tx, setup.full_state),
             "lora": (setup.lora_graph, setup.lora_tx, setup.lora_state)}
    steps = {name: make_step(kinds[kind][0], kinds[kind][1], plan, selector, ctx.seed)
             for name, (kind, plan, selector) in variants.items()}
    batch0 = setup.train(0)
    planned = ctx.plan(steps["lora"], setup.lora_state, batch0).max_steps
    for name, (kind, _, _) in variants.items():  # compiled now (ctx caches them), so no compile lands in a step time
        ctx.compile(steps[name], kinds[kind][2], batch0)

    runs = {}
    for name, (kind, plan, _) in variants.items():
        dense = steps["full_ft" if kind == "full" else "lora"]
        fns = {"dense": dense} if steps[name] is dense or all(k is None for k in plan) else \
            {"dense": dense, "sparse": steps[name]}
        total = planned if planned is not None else runs["lora"].steps
        warm = math.ceil(config.sparse_warmup_ratio * total) if "sparse" in fns else None
        # Every variant syncs per step (a choose function), so no variant's step times read differently.
        runs[name] = ctx.train(name, fns, kinds[kind][2], setup.train,
                               eval_fn=lambda st, kind=kind: setup.evaluate(kind, st), choose=phase(warm))

    calls = {name: (ctx.compile(steps[name], kinds[kind][2], batch0)[0], kinds[kind][2], batch0)
             for name, (kind, _, _) in variants.items()}
    sweep = {}
    for r in config.sweep_ranks:
        state = {**setup.lora_state, "est": setup.est_by_rank[r]}
        for s in config.sweep_sparsities:
            plan = (sf.kept_count(s, 4 * cfg.n_embd),) * cfg.n_layer
            fn = make_step(setup.lora_graph, setup.lora_tx, plan, "svd", ctx.seed)
            exe, record = ctx.compile(fn, state, batch0)
            sweep[(r, s)] = {"plan": plan, "record": record}
            calls[f"sweep r={r} s={s:g}"] = (exe, state, batch0)
    timings = interleaved(calls, config.timing_rounds) if config.timing_rounds else {}

    recalls = {}
    for name, (kind, plan, selector) in variants.items():
        if any(k is not None for k in plan):
            recalls[name] = _recall(setup.lora_graph, plan, selector, ctx.seed)(
                runs[name].state, {k: v[0] for k, v in setup.val.items()})
    return report(config, ctx, setup, variants, runs, timings, sweep, recalls, base_desc, planned)


def _recall(graphdef, plan, selector: str, seed: int):
    """Mean recall (over the sparse layers) of the true top channels, for one validation batch."""
    @jax.jit
    def recall(state, batch):
        found: list = []
        model = nnx.merge(graphdef, state["train"], state["frozen"])
        Forward(model, plan, selector, state["est"], jax.random.key(seed), found)(batch["inputs_BT"])
        return jnp.mean(jnp.stack(found))
    return lambda state, batch: float(recall(state, batch))


# --- the result tables ----------------------------------------------------------------------------------------

def report(config, ctx, setup, variants, runs, timings, sweep, recalls, base_desc, planned) -> Results:
    cfg, tokens = setup.cfg, config.batch_size * setup.cfg.sequence_len
    floor = setup.floor.doc_bits_per_byte if setup.floor else None
    lora_ms = timings["lora"].median_ms if timings else None
    per_variant, rows, split_rows = {}, [], []
    for name, (kind, plan, selector) in variants.items():
        r = runs[name]
        key = "sparse" if "sparse" in r.flops_records else "dense"
        rec, lora_rec = r.flops_records[key], runs["lora"].flops_records["dense"]
        analytic = step_flops(cfg, plan, full=kind == "full", targets=config.lora_targets if kind == "lora" else (),
                              rank=config.lora_rank, svd_rank=config.svd_rank if selector == "svd" else 0)
        t = timings.get(name)
        ev = r.evals[-1][1]
        speedup = lora_ms / t.median_ms if t else None
        ideal = lora_rec.flops / rec.flops
        e = per_variant[name] = {
            "val_loss": ev["val_loss"], "val_bpb": ev.get("val_bpb"),
            "gap_to_floor_bpb": None if floor is None or ev.get("val_bpb") is None else ev["val_bpb"] - floor,
            "loss_vs_lora_pct": None, "step_ms": t.to_dict() if t else None, "speedup_vs_lora": speedup,
            "flops_per_token_analytic": analytic, "matmul_flops_per_token_measured": rec.matmul_flops / tokens,
            "flops_per_token_xla": rec.flops / tokens, "ideal_speedup": ideal,
            "delivered_over_ideal": None if speedup is None else speedup / ideal,
            "peak_memory_gb": ctx.train_summaries[name]["peak_memory_gb"],
            "trainable_params": sum(x.size for x in jax.tree.leaves(r.state["train"])),
            "recall": recalls.get(name), "steps": r.steps, "variant_steps": r.variant_steps,
            "kept_channels": [4 * cfg.n_embd if k is None else k for k in plan]}
        rows.append([name, e["val_loss"], e["val_bpb"], e["gap_to_floor_bpb"],
                     f"{t.median_ms:.4g} ({t.p10_ms:.4g}–{t.p90_ms:.4g})" if t else None, speedup, ideal,
                     e["delivered_over_ideal"], e["trainable_params"], e["recall"], e["peak_memory_gb"]])
        split_rows.append([name, *(analytic[p] for p in ("estimator", "ffn", "attention", "lora", "head", "total")),
                           e["matmul_flops_per_token_measured"], e["flops_per_token_xla"]])
    for e in per_variant.values():
        e["loss_vs_lora_pct"] = 100 * (e["val_loss"] / per_variant["lora"]["val_loss"] - 1)
    for row, e in zip(rows, per_variant.values()):
        row.insert(2, e["loss_vs_lora_pct"])

    main = Table(
        f"Fine-tuning variants (d{cfg.n_layer}, D={cfg.n_embd}, T={cfg.sequence_len}, B={config.batch_size}, "
        f"same batches and budget)",
        ["variant", "val loss", "vs LoRA (%)", "val bpb", "gap to floor (bpb)", "ms/step median (p10–p90)",
         "speedup vs LoRA", "ideal (FLOPs)", "delivered/ideal", "trainable", "recall", "peak GB"], rows,
        note=f"Val loss/bpb: the fine-tuned model evaluated dense after the budget; floor: the synthetic language's "
             f"entropy ({'n/a' if floor is None else f'{floor:.4f} bpb'}). ms/step: the trained step executables "
             f"called in turn {config.timing_rounds} times after training (interleaved; a sparse variant's sparse "
             "step). ideal: dense LoRA's XLA FLOPs per step over this step's (mgr.flops); delivered/ideal: measured "
             "speedup over ideal (1 = time fell as FLOPs did). recall: fraction of the true top-k channels (by the "
             "L2 norm of the real hidden activations, adapters included) that the selector kept, on one "
             "validation batch, mean over sparse layers.")
    split = Table(
        "Matmul FLOPs per token of one training step",
        ["variant", "estimator", "FFN", "attention", "LoRA", "head", "total (analytic)", "total (jaxpr, measured)",
         "XLA (measured)"], split_rows,
        note="Analytic: demos.sparse_lora.step_flops (attention = q/k/v/o projections + scores with the full T² "
             "matrix; LoRA = the adapters' own matmuls). Measured: mgr.flops on the compiled step (jaxpr dot count; "
             "XLA cost analysis, elementwise work included). LoRA ≈ 4N + adapters: base matmuls get input "
             "gradients but no weight gradients, and layer 0's q/k/v (their input is frozen) no backward at all.")
    tables = [main, split]
    metrics = {"base": base_desc, "model": dataclasses.asdict(cfg), "tokens_per_step": tokens,
               "planned_steps": planned, "entropy_floor_bpb": floor, "variants": per_variant}
    notes = [f"base model: {base_desc}.",
             f"sparse variants run dense for their first ceil({config.sparse_warmup_ratio} x "
             f"{planned or 'dense LoRA steps'}) steps (--sparse-warmup-ratio); kept channels per layer: "
             + "; ".join(f"{n} {e['kept_channels']}" for n, e in per_variant.items() if n.startswith(("sparse",
                                                                                                       "random")))
             + ".",
             "The kept channels are gathered (kernel columns/rows and the adapters' hidden-side factors) and "
             "multiplied densely: no mask anywhere. One channel set per layer per batch."]
    if sweep and timings:
        tables.append(_sweep(config, ctx, sweep, timings, per_variant, tokens, lora_ms, metrics, notes))
    return Results(metrics=metrics, tables=tables, notes=notes)


def _sweep(config, ctx, sweep, timings, per_variant, tokens, lora_ms, metrics, notes) -> Table:
    lora_flops = per_variant["lora"]["flops_per_token_xla"] * tokens
    rows, out, curves = [], [], {}
    for (r, s), entry in sweep.items():
        t = timings[f"sweep r={r} s={s:g}"]
        ideal = lora_flops / entry["record"].flops
        speedup = lora_ms / t.median_ms
        out.append({"svd_rank": r, "sparsity": s, "step_ms": t.to_dict(), "speedup_vs_lora": speedup,
                    "ideal_speedup": ideal, "delivered_over_ideal": speedup / ideal,
                    "flops_per_token_xla": entry["record"].flops / tokens})
        rows.append([r, s, f"{t.median_ms:.4g} ({t.p10_ms:.4g}–{t.p90_ms:.4g})", speedup, ideal, speedup / ideal])
        curves.setdefault(f"svd rank {r}", ([], []))
        curves[f"svd rank {r}"][0].append(s)
        curves[f"svd rank {r}"][1].append(t.median_ms)
    sparsities = sorted({s for _, s in sweep})
    breakeven = {}
    for name, (xs, ys) in curves.items():
        breakeven[name] = _crossing(xs, ys, lora_ms)
    lora_t = timings["lora"]
    plot_curves(ctx.plot_path("break_even.png"),
                {**curves, "dense LoRA": (sparsities, [lora_ms] * len(sparsities))},
                bands={"dense LoRA": ([lora_t.p10_ms] * len(sparsities), [lora_t.p90_ms] * len(sparsities))},
                xlabel="FFN sparsity (fraction of hidden channels skipped)", ylabel="ms per training step (median)",
                title="sparse LoRA step time vs dense LoRA")
    metrics["sweep"] = out
    metrics["break_even_sparsity"] = breakeven
    notes.append("break-even sparsity (step time crosses dense LoRA's, linear interpolation): "
                 + "; ".join(f"{k}: {'never in range' if v is None else f'{v:.3g}'}" for k, v in breakeven.items())
                 + ".")
    return Table("Break-even sweep: uniform sparsity x SVD rank, timed against dense LoRA",
                 ["svd rank", "sparsity", "ms/step median (p10–p90)", "speedup vs LoRA", "ideal (FLOPs)",
                  "delivered/ideal"], rows,
                 note="Every layer at the row's sparsity (--layer-sparsity not applied); same interleaved timing "
                      "as the variants table; plots/break_even.png.")


def _crossing(xs, ys, level) -> float | None:
    """The smallest x where ys falls to ``level`` (linear between points; xs ascending), None if it never does."""
    pts = sorted(zip(xs, ys))
    if pts and pts[0][1] <= level:
        return pts[0][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 > level >= y1:
            return x0 + (y0 - level) * (x1 - x0) / (y0 - y1)
    return None


DEMO = Demo(name="sparse-lora",
            description="LoRA vs SVD-estimated sparse-FFN LoRA vs full fine-tuning: loss, FLOPs, measured speedup",
            config=Config, run=run, kind="demos", topic="sparse_lora", default_max_iterations=120)
