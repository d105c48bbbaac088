"""A workspace: one folder of contract tables (parquet) with a manifest.

This is the only module in ``features`` that touches the disk. Writes are all-or-nothing:
every table is validated first, then written to a temporary folder beside the target,
which replaces the target in one rename. A failed validation leaves nothing behind.

Layout::

    WORKSPACE/
      workspace.json        # manifest: source, synthetic flag, row counts, hashes, data quality
      customers.parquet
      products.parquet
      ...                   # one file per contract table
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import TABLES, TableSpec, coerce_table, empty_table, validate_tables

__all__ = [
    "MANIFEST_NAME",
    "Workspace",
    "WorkspaceError",
    "erase_customer_rows",
    "rewrite_workspace",
    "summarize",
    "write_workspace",
]

MANIFEST_NAME = "workspace.json"
FORMAT_VERSION = 1

_ARROW_TYPES = {
    "string": pa.string(),
    "float": pa.float64(),
    "int": pa.int64(),
    "bool": pa.bool_(),
    "datetime": pa.timestamp("us"),
    "string_list": pa.list_(pa.string()),
}


class WorkspaceError(RuntimeError):
    """A workspace folder is missing, incomplete or not a workspace."""


def _arrow_schema(spec: TableSpec) -> pa.Schema:
    return pa.schema(
        [pa.field(c.name, _ARROW_TYPES[c.dtype], nullable=True) for c in spec.columns],
        metadata={"nextbest.table": spec.name},
    )


def _to_arrow(name: str, frame: pd.DataFrame) -> pa.Table:
    spec = TABLES[name]
    return pa.Table.from_pandas(
        frame[spec.column_names], schema=_arrow_schema(spec), preserve_index=False
    )


def _restore_types(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Give a frame read from parquet back the contract's pandas types."""
    spec = TABLES[name]
    for column in spec.columns:
        if column.name not in frame.columns:
            continue
        if column.dtype == "string_list":
            frame[column.name] = [
                list(items) if items is not None else [] for items in frame[column.name]
            ]
        elif column.dtype == "int":
            frame[column.name] = frame[column.name].astype("Int64")
        elif column.dtype == "bool" and frame[column.name].isna().any():
            frame[column.name] = frame[column.name].astype("boolean")
        elif column.dtype == "datetime":
            frame[column.name] = frame[column.name].astype("datetime64[us]")
    return frame


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Workspace:
    """A folder of contract tables. Reading never modifies it."""

    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def require(self) -> Workspace:
        if not self.exists():
            raise WorkspaceError(
                f"{self.path} is not a nextbest workspace (no {MANIFEST_NAME}). Create one with "
                "'nextbest data load-demo', 'nextbest import transactions' or "
                "'nextbest scenario generate'."
            )
        return self

    @property
    def manifest(self) -> dict[str, Any]:
        self.require()
        return dict(json.loads(self.manifest_path.read_text()))

    @property
    def fingerprint(self) -> str:
        """A hash of every table's content: the dataset's identity for MLflow."""
        return str(self.manifest["fingerprint"])

    @property
    def workspace_id(self) -> str:
        """The workspace's stable name: set when it is first written and kept when the same
        folder is written again (new data, same retailer). Models are registered per
        workspace under it, so training one workspace never changes what another serves."""
        given = self.manifest.get("workspace_id")
        return str(given) if given else _derived_id(self.path)

    def table_path(self, name: str) -> Path:
        if name not in TABLES:
            raise KeyError(f"'{name}' is not a contract table; use one of {list(TABLES)}")
        return self.path / f"{name}.parquet"

    def read(self, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Table ``name`` in contract types (an empty table if the workspace lacks it)."""
        self.require()
        path = self.table_path(name)
        if not path.is_file():
            frame = empty_table(name)
            return frame[list(columns)] if columns is not None else frame
        frame = pq.read_table(path, columns=list(columns) if columns else None).to_pandas()
        return _restore_types(name, frame)

    def read_all(self) -> dict[str, pd.DataFrame]:
        return {name: self.read(name) for name in TABLES}


def write_workspace(
    path: Path | str,
    tables: Mapping[str, pd.DataFrame],
    *,
    source: Mapping[str, Any],
    synthetic: bool = False,
    allow_orphans: Collection[str] = (),
    data_quality: Mapping[str, Any] | None = None,
    workspace_id: str | None = None,
) -> Workspace:
    """Validate ``tables`` and write them as the workspace at ``path``, all or nothing.

    Each table is first coerced to the contract's types (see ``coerce_table``); tables
    the mapping lacks are written empty. ``allow_orphans`` names references whose unknown
    ids are tolerated (counted into the manifest's data quality). An existing workspace at
    ``path`` is replaced only once the new one is complete.
    """
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise WorkspaceError(f"not contract tables: {sorted(unknown)}; use {list(TABLES)}")
    complete = {
        name: coerce_table(name, tables[name]) if name in tables else empty_table(name)
        for name in TABLES
    }
    orphans = validate_tables(complete, allow_orphans=allow_orphans)

    target = Path(path)
    if target.exists() and not (target / MANIFEST_NAME).is_file() and any(target.iterdir()):
        raise WorkspaceError(
            f"{target} exists, is not empty and is not a workspace: refusing to overwrite it. "
            "Choose an empty or new folder."
        )
    if workspace_id is None:
        previous = Workspace(target)
        workspace_id = (
            previous.workspace_id
            if previous.exists()
            else f"{_slug(target.name)}-{uuid.uuid4().hex[:6]}"
        )
    elif _slug(workspace_id) != workspace_id:
        raise WorkspaceError(
            f"workspace id {workspace_id!r}: use lower-case letters, digits and '-' only"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        table_info = {}
        for name, frame in complete.items():
            file = staging / f"{name}.parquet"
            pq.write_table(_to_arrow(name, frame), file, compression="zstd")
            table_info[name] = {"rows": len(frame), "sha256": _file_sha256(file)}
        fingerprint = hashlib.sha256(
            json.dumps({n: t["sha256"] for n, t in table_info.items()}, sort_keys=True).encode()
        ).hexdigest()[:16]
        quality = {f"unknown_ids.{ref}": count for ref, count in orphans.items()}
        quality |= dict(data_quality or {})
        manifest = {
            "format": FORMAT_VERSION,
            "workspace_id": workspace_id,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": dict(source),
            "synthetic": synthetic,
            "tables": table_info,
            "fingerprint": fingerprint,
            "data_quality": quality,
            "tolerated_unknown_ids": sorted(allow_orphans),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Workspace(target)


def rewrite_workspace(
    workspace: Workspace, tables: Mapping[str, pd.DataFrame], *, source: Mapping[str, Any]
) -> Workspace:
    """Write ``tables`` (every table, some changed) as ``workspace`` again, all or nothing:
    what its manifest says of itself (synthetic, its id, the references whose unknown ids
    it tolerates, its data quality) is kept, the unknown-id counts are taken again, and
    ``source`` replaces the manifest's source (a table imported, a ledger exported)."""
    manifest = workspace.manifest
    return write_workspace(
        workspace.path,
        tables,
        source=source,
        synthetic=manifest["synthetic"],
        allow_orphans=manifest.get("tolerated_unknown_ids", ()),
        data_quality={
            key: value
            for key, value in manifest["data_quality"].items()
            if not key.startswith("unknown_ids.")
        },
    )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "workspace"


def _derived_id(path: Path) -> str:
    """For a workspace written before ids existed: its folder's name and a hash of where it
    is (stable while it stays there)."""
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:6]
    return f"{_slug(path.name)}-{where}"


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex[:8]}"
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def _iso(value: Any) -> str | None:
    return None if pd.isna(value) else pd.Timestamp(value).isoformat()


def summarize(workspace: Workspace) -> dict[str, Any]:
    """Counts that say what a workspace holds.

    Returns row counts per table, distinct customers (in the customers table and with
    orders), the orders' date range, offers by kind, outcomes by type, and data quality.
    """
    manifest = workspace.manifest
    orders = workspace.read("orders", columns=["customer_id", "ordered_at"])
    offers = workspace.read("offers", columns=["kind"])
    outcomes = workspace.read("outcomes", columns=["outcome"])
    customers = workspace.read("customers", columns=["customer_id"])
    offers_by_kind = {str(k): int(v) for k, v in offers["kind"].value_counts().items()}
    outcomes_by_type = {str(k): int(v) for k, v in outcomes["outcome"].value_counts().items()}
    ordered_at = orders["ordered_at"]
    return {
        "workspace": str(workspace.path),
        "source": manifest["source"],
        "synthetic": manifest["synthetic"],
        "fingerprint": manifest["fingerprint"],
        "tables": {name: info["rows"] for name, info in manifest["tables"].items()},
        "customers": len(customers),
        "customers_with_orders": int(orders["customer_id"].nunique()),
        "order_lines": len(orders),
        "products": manifest["tables"]["products"]["rows"],
        "offers_by_kind": offers_by_kind,
        "coupon_offers": offers_by_kind.get("coupon", 0),
        "outcomes_by_type": outcomes_by_type,
        "redemptions": outcomes_by_type.get("redeemed", 0),
        "date_range": {
            "first": _iso(ordered_at.min()) if len(ordered_at) else None,
            "last": _iso(ordered_at.max()) if len(ordered_at) else None,
        },
        "data_quality": manifest["data_quality"],
    }


# -- item 7 (privacy): erasure --------------------------------------------------------------


def erase_customer_rows(
    workspace: Workspace, customer_id: str, *, source: Mapping[str, Any]
) -> tuple[Workspace, dict[str, int]]:
    """Remove one customer's rows from every table that has a ``customer_id`` (customers,
    orders, exposures, outcomes, events, consent, audiences) and write the workspace
    again through :func:`rewrite_workspace` (validated by the contract, all or nothing;
    ``source`` becomes the manifest's source: say which erasure, never whose). Returns
    the workspace and the rows removed per table; with nothing to remove the workspace is
    left as it is (not rewritten: its fingerprint stays)."""
    tables = workspace.read_all()
    removed: dict[str, int] = {}
    for name, frame in tables.items():
        if "customer_id" not in frame.columns:
            continue
        theirs = frame["customer_id"].astype("string") == customer_id
        removed[name] = int(theirs.sum())
        if removed[name]:
            tables[name] = frame.loc[~theirs.fillna(False).to_numpy()].reset_index(drop=True)
    if not any(removed.values()):
        return workspace, removed
    return rewrite_workspace(workspace, tables, source=source), removed
