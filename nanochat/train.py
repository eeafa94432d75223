"""Fixed-FLOPs training of the nanochat GPT: `python -m nanochat.train ...` is `mgr run nanochat ...`.

The launcher owns the loop and the budget (`--target-flops F` runs ceil(F / measured step FLOPs) steps); this module
builds the model, data, optimizer and the pure train/eval steps, and turns the run into nanochat's report: val bits
per byte, tokens/s, MFU, samples and a loss-vs-FLOPs plot. The step pieces are reused by the block-update demo.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from mgr.demo import Demo
from mgr.errors import UserError
from mgr.mesh import DeviceMesh
from mgr.meta import peak_flops_per_s
from mgr.methods.banded import banded_mlp, mlp_bands, params_from_dense
from mgr.methods.partial import block_relevance, value_and_half_grads
from mgr.plots import plot_curves
from mgr.results import Results, Table
from nanochat.checkpoint import Checkpointer, read_meta, restore_arrays
from nanochat.attention import CHOICES, check_implementation, choose
from nanochat.data import DataSpec, open_source, resolve_data
from nanochat.data.sources import build_source
from nanochat.data.loader import Loader
from nanochat.model import GPT, RECIPES, GPTConfig, estimate_flops, generate, loss_fn

OPTIMIZERS = ("nanochat", "adamw", "muon")
# Polar Express (arXiv:2505.16932) coefficients for 5 iterations, as the reference's Muon uses them.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
from nanochat.tokenizer import bits_per_byte, load_tokenizer


@dataclass
class Config:
    depth: int = field(default=2, metadata={"help": "the one dial: width 64·depth, depth layers, heads of 64/128"})
    sequence_len: int = field(default=256, metadata={"help": "tokens per row"})
    batch_size: int = field(default=16, metadata={"help": "rows per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step (scanned)"})
    recipe: str = field(default="current", metadata={
        "help": "model recipe: current = karpathy/nanochat's gpt.py today (value embeddings, smear, backout, "
                "lambdas, qk scale 1.2, rope 1e5, SSSL windows, vocab padded to 64, its init); classic = the model "
                "before them", "choices": tuple(RECIPES)})
    optimizer_type: str = field(default="auto", metadata={
        "help": "optimizer: nanochat = Muon on block matrices + AdamW per group (the reference's setup_optimizer); "
                "adamw = one AdamW; muon = optax Muon + one AdamW; auto = nanochat (current) / adamw (classic)",
        "choices": ("auto",) + OPTIMIZERS})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate (adamw; embedding and head under muon)"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon learning rate of the block matrices"})
    embedding_lr: float = field(default=0.2, metadata={
        "help": "nanochat optimizer: wte AdamW LR (value embeddings half of it), times (D/768)^-0.5"})
    unembedding_lr: float = field(default=0.004, metadata={
        "help": "nanochat optimizer: lm_head AdamW LR, times (D/768)^-0.5"})
    scalar_lr: float = field(default=0.5, metadata={
        "help": "nanochat optimizer: x0 lambdas LR (resid lambdas 0.01x; smear/backout fixed 0.2)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (Muon matrices under nanochat)"})
    grad_clip: float = field(default=1.0, metadata={"help": "global-norm gradient clip (0 disables)"})
    lr_warmup_steps: int = field(default=0, metadata={
        "help": "linear LR warm-up steps; nanochat uses none (--warmup-steps only excludes steps from timing)"})
    lr_warmdown_frac: float = field(default=0.2, metadata={"help": "final fraction of steps decaying LR linearly"})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR multiplier reached at the end of warm-down"})
    attention_type: str = field(default="auto", metadata={
        "help": "attention kernel (nanochat/attention.py); auto = the fastest correct one for this shape and device, "
                "by an in-process probe (recorded in summary.json under results.attention)", "choices": CHOICES})
    dtype: str = field(default="auto", metadata={"help": "compute dtype (params stay fp32); auto = bf16 on GPU",
                                                 "choices": ("auto", "float32", "bfloat16")})
    scan_layers: bool = field(default=False, metadata={
        "help": "run the blocks as one lax.scan: compile time independent of depth, but a slower step on CPU "
                "(unrolled: 0.77x the CPU time at d2, same numbers); the current recipe's per-layer windows and "
                "value embeddings already split it into per-layer segments"})
    tokenizer: str = field(default="byte", metadata={"help": "'byte' or a directory from nanochat.tokenizer train"})
    data: str | None = field(default=None, metadata={"help": "text/parquet/.bin file, dir or glob; default synthetic"})
    data_format: str = field(default="auto", metadata={"help": "data format",
                                                       "choices": ("auto", "text", "parquet", "bin")})
    auto_download_data: bool = field(default=False, metadata={"help": "download parquet shards into --data-dir"})
    min_parquet_files: int = field(default=0, metadata={"help": "parquet shards needed in --data-dir"})
    data_url: str = field(default=DataSpec.data_url, metadata={"help": "base URL of the parquet shards"})
    data_dir: str = field(default=DataSpec.data_dir, metadata={"help": "where parquet shards live"})
    eval_every: int = field(default=100, metadata={"help": "steps between evals (0: only at the end)"})
    eval_tokens: int = field(default=16384, metadata={"help": "validation tokens per eval"})
    sample_every: int = field(default=0, metadata={"help": "steps between logged samples (0: only at the end)"})
    sample_tokens: int = field(default=64, metadata={"help": "tokens generated per sample"})
    vocab_size: int = field(default=0, metadata={
        "help": "model vocabulary; 0 = the tokenizer's, or for .bin token files with larger ids the largest id + 1"})
    checkpoint: bool = field(default=True, metadata={
        "help": "save an orbax checkpoint at the end of the run and when it is interrupted (--no-checkpoint: none)"})
    checkpoint_every: int = field(default=0, metadata={"help": "also save one every this many steps (0: only "
                                                               "at the end and on interrupt)"})
    resume: str | None = field(default=None, metadata={
        "help": "continue from a run directory's newest checkpoint, or from one step: RUN_DIR/checkpoints/STEP"})
    fc1_bandwidth: int = field(default=0, metadata={
        "help": "banded FC1 (C -> 4C): band width along 4C, density bandwidth/4C (mgr/methods/banded.py); 0 dense"})
    fc2_bandwidth: int = field(default=0, metadata={
        "help": "banded FC2 (4C -> C), the same band transposed; 0 dense"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from the parameters of a checkpoint (e.g. an --init-only run; a dense one converts to "
                "banded by keeping its band); fresh optimizer, step 0"})
    init_only: bool = field(default=False, metadata={
        "help": "write the initial model as checkpoint step 0 of the run directory and stop (the shared "
                "--init-from of a sweep)"})


# --- model, optimizer, steps ------------------------------------------------------------------------------------

def compute_dtype(config: Config) -> str:
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def model_config(config: Config, vocab_size: int) -> GPTConfig:
    return GPTConfig.from_depth(config.depth, vocab_size=vocab_size, sequence_len=config.sequence_len,
                                recipe=config.recipe)


def optimizer_type(config: Config) -> str:
    if config.optimizer_type != "auto":
        return config.optimizer_type
    return "nanochat" if config.recipe == "current" else "adamw"


def resolve_attention(config: Config, cfg: GPTConfig) -> dict[str, Any]:
    """The attention kernel this run uses: the explicit --attention-type, or auto's probed choice (memoised)."""
    if config.attention_type != "auto":
        return {"requested": config.attention_type, "chosen": config.attention_type, "source": "explicit"}
    return choose(config.batch_size, config.sequence_len, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
                  compute_dtype(config))


def build_model(config: Config, cfg: GPTConfig, seed: int, **model_kwargs) -> GPT:
    return GPT(cfg, rngs=nnx.Rngs(seed), dtype=compute_dtype(config), scan_layers=config.scan_layers,
               attention=resolve_attention(config, cfg)["chosen"], **model_kwargs)


def _muon_dims(path, leaf) -> MuonDimensionNumbers | None:
    """Stacked block matrices [L, in, out] are orthogonalised per layer, banded blocks [L, K, in, out] per block."""
    if not any(getattr(k, "key", None) == "blocks" for k in path) or leaf.ndim not in (3, 4):
        return None
    return MuonDimensionNumbers(reduction_axis=(leaf.ndim - 2,), output_axis=(leaf.ndim - 1,))


def _nanochat_group(path, leaf) -> str:
    """The reference's parameter group of a leaf (setup_optimizer); block matrices and the value-embedding gates
    ([n, in, out], the gates live in its blocks) go to Muon."""
    name = getattr(path[0], "key", None)
    if _muon_dims(path, leaf) is not None or name == "ve_gates":
        return "matrix"
    if name in ("smear_gate", "smear_lambda", "backout_lambda"):
        return "smear"
    return {"wte": "embedding", "value_embeds": "value_embeds", "lm_head": "lm_head", "resid_lambdas": "resid",
            "x0_lambdas": "x0"}.get(name, "other")


def _nanochat_optimizer(config: Config, params: Any) -> optax.GradientTransformation:
    """The reference's MuonAdamW: per-group AdamW (eps 1e-10, LRs of embeddings and head scaled by (D/768)^-0.5)
    and Muon (Nesterov 0.95, Polar Express orthogonalisation, no shape rescaling) on the block matrices. Not
    reproduced: its NorMuon variance reduction, row equilibration, Frobenius renormalisation, cautious weight
    decay and the momentum / weight-decay schedules of its training script."""
    scale = (params["wte"]["embedding"].shape[-1] / 768) ** -0.5
    adamw = lambda lr, b1, b2, wd: optax.adamw(lr, b1=b1, b2=b2, eps=1e-10, weight_decay=wd)
    # Every matrix-group leaf stacks matrices in its last two axes ([L, in, out], banded [L, K, in, out]).
    dims = lambda p: jax.tree.map(lambda x: MuonDimensionNumbers(reduction_axis=(x.ndim - 2,),
                                                                 output_axis=(x.ndim - 1,)), p)
    transforms = {
        "matrix": optax.chain(optax.contrib.scale_by_muon(ns_coeffs=POLAR_EXPRESS, ns_steps=5, beta=0.95,
                                                          weight_dimension_numbers=dims),
                              optax.add_decayed_weights(config.weight_decay), optax.scale_by_learning_rate(
                                  config.matrix_lr)),
        "lm_head": adamw(config.unembedding_lr * scale, 0.8, 0.96, 0.01),
        "embedding": adamw(config.embedding_lr * scale, 0.8, 0.995, 0.001),
        "value_embeds": adamw(config.embedding_lr * scale * 0.5, 0.8, 0.995, 0.01),
        "resid": adamw(config.scalar_lr * 0.01, 0.8, 0.95, 0.05),
        "x0": adamw(config.scalar_lr, 0.96, 0.95, 0.0),
        "smear": adamw(0.2, 0.8, 0.95, 0.0),
        "other": adamw(config.lr, 0.9, 0.95, config.weight_decay),  # parameters a swapped-in MLP adds
    }
    return optax.partition(transforms, jax.tree_util.tree_map_with_path(_nanochat_group, params))


def make_optimizer(config: Config, params: Any) -> optax.GradientTransformation:
    """AdamW everywhere; optax's Muon on the stacked block matrices ([L, in, out]: orthogonalise each layer's
    in x out matrix) with AdamW on the rest; or the reference's per-group split (_nanochat_optimizer).
    LR schedules multiply the updates in the step."""
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    kind = optimizer_type(config)
    if kind == "adamw":
        return optax.chain(clip, optax.adamw(config.lr, b1=0.9, b2=0.95, weight_decay=config.weight_decay))
    if kind == "nanochat":
        return optax.chain(clip, _nanochat_optimizer(config, params))
    dims = jax.tree_util.tree_map_with_path(_muon_dims, params)
    return optax.chain(clip, optax.contrib.muon(
        config.matrix_lr, weight_decay=config.weight_decay, adam_learning_rate=config.lr, adam_b1=0.9,
        adam_b2=0.95, muon_weight_dimension_numbers=dims))


def lr_multiplier(step: jax.Array, total: jax.Array, config: Config) -> jax.Array:
    """Linear warm-up, flat, then linear warm-down over the last fraction of the planned steps (nanochat's shape).
    `total` = 0 (a time-only budget has no planned length) keeps the LR flat after warm-up."""
    step = step.astype(jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(config.lr_warmup_steps, 1))
    total = total.astype(jnp.float32)
    down_start = total * (1.0 - config.lr_warmdown_frac)
    progress = jnp.clip((step - down_start) / jnp.maximum(total - down_start, 1.0), 0.0, 1.0)
    down = 1.0 - progress * (1.0 - config.final_lr_frac)
    return warm * jnp.where(total > 0, down, 1.0)


def init_state(params: Any, tx: optax.GradientTransformation) -> dict[str, Any]:
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "total_steps": jnp.zeros((), jnp.int32)}


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, config: Config, *, n_frozen: int = 0,
                    relevance: str | None = None, mesh: DeviceMesh | None = None
                    ) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Pure step over {"params","opt","step","total_steps"}; micro-batches are a lax.scan (grad accumulation).
    ``n_frozen`` leading blocks (and the embedding) sit behind stop_gradient: no backward work is done for them.
    ``relevance`` (a kind of mgr.methods.partial.block_relevance) adds the per-block relevance as the metric
    "block_relevance", for the probe steps of a block-update schedule.
    On a ``mesh``, every micro-batch is split over the devices (not whole micro-batches per device)."""
    accum = config.grad_accum

    def loss_of(params, x_BT, y_BT):
        return loss_fn(nnx.merge(graphdef, params), x_BT, y_BT, n_frozen=n_frozen)[0]

    grad_fn = jax.value_and_grad(loss_of)

    def step(state, batch):
        x_ABT = batch["inputs_BT"].reshape(accum, -1, batch["inputs_BT"].shape[-1])
        y_ABT = batch["targets_BT"].reshape(x_ABT.shape)
        if mesh is not None and accum > 1:
            x_ABT, y_ABT = (jax.lax.with_sharding_constraint(a, mesh.along(1)) for a in (x_ABT, y_ABT))
        params = state["params"]
        half_grads = None
        if relevance == "snr":
            if accum != 1:
                raise UserError("the snr relevance needs --grad-accum 1")
            loss, grads, half_grads = value_and_half_grads(grad_fn, params, x_ABT[0], y_ABT[0])
        elif accum == 1:
            loss, grads = grad_fn(params, x_ABT[0], y_ABT[0])
        else:
            def micro(acc, xy):
                loss, grads = grad_fn(params, *xy)
                return jax.tree.map(jnp.add, acc, (loss, grads)), None
            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(micro, zeros, (x_ABT, y_ABT))
            loss, grads = jax.tree.map(lambda g: g / accum, (loss, grads))
        updates, opt = tx.update(grads, state["opt"], params)
        lrm = lr_multiplier(state["step"], state["total_steps"], config)
        # An optional traced "lr_scale" multiplies every learning rate (updates are linear in them, weight decay
        # included), so runs that differ only in LR share one program: vmapped sweeps (bench.vmapped_sweep).
        scale = lrm * state["lr_scale"] if "lr_scale" in state else lrm
        updates = jax.tree.map(lambda u: scale * u, updates)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr_mult": lrm}
        if relevance is not None:
            metrics["block_relevance"] = block_relevance(grads, state["params"], config.depth, kind=relevance,
                                                         updates=updates, half_grads=half_grads)
        new_state = {**state, "params": params, "opt": opt, "step": state["step"] + 1}
        return new_state, metrics

    return step


def make_eval(graphdef: Any, val: dict[str, np.ndarray], mesh: DeviceMesh | None = None) -> Callable[[dict], dict]:
    """Val loss (nats/token) and, where byte lengths are known, bits per byte over fixed validation batches
    (on a ``mesh``, each batch split over the devices)."""
    with_bytes = "target_bytes_BT" in val
    val = {k: jnp.asarray(v) for k, v in val.items()} if mesh is None else mesh.put_batch(val, axis=1)

    @jax.jit
    def evaluate(params, val):
        def one(carry, batch):
            _, nats_BT = loss_fn(nnx.merge(graphdef, params), batch["inputs_BT"], batch["targets_BT"])
            counted = batch["target_bytes_BT"] > 0 if with_bytes else jnp.ones_like(nats_BT, bool)
            nats_sum = jnp.where(counted, nats_BT, 0.0).sum()
            nbytes = batch["target_bytes_BT"].sum() if with_bytes else jnp.zeros((), jnp.int32)
            return jax.tree.map(jnp.add, carry, (nats_sum, counted.sum(), nbytes)), None
        zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
        (nats, ntok, nbytes), _ = jax.lax.scan(one, zero, val)
        out = {"val_loss": nats / jnp.maximum(ntok, 1)}
        if with_bytes:
            out["val_bpb"] = bits_per_byte(nats, nbytes)
        return out

    return lambda state: evaluate(state["params"], val)


# --- data ------------------------------------------------------------------------------------------------------

def data_spec(config: Config) -> DataSpec:
    return DataSpec(data=config.data, data_format=config.data_format, auto_download=config.auto_download_data,
                    min_parquet_files=config.min_parquet_files, data_url=config.data_url, data_dir=config.data_dir)


def check_token_ids(source, tokenizer, config: Config) -> None:
    """Token files hold ids of the tokenizer that wrote them: refuse ids the named tokenizer (or --vocab-size) has
    no room for. Under the default byte tokenizer larger ids are trained on as plain ids (vocab from the data)."""
    max_id = getattr(source, "max_token", None)
    if max_id is None:
        return
    if config.vocab_size and max_id >= config.vocab_size:
        raise UserError(f"--data holds token id {max_id} but --vocab-size is {config.vocab_size}; "
                        f"pass --vocab-size {max_id + 1} or more")
    if config.tokenizer != "byte" and max_id >= tokenizer.vocab_size:
        raise UserError(f"--data holds token id {max_id} but tokenizer {config.tokenizer} has a vocab of "
                        f"{tokenizer.vocab_size}; pass the tokenizer that wrote the file (a directory with its "
                        "tokenizer.json, or GPT-2's vocab.json + merges.txt) or --tokenizer byte to train on ids")


def build_data(config: Config, seed: int, tokenizer, mesh: DeviceMesh | None = None
               ) -> tuple[Loader, dict[str, np.ndarray]]:
    """The train loader (on a mesh of several processes, each fills only the rows its devices hold) and the
    fixed validation batches."""
    source = open_source(data_spec(config), seed=seed % 2**64, row_len=config.sequence_len + 1)
    check_token_ids(source, tokenizer, config)
    rows = config.batch_size * config.grad_accum
    train = Loader(source, tokenizer, seq_len=config.sequence_len, batch_size=rows, seed=seed, split="train",
                   fill=None if mesh is None or jax.process_count() == 1 else mesh.process_rows(rows))
    val_loader = Loader(source, tokenizer, seq_len=config.sequence_len, batch_size=config.batch_size, seed=seed,
                        split="val")
    n_batches = max(1, math.ceil(config.eval_tokens / (config.batch_size * config.sequence_len)))
    batches = [val_loader.next_batch() for _ in range(n_batches)]
    val = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    return train, val


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(config: Config, budget=None) -> None:
    """Everything about a run that can be checked before it starts (the launcher calls this before making the run
    directory): option ranges, the tokenizer, where the data is (downloading shards when asked), the checkpoint
    to resume and whether the budget leaves it anything to do."""
    for name in ("depth", "sequence_len", "batch_size", "grad_accum", "eval_tokens", "sample_tokens"):
        if getattr(config, name) < 1:
            raise UserError(f"{_flag(name)} must be >= 1, got {getattr(config, name)}")
    for name in ("eval_every", "sample_every", "checkpoint_every", "lr_warmup_steps", "vocab_size"):
        if getattr(config, name) < 0:
            raise UserError(f"{_flag(name)} must be >= 0, got {getattr(config, name)}")
    if not 0 <= config.lr_warmdown_frac <= 1 or not 0 <= config.final_lr_frac <= 1:
        raise UserError("--lr-warmdown-frac and --final-lr-frac must lie in [0, 1]")
    for name in ("lr", "matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr"):
        if not (math.isfinite(getattr(config, name)) and getattr(config, name) > 0):
            raise UserError(f"{_flag(name)} must be a positive finite number, got {getattr(config, name)}")
    for name in ("weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(config, name)) and getattr(config, name) >= 0):
            raise UserError(f"{_flag(name)} must be a finite number >= 0, got {getattr(config, name)}")
    if config.init_from and config.resume:
        raise UserError("--init-from and --resume exclude each other (resume restores the parameters too)")
    if config.attention_type != "auto":
        check_implementation(config.attention_type)
    tokenizer = load_tokenizer(config.tokenizer)
    kind, target = resolve_data(data_spec(config))
    if kind == "bin":  # memory-mapped: reading the ids' range costs one pass, and saves a doomed run
        check_token_ids(build_source(kind, target, seed=0, row_len=config.sequence_len + 1), tokenizer, config)
    if config.init_from and config.resume:
        raise UserError("--init-from and --resume exclude each other (resume restores the parameters too)")
    if config.resume:
        _, step, meta = read_meta(config.resume)
        _check_resumable(config, meta, step, budget)
        if kind != "bin":  # token files set the vocabulary from their ids, known once they are read
            _check_same_model("--resume", config.resume,
                              model_config(config, config.vocab_size or tokenizer.vocab_size), meta)


# --- the run ---------------------------------------------------------------------------------------------------

def _mlp_meta(config: Config) -> dict[str, int]:
    return {"fc1_bandwidth": config.fc1_bandwidth, "fc2_bandwidth": config.fc2_bandwidth}


def _check_resumable(config: Config, meta: dict, step: int, budget) -> None:
    if meta.get("mlp", _mlp_meta(Config())) != _mlp_meta(config):
        raise UserError(f"--resume {config.resume}: checkpoint MLP {meta.get('mlp')} differs from this run's "
                        f"{_mlp_meta(config)}")
    if meta.get("optimizer_type") != optimizer_type(config):
        raise UserError(f"--resume {config.resume}: checkpoint optimizer {meta.get('optimizer_type')!r} differs "
                        f"from this run's {optimizer_type(config)!r} (--recipe / --optimizer-type)")
    if budget is not None and budget.max_iterations is not None and step >= budget.max_iterations:
        raise UserError(f"--resume {config.resume}: the checkpoint is at step {step}, already at or past "
                        f"--max-iterations {budget.max_iterations}; raise it to train further")


def _check_same_model(flag: str, path: str, cfg: GPTConfig, meta: dict) -> None:
    # Through GPTConfig, so a checkpoint saved before the recipe options existed reads as the classic model.
    try:
        saved = dataclasses.asdict(GPTConfig(**(meta.get("model") or {})))
    except (TypeError, UserError):
        saved = meta.get("model") or {}
    mine = dataclasses.asdict(cfg)
    differ = [f"{k} {saved.get(k)} vs {mine.get(k)}" for k in sorted(set(saved) | set(mine))
              if saved.get(k) != mine.get(k)]
    if differ:
        raise UserError(f"{flag} {path}: the checkpoint's model differs from this run's in "
                        f"{'; '.join(differ)} (checkpoint vs this run)")


def _data_flags(config: Config) -> dict[str, Any]:
    return {"data": config.data, "data_format": config.data_format, "tokenizer": config.tokenizer}


def _resume(config: Config, cfg: GPTConfig, state: dict, train: Loader, ctx) -> tuple[dict, int, list[str]]:
    root, step, meta = read_meta(config.resume)
    _check_same_model("--resume", config.resume, cfg, meta)
    _check_resumable(config, meta, step, None)
    state = restore_arrays(root, step, state)
    train.load_state_dict(meta["data"])
    notes = []
    saved_data = meta.get("data_flags")
    if saved_data is not None and saved_data != _data_flags(config):
        notes.append(f"resumed from {root}/{step} with other data flags: checkpoint {saved_data}, this run "
                     f"{_data_flags(config)}")
        ctx.console.print(f"warning: {notes[-1]}", highlight=False, markup=False)
    return state, step, notes


def _init_from(config: Config, cfg: GPTConfig, params: Any) -> Any:
    """This run's parameters from checkpoint --init-from: as saved when the MLP bands match, the band of each
    kernel when the checkpoint is dense."""
    root, step, meta = read_meta(config.init_from)
    _check_same_model("--init-from", config.init_from, cfg, meta)
    src = Config(**{**dataclasses.asdict(config), **meta.get("mlp", _mlp_meta(Config())),
                    "optimizer_type": meta.get("optimizer_type", config.optimizer_type)})
    if _mlp_meta(src) != _mlp_meta(config) and _mlp_meta(src) != _mlp_meta(Config()):
        raise UserError(f"--init-from {config.init_from}: checkpoint MLP {_mlp_meta(src)} is neither dense nor "
                        f"this run's {_mlp_meta(config)}")
    src_params = nnx.split(build_model(src, cfg, 0, mlp=banded_mlp(src.fc1_bandwidth, src.fc2_bandwidth)),
                           nnx.Param)[1]
    like = {"params": src_params} if meta.get("init_only") else init_state(src_params,
                                                                           make_optimizer(src, src_params))
    restored = restore_arrays(root, step, like)["params"]
    if _mlp_meta(src) == _mlp_meta(config):
        return restored
    return params_from_dense(restored, params, cfg.n_embd, config.fc1_bandwidth, config.fc2_bandwidth)


def _sample(graphdef, params, tokenizer, prompt: np.ndarray, n: int, seed: int) -> str:
    model = nnx.merge(graphdef, params)
    out = generate(model, jnp.asarray(prompt)[None], n, temperature=0.8, key=jax.random.key(seed))
    ids = np.asarray(out[0]).tolist()
    if max(ids) >= tokenizer.vocab_size:  # ids of a token file's own tokenizer, which this run does not have
        return "token ids " + " ".join(map(str, ids))
    return tokenizer.decode(ids)


def run(config: Config, ctx) -> Results:
    if ctx.mesh is not None:
        ctx.mesh.require_divisible(config.batch_size, "--batch-size")
    tokenizer = load_tokenizer(config.tokenizer)
    train, val = build_data(config, ctx.seed, tokenizer, ctx.mesh)
    cfg = model_config(config, config.vocab_size or train.vocab_size)
    notes = []
    if train.vocab_size > tokenizer.vocab_size:
        notes.append(f"the token file's ids go up to {train.vocab_size - 1}, beyond the byte tokenizer's "
                     f"{tokenizer.vocab_size}: trained on plain ids with a vocab of {cfg.vocab_size}; no bits per "
                     "byte (byte lengths unknown), samples shown as ids")
    bands = mlp_bands(cfg.n_embd, config.fc1_bandwidth, config.fc2_bandwidth)
    model = build_model(config, cfg, ctx.seed, mlp=banded_mlp(config.fc1_bandwidth, config.fc2_bandwidth))
    graphdef, params = nnx.split(model, nnx.Param)
    if config.init_only:
        return _write_init(config, ctx, cfg, params, bands)
    if config.init_from:
        params = _init_from(config, cfg, params)
    tx = make_optimizer(config, params)
    state = init_state(params, tx)
    if ctx.mesh is not None:  # restore straight into the mesh's layout, whatever layout wrote the checkpoint
        state = ctx.mesh.put_state(state)
    start_step = 0
    if config.resume:
        state, start_step, resume_notes = _resume(config, cfg, state, train, ctx)
        notes += resume_notes
    step_fn = make_train_step(graphdef, tx, config, mesh=ctx.mesh)

    plan = ctx.plan(step_fn, state, train(start_step))
    if plan.max_steps is not None and plan.max_steps <= start_step:
        raise UserError(f"--resume {config.resume}: the checkpoint is at step {start_step} but the budget plans "
                        f"{plan.max_steps} steps in all; raise the budget to train further")
    state["total_steps"] = jnp.asarray(plan.max_steps or 0, jnp.int32)

    prompt = val["inputs_BT"][0, 0, : min(16, config.sequence_len)]
    samples: list[tuple[int, str]] = []

    def sample_hook(step, st):
        text = _sample(graphdef, st["params"], tokenizer, prompt, config.sample_tokens, ctx.seed + step)
        samples.append((step, text))
        ctx.log({"step": step, "sample": text})

    hooks = []
    checkpointer = Checkpointer(ctx.seed_dir) if config.checkpoint else None

    def save(step, st):
        checkpointer.save(step, st, {"step": step, "data": train.state_dict(), "model": dataclasses.asdict(cfg),
                                     "optimizer_type": optimizer_type(config), "data_flags": _data_flags(config),
                                     "mlp": _mlp_meta(config)})

    if checkpointer and config.checkpoint_every:
        hooks.append((config.checkpoint_every, save))
    if config.sample_every:
        hooks.append((config.sample_every, sample_hook))
    try:
        result = ctx.train("nanochat", step_fn, state, train, eval_fn=make_eval(graphdef, val, ctx.mesh),
                           eval_every=config.eval_every, start_step=start_step, hooks=tuple(hooks),
                           on_interrupt=save if checkpointer else None)
        # result.steps counts the resumed steps too: it is the step number reached.
        if checkpointer and not checkpointer.has(result.steps):
            save(result.steps, result.state)
    finally:
        if checkpointer:
            checkpointer.close()
    if not samples or samples[-1][0] != result.steps:
        sample_hook(result.steps, result.state)
    report = _report(config, ctx, cfg, result, train.entropy_rate, samples, bands)
    report.notes.extend(notes + getattr(train.source, "notes", []))
    return report


def _write_init(config: Config, ctx, cfg: GPTConfig, params: Any, bands: dict) -> Results:
    checkpointer = Checkpointer(ctx.run_dir)
    try:
        checkpointer.save(0, {"params": params}, {"step": 0, "init_only": True, "seed": ctx.seed,
                                                  "model": dataclasses.asdict(cfg), "mlp": _mlp_meta(config)})
    finally:
        checkpointer.close()
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return Results(metrics={"model": dataclasses.asdict(cfg), "mlp": bands, "n_params": n_params,
                            "init_checkpoint": str(checkpointer.directory / "0")},
                   notes=[f"initial model (seed {ctx.seed}, {n_params:,} parameters) written; start runs from it "
                          f"with --init-from {ctx.run_dir}"])


def _report(config, ctx, cfg, result, floor, samples, bands) -> Results:
    tokens_per_step = config.batch_size * config.grad_accum * config.sequence_len
    analytic_per_token = estimate_flops(cfg, mlp_density=bands["mlp_density"])
    matmul_per_step = result.flops_records["nanochat"].matmul_flops
    step_s = result.step_ms.median_ms / 1e3
    tokens_per_second = tokens_per_step / step_s if step_s > 0 else None
    devices = result.devices
    # MFU: one device's share of the (global) FLOPs against one device's peak.
    device_tflops_per_s = result.tflops_per_s_per_device
    peak = peak_flops_per_s(compute_dtype(config))
    # Training seconds at each eval, from the median step time (warm-up, evals, samples and checkpoints excluded).
    val_series = [(s, e.get("val_bpb"), e.get("val_loss"), s * step_s if step_s > 0 else None)
                  for s, e in result.evals]
    final = result.evals[-1][1] if result.evals else {}
    metrics = {
        "model": dataclasses.asdict(cfg),
        "mlp": bands,
        "init_from": config.init_from,
        "compute_dtype": compute_dtype(config),
        "tokens_per_step": tokens_per_step,
        "tokens_trained": tokens_per_step * result.steps,
        "flops_per_token_analytic": analytic_per_token,
        "flops_per_step_analytic": analytic_per_token * tokens_per_step,
        "flops_per_step_measured": result.flops_per_step,
        "flops_per_step_measured_per_device": result.flops_per_step / devices,
        "devices": devices,
        "matmul_flops_per_step_measured": matmul_per_step,
        "tokens_per_second": tokens_per_second,
        "tokens_per_second_per_device": None if tokens_per_second is None else tokens_per_second / devices,
        "tflops_per_second_est": result.tflops_per_s,
        "tflops_per_second_per_device_est": device_tflops_per_s,
        "peak_flops_per_s": peak,
        "mfu": None if (peak is None or device_tflops_per_s is None) else device_tflops_per_s * 1e12 / peak,
        # nanochat's own MFU: analytic 6N + 12LHDT FLOPs per token (full T², whatever the kernel skips or hides in
        # custom calls the estimator cannot price, e.g. cuDNN/Pallas attention), per device
        "mfu_analytic": None if (peak is None or tokens_per_second is None)
        else analytic_per_token * tokens_per_second / devices / peak,
        "attention": resolve_attention(config, cfg),
        "final_loss": result.final_loss,
        "val_loss": final.get("val_loss"),
        "val_bpb": final.get("val_bpb"),
        "val_bpb_series": [{"step": s, "val_bpb": b, "val_loss": v, "train_s_est": t}
                           for s, b, v, t in val_series],
        "entropy_floor_bpb": None if floor is None else floor.doc_bits_per_byte,
        "peak_memory_allocated_gb": ctx.train_summaries["nanochat"]["peak_memory_gb"],
    }
    cum_flops = np.arange(result.steps - len(result.losses) + 1, result.steps + 1) * result.flops_per_step
    evals_x = [s * result.flops_per_step for s, *_ in val_series]
    plot_curves(ctx.plot_path("loss_vs_flops.png"), {"train loss": (cum_flops, result.losses)},
                markers={"val loss": (evals_x, [v for _, _, v, _ in val_series])},
                xlabel="training FLOPs (estimator)", ylabel="loss (nats/token)", title=f"nanochat d{config.depth}")
    rows = [["val bpb", final.get("val_bpb")], ["val loss (nats/token)", final.get("val_loss")],
            ["entropy floor (bpb)", metrics["entropy_floor_bpb"]],
            ["MLP density FC1 / FC2", f"{bands['fc1']['density']:.4f} / {bands['fc2']['density']:.4f}"],
            ["FLOPs/token analytic (6N + 12LHDT)", analytic_per_token],
            ["matmul FLOPs/token measured (jaxpr)", matmul_per_step / tokens_per_step],
            ["FLOPs/token measured (mgr.flops, all ops)", result.flops_per_step / tokens_per_step],
            ["tokens/s", tokens_per_second], ["TFLOP/s (estimator)", metrics["tflops_per_second_est"]],
            ["MFU (estimator FLOPs, per device)", metrics["mfu"]],
            ["MFU (analytic 6N + 12LHDT, per device)", metrics["mfu_analytic"]],
            ["attention kernel", f"{metrics['attention']['chosen']} ({metrics['attention']['source']})"]]
    if devices > 1:
        rows[-1:-1] = [["devices (mesh data axis)", devices],
                       ["tokens/s per device", metrics["tokens_per_second_per_device"]],
                       ["TFLOP/s per device (estimator)", device_tflops_per_s]]
    notes = [f"samples at step {s}: {text!r}" for s, text in samples[-2:]]
    if metrics["entropy_floor_bpb"] is not None and final.get("val_bpb") is not None:
        notes.append(f"val bpb is {final['val_bpb'] - metrics['entropy_floor_bpb']:.4f} above the synthetic "
                     f"language's entropy floor {metrics['entropy_floor_bpb']:.4f}")
    return Results(metrics=metrics, tables=[Table(f"nanochat d{config.depth}, T={config.sequence_len}",
                                                  ["metric", "value"], rows)], notes=notes)


DEMO = Demo(name="nanochat", description="nanochat GPT trained for a fixed budget; val bits per byte, MFU, samples",
            config=Config, run=run, check=check_config, kind="nanochat", topic="train", default_max_iterations=200)


def main(argv: list[str] | None = None) -> int:
    from mgr.cli import run_demo_safely
    return run_demo_safely("nanochat", sys.argv[1:] if argv is None else argv, prog="python -m nanochat.train")


if __name__ == "__main__":
    sys.exit(main())
