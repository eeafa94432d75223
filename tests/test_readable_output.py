"""Tables never split a number or a word: plain columns when piped, `column: value` lines in a narrow terminal,
a rich table only where it fits; `mgr list` is one line per demo; one number format."""

import io

import demos
from rich.console import Console

from mgr.cli import main
from mgr.launcher import print_summary
from mgr.results import Table, fmt
from tests.conftest import TOY_MODULE, read_json

TABLE = Table("Training", ["variant", "ms/step median (p10–p90)", "FLOPs/step", "stopped by"],
              [["baseline-with-a-long-name", "2.509 (2.401–2.7)", 18688, "max_iterations"],
               ["cheap", None, 1.5e9, "x"]],
              note="FLOPs/step: measured.")
SUMMARY = {"status": "completed", "meta": {}, "budget": {}, "results": {"tables": [TABLE.to_dict()], "notes": []}}


def render(**console_kwargs) -> str:
    out = io.StringIO()
    print_summary(SUMMARY, Console(file=out, **console_kwargs))
    return out.getvalue()


def test_piped_output_is_plain_columns_at_full_width():
    text = render(width=40)  # a file: not a terminal, however narrow rich thinks it is
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("baseline-with-a-long-name"))
    assert row.split("  ")[0] == "baseline-with-a-long-name"
    assert "2.509 (2.401–2.7)" in row and "18688" in row and "max_iterations" in row and len(row) > 40
    assert "FLOPs/step: measured." in lines


def test_a_narrow_terminal_gets_one_cell_per_line():
    text = render(width=40, force_terminal=True, color_system=None)
    lines = text.splitlines()
    assert "- variant: baseline-with-a-long-name" in lines
    assert "    ms/step median (p10–p90): 2.509 (2.401–2.7)" in lines
    assert "    FLOPs/step: 1.500e+09" in lines


def test_a_wide_terminal_gets_the_table_unwrapped():
    text = render(width=200, force_terminal=True, color_system=None)
    row = next(line for line in text.splitlines() if "baseline-with-a-long-name" in line)
    assert "2.509 (2.401–2.7)" in row and "18688" in row and "max_iterations" in row


def test_one_number_format():
    assert fmt(2521) == "2521" == fmt(2521.0)
    assert fmt(12345678) == "1.235e+07"


def test_mgr_list_piped_is_one_line_per_demo(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "30")
    monkeypatch.setattr(demos, "REGISTRY", {"toy": TOY_MODULE, "toy-again": TOY_MODULE})
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.endswith("toy regression for harness tests") for line in lines)


def test_a_run_piped_into_a_file_keeps_rows_whole(run_toy, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    code, run_dir = run_toy("piped", "--max-iterations", "3")
    assert code == 0
    out = capsys.readouterr().out
    steps = read_json(run_dir / "summary.json")["results"]["train"]["baseline"]
    row = next(line for line in out.splitlines() if line.startswith("baseline ") and "max_iterations" in line)
    assert row.split()[:3] == ["baseline", "3", "max_iterations"] and fmt(steps["flops_per_step"]) in row
