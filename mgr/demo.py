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
    default_max_iterations: int = 100  # used when the user gives no budget at all

    @property
    def default_topic(self) -> str:
        return self.topic or self.name.replace("-", "_")
