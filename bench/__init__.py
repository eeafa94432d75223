"""Benchmarks: modules run as `python -m bench.<name>`, each a Demo (config dataclass + run(config, ctx)) launched
through the harness, so its table lands in a run directory (artifacts/bench/<topic>/<run_id>/) like any demo's."""

from __future__ import annotations

from mgr.budget import Budget, check_warmup
from mgr.cli import OneLineParser, add_run_flags, guarded, launch_from_args
from mgr.demo import Demo
from mgr.errors import UserError
from mgr.flags import add_config_flags, config_from_args


def main(demo: Demo, argv: list[str], prog: str) -> int:
    """Parse the demo's config flags plus the run flags; ``config.steps`` is each training's budget."""
    parser = OneLineParser(prog=prog, description=demo.description)
    add_config_flags(parser, demo.config)
    add_run_flags(parser, budget=False, warmup_steps=2)

    def go() -> int:
        args = parser.parse_args(argv)
        config = config_from_args(demo.config, args)
        if config.steps < 1:
            raise UserError(f"--steps must be >= 1, got {config.steps}")
        check_warmup(args.warmup_steps, config.steps, "--steps")
        budget = Budget(max_iterations=config.steps, warmup_steps=args.warmup_steps)
        return launch_from_args(demo, config, args, budget, [*prog.split(), *argv])

    return guarded(go)
