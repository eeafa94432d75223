"""Shared fixtures: the toy demo registered under `toy`, and a helper that runs it through `mgr.cli.main`."""

import json
from pathlib import Path

import pytest

import demos
from mgr.cli import main

REPO = Path(__file__).resolve().parents[1]
TOY_MODULE = "tests.toy_demo"


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(demos.REGISTRY, "toy", TOY_MODULE)


@pytest.fixture
def run_toy(toy, tmp_path):
    """run_toy(run_id, *flags) -> (exit code, run dir); the run lands in tmp_path/tests/toy/<run_id>."""
    def run(run_id, *flags):
        code = main(["run", "toy", "--artifacts-dir", str(tmp_path), "--run-id", run_id, *flags])
        return code, tmp_path / "tests" / "toy" / run_id
    return run


def read_json(path):
    return json.loads(Path(path).read_text())


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_lines(records, variant):
    return [r for r in records if r["variant"] == variant and "loss" in r]


def one_error_line(capsys):
    """The stderr of a refused command: exactly one line, `error: ...`; returns it."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
