"""One trained nanochat MLP layer for the approximation benches: its weights and the inputs it actually sees.

`layer_arrays(path, layer=L, n_tokens=N, seed=S)` restores a checkpoint written by `nanochat.train
--checkpoint-every` (a run directory, its checkpoints/ directory, or one step's checkpoints/<step>; the newest step
unless one is named) and returns, as float32 numpy arrays,
  * c_fc [D, 4D] and c_proj [4D, D] of block L's MLP, exactly as stored;
  * X [N, D]: what that MLP reads, the RMS-normed residual stream after block L's attention (computed in float32).
Tokens: the training split of the data the run used, rebuilt from the run's config.json (tokenizer and --data flags,
written by the launcher next to checkpoints/), in the order a run seeded with S draws it; with the run's own seed
these are the first tokens it trained on, with another seed the synthetic language gives fresh documents. Without a
config.json (a checkpoints/ directory copied on its own) nanochat's defaults apply: the synthetic language and the
byte tokenizer. Parquet shards are never downloaded here: they must already be in --data-dir.

CLI: `python -m nanochat.export --run RUN --layer L --tokens N --out layer.npz` writes the .npz (keys w1, w2, x) that
`--from-checkpoint` of the benches reads (mgr.structured_inputs), which also accept the run directory itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgr.artifacts import check_output_file, read_json
from mgr.errors import UserError
from nanochat import train
from nanochat.checkpoint import CHECKPOINT_DIR, read_meta, restore_arrays
from nanochat.model import GPT, GPTConfig
from nanochat.tokenizer import load_tokenizer


@partial(jax.jit, static_argnums=(0, 2))
def _capture(graphdef, params, layer: int, idx_BT: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params).mlp_input(idx_BT, layer)


def _run_config(root: Path, optimizer_type: str) -> train.Config:
    """The training flags of the run that wrote checkpoint root <run>/checkpoints, from <run>/config.json if there
    (defaults otherwise); the optimizer always comes from the checkpoint, whose state layout depends on it."""
    saved = {}
    config_json = root.parent / "config.json"
    if root.name == CHECKPOINT_DIR and config_json.is_file():
        record = read_json(config_json)
        if isinstance(record, dict) and record.get("demo") == "nanochat" and isinstance(record.get("config"), dict):
            known = {f.name for f in dataclasses.fields(train.Config)}
            saved = {k: v for k, v in record["config"].items() if k in known}
    return dataclasses.replace(train.Config(**saved), optimizer_type=optimizer_type, auto_download_data=False,
                               dtype="float32", attention_type="xla")


def _read_meta(path: str | Path) -> tuple[Path, int, GPTConfig, train.Config]:
    root, step, meta = read_meta(path)
    try:
        return root, step, GPTConfig(**meta["model"]), _run_config(root, meta["optimizer_type"])
    except (KeyError, TypeError) as e:
        raise UserError(f"nanochat checkpoint {root}/{step}: metadata lacks the model or optimizer ({e})") from None


def _restore(root: Path, step: int, cfg: GPTConfig, config: train.Config) -> GPT:
    # Shapes only: the template costs no memory; the optimizer state is restored too because it is saved with it.
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0), dtype="float32", attention=config.attention_type))
    graphdef, params = nnx.split(abstract, nnx.Param)
    tx = train.make_optimizer(config, params)
    state = restore_arrays(root, step, jax.eval_shape(lambda p: train.init_state(p, tx), params))
    return nnx.merge(graphdef, state["params"])


def _tokens(config: train.Config, cfg: GPTConfig, n_tokens: int, seed: int) -> np.ndarray:
    """[rows, sequence_len] int32 token rows covering n_tokens, from the run's training split (module docstring)."""
    tokenizer = load_tokenizer(config.tokenizer)
    # build_data also packs validation batches, unused here; eval_tokens=1 keeps that to one batch.
    loader, _ = train.build_data(dataclasses.replace(config, eval_tokens=1), seed, tokenizer)
    if loader.vocab_size != cfg.vocab_size:
        raise UserError(f"the run's data and tokenizer give {loader.vocab_size} token ids but the checkpoint's model "
                        f"has {cfg.vocab_size}; the data it trained on cannot be rebuilt here")
    n_batches = math.ceil(n_tokens / (loader.batch_size * loader.seq_len))
    return np.concatenate([loader.next_batch()["inputs_BT"] for _ in range(n_batches)])


def layer_arrays(path: str | Path, *, layer: int, n_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
    """(c_fc [D, 4D], c_proj [4D, D], X [n_tokens, D]) of block `layer` of a nanochat checkpoint (module docstring)."""
    if n_tokens < 1:
        raise UserError(f"need at least one token of activations, got {n_tokens}")
    root, step, cfg, config = _read_meta(path)
    if not 0 <= layer < cfg.n_layer:
        raise UserError(f"layer {layer} out of range: the checkpoint at {path} has {cfg.n_layer} layer(s), "
                        f"0..{cfg.n_layer - 1}")
    model = _restore(root, step, cfg, config)
    mlp = model.blocks.mlp
    w1_DH = np.asarray(mlp.c_fc.kernel[...][layer], np.float32)
    w2_HD = np.asarray(mlp.c_proj.kernel[...][layer], np.float32)
    graphdef, params = nnx.split(model)
    rows_BT = _tokens(config, cfg, n_tokens, seed)
    batch = config.batch_size * config.grad_accum
    x_ND = np.concatenate([np.asarray(_capture(graphdef, params, layer, jnp.asarray(rows_BT[i:i + batch])))
                           .reshape(-1, cfg.n_embd) for i in range(0, len(rows_BT), batch)])
    return w1_DH, w2_HD, x_ND[:n_tokens].astype(np.float32)


def _physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_size(run: str, n_tokens: int) -> None:
    """X is n_tokens x n_embd float32 (plus the token rows and a copy while saving): refuse what cannot fit in half
    of this machine's memory before minutes of capture head towards it."""
    _, step, cfg, _ = _read_meta(run)
    need = n_tokens * cfg.n_embd * 4 * 2
    if need > _physical_memory_bytes() // 2:
        raise UserError(f"--tokens {n_tokens} would need about {need / 1e9:.1f} GB for X ({n_tokens} x "
                        f"{cfg.n_embd} float32, twice while saving), more than half of this machine's "
                        f"{_physical_memory_bytes() / 1e9:.1f} GB; ask for fewer tokens")


def export(run: str, layer: int, n_tokens: int, out: str, seed: int) -> int:
    out_path = Path(out)
    if out_path.suffix != ".npz":
        raise UserError(f"--out must name a .npz file, got {out}")
    check_output_file(out_path, "--out")
    if n_tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {n_tokens}")
    check_size(run, n_tokens)
    w1, w2, x = layer_arrays(run, layer=layer, n_tokens=n_tokens, seed=seed)
    tmp = out_path.with_name(f".{out_path.name}.tmp.npz")
    try:  # temp file + rename: an interrupted or full-disk write never leaves a truncated .npz
        np.savez(tmp, w1=w1, w2=w2, x=x)
        os.replace(tmp, out_path)
    except OSError as e:
        raise UserError(f"cannot write {out_path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out_path}: w1 {w1.shape}, w2 {w2.shape}, x {x.shape} (block {layer} of {run})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mgr.cli import OneLineParser, guarded

    def parse_and_export(argv):
        parser = OneLineParser(prog="python -m nanochat.export",
                               description="write one nanochat MLP layer (w1, w2, captured inputs x) to a .npz")
        parser.add_argument("--run", required=True,
                            help="run directory, its checkpoints/ directory, or checkpoints/<step>")
        parser.add_argument("--layer", type=int, default=0, help="block index (default: 0)")
        parser.add_argument("--tokens", type=int, default=8192, help="activation rows to capture (default: 8192)")
        parser.add_argument("--seed", type=int, default=0, help="which training-split tokens (default: 0)")
        parser.add_argument("--out", required=True, help="output .npz")
        args = parser.parse_args(argv)
        return export(args.run, args.layer, args.tokens, args.out, args.seed)

    return guarded(parse_and_export, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
