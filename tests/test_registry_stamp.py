"""The store stamp that lets the service's watcher skip asking an unchanged registry
(runtime.registry.store_stamp): equal stamps only when nothing was written in between."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from runtime import registry


def _a_minute_ago(path: Path) -> None:
    then = time.time() - 60
    os.utime(path, (then, then))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite database as the registry URI, last written a minute ago."""
    import mlflow

    database = tmp_path / "mlflow.db"
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE aliases (name TEXT PRIMARY KEY, version TEXT)")
        connection.execute("INSERT INTO aliases VALUES ('champion', '1')")
        connection.commit()
    _a_minute_ago(database)
    monkeypatch.setattr(mlflow, "get_registry_uri", lambda: f"sqlite:///{database}")
    return database


def _write(database: Path, version: str) -> None:
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("UPDATE aliases SET version = ? WHERE name = 'champion'", (version,))
        connection.commit()


def test_an_unwritten_store_keeps_its_stamp_and_a_read_does_not_change_it(store: Path) -> None:
    first = registry.store_stamp()
    assert first is not None and first[0][0] == "mlflow.db"
    with closing(sqlite3.connect(store)) as connection:
        assert connection.execute("SELECT version FROM aliases").fetchall() == [("1",)]
    assert registry.store_stamp() == first


def test_a_write_is_a_new_stamp_even_of_the_same_size(store: Path) -> None:
    first = registry.store_stamp()
    _write(store, "2")  # one character for another: the file's size does not change
    assert store.stat().st_size == first[0][1]  # type: ignore[index]
    # just written: not trusted, the registry is asked
    assert registry.store_stamp() is None
    later = registry.store_stamp(now=time.time() + registry.SETTLED_S + 1)
    assert later is not None and later != first


def test_a_journal_or_wal_beside_the_database_is_part_of_the_stamp(store: Path) -> None:
    first = registry.store_stamp()
    wal = store.with_name("mlflow.db-wal")
    wal.write_bytes(b"\0" * 32)
    _a_minute_ago(wal)
    second = registry.store_stamp()
    assert second is not None and second != first and len(second) == 2


def test_a_store_that_cannot_be_stamped_is_asked(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    store.unlink()
    assert registry.store_stamp() is None  # gone: the registry says why
    monkeypatch.setattr(mlflow, "get_registry_uri", lambda: "http://127.0.0.1:5000")
    assert registry.store_stamp() is None  # a tracking server: always asked


def test_a_symlinked_store_is_stamped_with_the_wal_beside_the_file_it_points_to(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite keeps the journal and WAL beside the file a symlink points to: a write that
    only reached the WAL is seen through the link."""
    import mlflow

    linked = tmp_path / "elsewhere"
    linked.mkdir()
    (linked / "mlflow.db").symlink_to(store)
    monkeypatch.setattr(mlflow, "get_registry_uri", lambda: f"sqlite:///{linked / 'mlflow.db'}")
    first = registry.store_stamp()
    assert first is not None and [entry[0] for entry in first] == ["mlflow.db"]
    wal = store.with_name("mlflow.db-wal")  # beside the target, not beside the link
    wal.write_bytes(b"\0" * 32)
    _a_minute_ago(wal)
    second = registry.store_stamp()
    assert second is not None and [entry[0] for entry in second] == ["mlflow.db", "mlflow.db-wal"]


def test_a_store_replaced_by_a_copy_with_the_same_size_and_times_is_a_new_stamp(
    store: Path, tmp_path: Path
) -> None:
    """A copy that keeps the original's times (cp -p, rsync -a) moved into place: the size
    and the modification time are the same, the file is not."""
    import shutil

    first = registry.store_stamp()
    copy = tmp_path / "copy.db"
    shutil.copy2(store, copy)
    os.replace(copy, store)
    assert store.stat().st_mtime_ns == first[0][2]  # type: ignore[index]
    assert store.stat().st_size == first[0][1]  # type: ignore[index]
    second = registry.store_stamp()
    assert second is not None and second != first
