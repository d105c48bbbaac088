"""The nextbest command line: every command explains itself, and errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from features import TABLES, Workspace
from nextbest.cli import app

runner = CliRunner()


def _command_paths(command: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            paths += _command_paths(sub, (*prefix, name))
    return paths


@pytest.mark.parametrize("path", _command_paths(typer.main.get_command(app)), ids=" ".join)
def test_every_command_has_useful_help(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    body = result.stdout.split("Usage:", 1)[1]
    assert len(body.split()) > 12, f"{' '.join(path)} has almost no help"


def test_summary_json_for_a_workspace(small_workspace: Workspace) -> None:
    result = runner.invoke(app, ["data", "summary", "--json", "-w", str(small_workspace.path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    orders = small_workspace.read("orders")
    assert summary["tables"] == {n: len(small_workspace.read(n)) for n in TABLES}
    assert summary["customers_with_orders"] == orders["customer_id"].nunique()
    assert summary["date_range"]["first"] == orders["ordered_at"].min().isoformat()
    assert summary["date_range"]["last"] == orders["ordered_at"].max().isoformat()
    assert summary["synthetic"] is True


def test_text_summary_says_synthetic(small_workspace: Workspace) -> None:
    result = runner.invoke(app, ["data", "summary", "-w", str(small_workspace.path)])
    assert result.exit_code == 0
    assert "(SYNTHETIC)" in result.stdout


def test_validate_and_contract(small_workspace: Workspace) -> None:
    result = runner.invoke(app, ["data", "validate", "-w", str(small_workspace.path)])
    assert result.exit_code == 0 and "valid" in result.stdout
    contract = json.loads(runner.invoke(app, ["data", "contract", "--json"]).stdout)
    assert set(contract) == set(TABLES)
    pii = {c["name"] for c in contract["customers"]["columns"] if c["pii"]}
    assert "customer_id" in pii and "income_band" in pii


def test_scenario_generate_writes_a_synthetic_workspace(tmp_path: Path) -> None:
    target = tmp_path / "world"
    result = runner.invoke(
        app,
        [
            "scenario",
            "generate",
            "-w",
            str(target),
            "--customers",
            "25",
            "--days",
            "40",
            "--seed",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert Workspace(target).manifest["synthetic"] is True
    assert Workspace(target).manifest["source"]["seed"] == 5


def test_a_folder_that_is_not_a_workspace_is_one_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "summary", "-w", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path} is not a nextbest workspace")
    assert "nextbest data load-demo" in result.stderr


def test_a_data_dir_that_does_not_exist_is_one_clear_error(
    small_workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in NEXTBEST_DATA_DIR must not start a new, empty ledger somewhere else."""
    missing = tmp_path / "no-such-data"
    monkeypatch.setenv("NEXTBEST_HOME", str(tmp_path))
    monkeypatch.setenv("NEXTBEST_DATA_DIR", str(missing))
    (tmp_path / "who.csv").write_text("customer_id\nS00001\n")
    result = runner.invoke(
        app,
        [
            *("recommend-batch", "--customers", str(tmp_path / "who.csv")),
            *("--out", "x.csv", "-w", str(small_workspace.path)),
        ],
    )
    assert result.exit_code == 2
    assert f"NEXTBEST_DATA_DIR is {missing}, which does not exist" in result.output
    assert "Traceback" not in result.output and not missing.exists()
