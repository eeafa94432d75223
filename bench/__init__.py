"""Benchmarks: modules run as `python -m bench.<name>`, each a Demo (config dataclass + run(config, ctx)) launched
through the harness, so its table lands in a run directory (artifacts/bench/<topic>/<run_id>/) like any demo's."""

from __future__ import annotations

from mgr.budget import Budget
from mgr.cli import OneLineParser, guarded
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.flags import add_config_flags, config_from_args


def main(demo: Demo, argv: list[str], prog: str) -> int:
    """Parse the demo's config flags plus the run flags a bench needs; ``config.steps`` is each training's budget."""
    parser = OneLineParser(prog=prog, description=demo.description)
    add_config_flags(parser, demo.config)
    run = parser.add_argument_group("run")
    run.add_argument("--warmup-steps", type=int, default=2, help="steps excluded from step times (default: 2)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--artifacts-dir", default="artifacts")
    run.add_argument("--run-id", help="run directory name (default: YYYYMMDD_HHMMSS)")

    def go() -> int:
        from mgr.artifacts import default_run_id
        from mgr.launcher import launch
        args = parser.parse_args(argv)
        config = config_from_args(demo.config, args)
        if config.steps < 1:
            raise UserError(f"--steps must be >= 1, got {config.steps}")
        budget = Budget(max_iterations=config.steps, warmup_steps=args.warmup_steps)
        code, _ = launch(demo, config, budget=budget, seed=args.seed, artifacts_dir=args.artifacts_dir,
                         run_id=args.run_id or default_run_id(), argv=[*prog.split(), *argv])
        return code

    return guarded(go)
