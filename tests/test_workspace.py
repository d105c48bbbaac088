"""Workspaces: types survive the disk, and writes are all or nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from features import (
    TABLES,
    ContractError,
    Workspace,
    WorkspaceError,
    World,
    coerce_table,
    write_workspace,
)


def test_tables_round_trip_with_their_types(small_world: World, small_workspace: Workspace) -> None:
    for name in TABLES:
        back = small_workspace.read(name)
        assert list(back.columns) == TABLES[name].column_names
        pd.testing.assert_frame_equal(back, coerce_table(name, small_world.tables[name]))
    offers = small_workspace.read("offers")
    assert all(isinstance(ids, list) for ids in offers["product_ids"])
    assert str(small_workspace.read("exposures")["rank"].dtype) == "Int64"


def test_reading_a_column_subset(small_workspace: Workspace) -> None:
    orders = small_workspace.read("orders", columns=["customer_id", "amount"])
    assert list(orders.columns) == ["customer_id", "amount"]


def test_a_failed_write_leaves_the_old_workspace_untouched(
    small_world: World, tmp_path: Path
) -> None:
    good = write_workspace(tmp_path / "ws", small_world.tables, source={"name": "t"})
    before = good.manifest
    broken = dict(small_world.tables)
    broken["customers"] = pd.concat([broken["customers"], broken["customers"].head(1)])
    with pytest.raises(ContractError, match="duplicate key"):
        write_workspace(tmp_path / "ws", broken, source={"name": "t"})
    assert Workspace(tmp_path / "ws").manifest == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_fingerprint_is_stable_and_content_addressed(small_world: World, tmp_path: Path) -> None:
    first = write_workspace(tmp_path / "a", small_world.tables, source={"name": "t"})
    second = write_workspace(tmp_path / "b", small_world.tables, source={"name": "t"})
    assert first.fingerprint == second.fingerprint
    changed = dict(small_world.tables)
    changed["orders"] = changed["orders"].iloc[1:]
    third = write_workspace(tmp_path / "c", changed, source={"name": "t"})
    assert third.fingerprint != first.fingerprint


def test_refuses_to_overwrite_a_folder_that_is_not_a_workspace(
    small_world: World, tmp_path: Path
) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(WorkspaceError, match="is not a workspace: refusing to overwrite"):
        write_workspace(tmp_path, small_world.tables, source={"name": "t"})
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_tables_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match=r"not contract tables: \['basket'\]"):
        write_workspace(tmp_path / "ws", {"basket": pd.DataFrame()}, source={"name": "t"})


def test_a_workspace_keeps_its_id_when_written_again(small_world: World, tmp_path: Path) -> None:
    first = write_workspace(tmp_path / "Shop Data", small_world.tables, source={"name": "t"})
    assert first.workspace_id.startswith("shop-data-") and len(first.workspace_id) == 16
    again = write_workspace(tmp_path / "Shop Data", small_world.tables, source={"name": "t"})
    assert again.workspace_id == first.workspace_id
    other = write_workspace(tmp_path / "other", small_world.tables, source={"name": "t"})
    assert other.workspace_id != first.workspace_id
    named = write_workspace(tmp_path / "n", small_world.tables, source={}, workspace_id="acme")
    assert named.workspace_id == "acme"
    with pytest.raises(WorkspaceError, match="lower-case letters"):
        write_workspace(tmp_path / "m", small_world.tables, source={}, workspace_id="Acme Co")
