"""What pricing a step costs: `python -m bench.flops_overhead [--depth 4] [--rounds 2]`

The nanochat train step (AdamW, Muon, and AdamW with --grad-accum 2) is compiled the way the harness compiles it
(jit with state donation, ahead of time), in one process, alternating per round:

* plain:     ``jax.jit(step, donate_argnums=0).lower(state, batch).compile()``;
* estimator: ``mgr.flops.compile_and_count`` of the same jitted step (one compile plus pricing its optimised HLO).

Each compile gets a fresh step function and an empty estimator cache, so neither side reuses one; rounds alternate
which side goes first. The ratio is fastest over fastest (other load on the machine only adds time); the median
ratio is printed too, and the estimator's own work timed alone: fingerprinting the lowered module and pricing the
compiled one (what the estimator adds to a compile, free of the compile's own run-to-run noise).
"""

from __future__ import annotations

import argparse
import hashlib
import time

import jax
import numpy as np

from mgr import flops
from nanochat import train as nt
from nanochat.tokenizer import load_tokenizer


def _setup(depth: int, optimizer: str, accum: int):
    config = nt.Config(depth=depth, optimizer_type=optimizer, grad_accum=accum, batch_size=8 // accum)
    tokenizer = load_tokenizer(config.tokenizer)
    train, _ = nt.build_data(config, 0, tokenizer)
    cfg = nt.model_config(config, train.vocab_size)
    graphdef, params = nt.nnx.split(nt.build_model(config, cfg, 0), nt.nnx.Param)
    tx = nt.make_optimizer(config, params)
    return config, graphdef, tx, nt.init_state(params, tx), train(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"{'step':<16}{'plain s':>9}{'estimator s':>13}{'ratio':>7}{'median':>7}{'pricing s':>10}  flops/step")
    for name, optimizer, accum in (("adamw", "adamw", 1), ("muon", "muon", 1), ("adamw accum 2", "adamw", 2)):
        config, graphdef, tx, state, batch = _setup(args.depth, optimizer, accum)
        plain, priced = [], []
        for i in range(args.rounds):
            for side in ("plain", "estimator") if i % 2 == 0 else ("estimator", "plain"):  # neither always first
                step = jax.jit(nt.make_train_step(graphdef, tx, config), donate_argnums=0)
                flops._CACHE.clear()
                t0 = time.perf_counter()
                if side == "plain":
                    step.lower(state, batch).compile()
                else:
                    record, compiled = flops.compile_and_count(step, state, batch)
                (plain if side == "plain" else priced).append(time.perf_counter() - t0)
        lowered = step.lower(state, batch)
        t0 = time.perf_counter()
        hashlib.sha256(lowered.as_text().encode()).hexdigest()
        flops.price(compiled)
        pricing = time.perf_counter() - t0
        ratios = np.array(priced) / np.array(plain)
        print(f"{name:<16}{min(plain):>9.2f}{min(priced):>13.2f}{min(priced) / min(plain):>7.3f}"
              f"{np.median(ratios):>7.3f}{pricing:>10.3f}  {record.flops:.4g} ({record.matmul_flops:.4g} matmul)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
