"""What a demo hands back: JSON-able metrics, tables for run.md and the console, and notes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class Table:
    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": list(self.columns),
                "rows": [[to_jsonable(c) for c in r] for r in self.rows], "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Table":
        return cls(d["title"], d["columns"], d["rows"], d.get("note", ""))

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows as the strings every rendering shows (one number format: fmt)."""
        return [str(c) for c in self.columns], [[fmt(c) for c in row] for row in self.rows]

    def plain(self) -> str:
        """Aligned columns at full width: for a file, a pipe or run logs, where nothing may wrap inside a cell."""
        header, rows = self.cells()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [self.title, line(header), line(["-" * w for w in widths]), *map(line, rows)]
        return "\n".join(out + ([self.note] if self.note else [])) + "\n"

    def records(self) -> str:
        """One row per block, one `column: value` per line: for a terminal too narrow for the table."""
        header, rows = self.cells()
        out = [self.title]
        for row in rows:
            out.append(f"- {header[0]}: {row[0]}")
            out += [f"    {h}: {c}" for h, c in zip(header[1:], row[1:])]
        return "\n".join(out + ([self.note] if self.note else [])) + "\n"

    def width(self) -> int:
        """Characters a line of plain() takes."""
        header, rows = self.cells()
        return sum(max(len(r[i]) for r in [header, *rows]) for i in range(len(header))) + 2 * (len(header) - 1)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Results:
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    tables: list[Table] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def fmt(value: Any) -> str:
    """Compact human formatting: 4 significant digits, scientific notation for large/small magnitudes."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):  # no thousands separators: 2521 reads the same as a float's 2521
        return str(int(value)) if abs(int(value)) < 10**7 else f"{float(value):.3e}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(value)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types only: numpy/jax scalars and arrays unwrapped, non-finite floats become null."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value))
    if hasattr(value, "__array__"):  # numpy and jax arrays and scalars
        arr = np.asarray(value)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value
