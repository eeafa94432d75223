"""The demo contract: a config dataclass whose fields are the demo's flags, and ``run(config, ctx) -> Results``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from mgr.results import Results


@dataclasses.dataclass(frozen=True)
class Demo:
    name: str
    description: str
    config: type
    run: Callable[[Any, Any], Results]
    kind: str = "demos"
    topic: str = ""
    # Steps per training run when the user gives no budget at all: a number, or a function of the config for a
    # demo with its own steps option (budget flags still replace it).
    default_max_iterations: int | Callable[[Any], int] = 100
    # check(config, budget) raises UserError for bad input; the launcher calls it before making the run directory,
    # so a refused run is one line and leaves nothing behind.
    check: Callable[[Any, Any], None] | None = None
    # The eval metric (lower is better) that --target-loss and time to quality are measured on.
    quality_metric: str = "val_loss"

    def default_iterations(self, config: Any) -> int:
        default = self.default_max_iterations
        return default(config) if callable(default) else default

    @property
    def default_topic(self) -> str:
        return self.topic or self.name.replace("-", "_")
