"""Generic import: any retailer's order lines (or contract-shaped tables) into a workspace.

``read_table_file`` is the I/O; ``order_lines_to_tables`` is a pure mapping from a frame
of order lines to contract tables; ``import_transactions`` and ``import_table`` wire them
to :func:`features.workspace.write_workspace`, which validates everything before it
writes anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from features.catalog import non_product_categories, non_product_report
from features.contract import TABLES, ContractError, coerce_table
from features.workspace import Workspace, rewrite_workspace, write_workspace

__all__ = [
    "CATEGORY_POLICY",
    "OrderLineMapping",
    "import_table",
    "import_transactions",
    "order_lines_to_tables",
    "read_table_file",
]

OfferLevel = Literal["item", "category"]
_SNIFF_BYTES = 8192


def _looks_binary(head: bytes) -> bool:
    return b"\x00" in head


def read_table_file(path: Path | str, *, table: str = "transactions") -> pd.DataFrame:
    """Read a CSV/TSV or parquet file into a frame (CSV columns stay text, as written).

    Raises :class:`ContractError` naming the file when it is missing, empty, has a header
    but no rows, or is not a table at all.
    """
    file = Path(path)
    source = str(file)
    if not file.is_file():
        raise ContractError(table, "does not exist", source=source, hint="Check the path")
    if file.stat().st_size == 0:
        raise ContractError(
            table,
            "is empty (0 bytes)",
            source=source,
            hint="Export the table again, with a header row and data",
        )
    with file.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if head.startswith(b"PAR1") or file.suffix.lower() in (".parquet", ".pq"):
        try:
            frame = pq.read_table(file).to_pandas()
        except Exception as error:  # pyarrow raises several types for a broken file
            raise ContractError(
                table,
                f"is not a readable parquet table ({error})",
                source=source,
                hint="Give a CSV or parquet file",
            ) from error
    else:
        if _looks_binary(head):
            raise ContractError(
                table,
                "is not a table: it holds binary data, not CSV text",
                source=source,
                hint="Give a CSV (with a header row) or parquet",
            )
        separator = "\t" if file.suffix.lower() in (".tsv", ".tab") else ","
        try:
            frame = pd.read_csv(
                file,
                sep=separator,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                skipinitialspace=True,
            )
        except UnicodeDecodeError as error:
            raise ContractError(
                table,
                "is not a text table (it is not UTF-8)",
                source=source,
                hint="Save it as UTF-8 CSV",
            ) from error
        except pd.errors.EmptyDataError as error:
            raise ContractError(
                table,
                "is empty (no header row)",
                source=source,
                hint="Give a CSV with a header row and data",
            ) from error
        except pd.errors.ParserError as error:
            raise ContractError(
                table,
                f"is not a well-formed CSV table ({error})",
                source=source,
                hint="Check the quoting and the number of fields per row",
            ) from error
    if frame.shape[1] == 0:
        raise ContractError(
            table, "has no columns", source=source, hint="Give a table with a header row"
        )
    if frame.shape[1] == 1 and separator_mismatch(frame.columns[0]):
        raise ContractError(
            table,
            f"is not a table: its header {frame.columns[0]!r} has no column separators",
            source=source,
            hint="Give a comma-separated file (or .tsv for tabs) with a header row",
        )
    if len(frame) == 0:
        raise ContractError(
            table,
            "has a header but no rows",
            source=source,
            hint="Export the table again, with its data",
        )
    return frame


def separator_mismatch(header: object) -> bool:
    """A one-column header that contains a separator nobody splits on is not a table."""
    text = str(header)
    return any(mark in text for mark in (";", "\t", "|")) or text.startswith(("{", "[", "<"))


@dataclass(frozen=True)
class OrderLineMapping:
    """Which source column means what. Only ``customer``, ``time`` and ``item`` are needed."""

    customer: str
    time: str
    item: str
    category: str | None = None
    amount: str | None = None
    quantity: str | None = None
    order: str | None = None
    time_format: str | None = None
    title: str | None = None

    def columns(self) -> dict[str, str]:
        """Contract column → source column, for the columns that are mapped."""
        pairs = {
            "customer_id": self.customer,
            "ordered_at": self.time,
            "product_id": self.item,
            "category": self.category,
            "amount": self.amount,
            "quantity": self.quantity,
            "order_id": self.order,
        }
        return {contract: source for contract, source in pairs.items() if source}


_OPTION_FOR = {
    "customer_id": "--customer",
    "ordered_at": "--time",
    "product_id": "--item",
    "category": "--category",
    "amount": "--amount",
    "quantity": "--quantity",
    "order_id": "--order",
}


def _rename_error(error: ContractError, mapping: dict[str, str]) -> ContractError:
    source_column = mapping.get(error.column or "")
    if source_column is None:
        return error
    return ContractError(
        error.table,
        error.problem,
        column=f"{source_column} (→ {error.column})",
        row=error.row,
        value=error.value,
        hint=error.hint,
        source=error.source,
        more=error.more,
    )


def order_lines_to_tables(
    lines: pd.DataFrame,
    mapping: OrderLineMapping,
    *,
    offer_level: OfferLevel = "item",
    keep_non_products: bool = False,
    strict_categories: bool = False,
    quality: dict[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """Map order lines to customers, products, orders and offers.

    ``lines`` has at least the mapped customer, time and item columns. Lines of one
    customer at one time form one order unless an ``order`` column is mapped. Offers are
    one per item (``offer_id`` = the item id as given) or, with ``offer_level="category"``,
    one per category (``offer_id`` = the category as given). Items and categories that are
    not products (coupon lines, gift cards, fees, bags…: :mod:`features.catalog`) get no
    offer unless ``keep_non_products``; their lines stay in the orders. An item whose
    lines name several categories gets one by :data:`CATEGORY_POLICY` (its lines keep their
    rows), or, with ``strict_categories``, is an error. ``quality``, when given, receives the
    data-quality entry ``items_in_several_categories``. Raises :class:`ContractError` naming
    the source column, row and value of the first problem.
    """
    columns = mapping.columns()
    needed = [*columns.values(), *([mapping.title] if mapping.title else [])]
    missing = [source for source in needed if source not in lines.columns]
    if missing:
        contract = {source: name for name, source in columns.items()}
        raise ContractError(
            "transactions",
            "is missing column "
            + ", ".join(
                f"'{m}' (given with {_OPTION_FOR[contract[m]] if m in contract else '--title'})"
                for m in missing
            ),
            hint=f"Found columns: {', '.join(map(str, lines.columns))}",
        )
    if offer_level == "category" and mapping.category is None:
        raise ContractError(
            "transactions",
            "cannot make category offers without a category column",
            hint="Pass --category COL, or use --offer-level item",
        )
    raw = pd.DataFrame({name: lines[source] for name, source in columns.items()})
    raw = raw.reset_index(drop=True)
    if "order_id" not in raw:
        raw["order_id"] = raw["customer_id"].astype("str") + "@" + raw["ordered_at"].astype("str")
    if "quantity" not in raw:
        raw["quantity"] = 1.0
    if "amount" not in raw:
        raw["amount"] = np.nan
    try:
        orders = coerce_table("orders", raw, time_format=mapping.time_format)
    except ContractError as error:
        raise _rename_error(error, columns) from None
    for required in ("customer_id", "product_id"):
        empty = orders[required].isna().to_numpy()
        if empty.any():
            raise _rename_error(
                ContractError(
                    "transactions",
                    "is empty but every line needs one",
                    column=required,
                    row=int(np.flatnonzero(empty)[0]) + 1,
                    more=int(empty.sum()) - 1,
                    hint="Fill it in or drop the line",
                ),
                columns,
            )

    products, resolution = _products_from_lines(
        orders, raw.get("category"), columns, strict_categories=strict_categories
    )
    if mapping.title:
        products["title"] = _titles(orders, lines[mapping.title].reset_index(drop=True), products)
    if quality is not None:
        quality["items_in_several_categories"] = resolution
    customers = pd.DataFrame({"customer_id": orders["customer_id"].drop_duplicates().sort_values()})
    line_value = orders.loc[orders["quantity"] > 0].groupby("product_id")["amount"].mean()
    if offer_level == "item":
        offered = products
        if not keep_non_products:
            not_products = non_product_categories(products["category"].dropna(), items=True)
            offered = products[~products["category"].isin(list(not_products))]
        offers = pd.DataFrame(
            {
                "offer_id": offered["product_id"],
                "kind": "item",
                "title": offered["title"],
                "product_ids": [[product] for product in offered["product_id"]],
                "category": offered["category"],
                "value": offered["product_id"].map(line_value).round(2),
            }
        )
    else:
        category_value = (
            orders.loc[orders["quantity"] > 0, "amount"]
            .groupby(orders["product_id"].map(products.set_index("product_id")["category"]))
            .mean()
        )
        names = products["category"].dropna().drop_duplicates().sort_values()
        if not keep_non_products:
            names = names[~names.isin(list(non_product_categories(names)))]
        offers = pd.DataFrame(
            {
                "offer_id": names.to_numpy(),
                "kind": "category",
                "title": names.to_numpy(),
                "category": names.to_numpy(),
                "value": names.map(category_value).round(2).to_numpy(),
            }
        )
    return {"customers": customers, "products": products, "orders": orders, "offers": offers}


def _non_product_quality(
    tables: dict[str, pd.DataFrame],
    mapping: OrderLineMapping,
    offer_level: OfferLevel,
    keep_non_products: bool,
) -> dict[str, Any]:
    """The data-quality entry saying which categories made no offers, and why."""
    if mapping.category is None:
        return {
            "categories": {},
            "treatment": "not checked: no category column (--category) to tell products by",
            "rule": "features.catalog.NON_PRODUCT_RULES",
        }
    orders, products = tables["orders"], tables["products"]
    lines = pd.DataFrame(
        {
            "category": orders["product_id"].map(products.set_index("product_id")["category"]),
            "customer_id": orders["customer_id"],
            "product_id": orders["product_id"],
            "amount": orders["amount"],
        }
    )
    reasons = non_product_categories(
        products["category"].dropna().unique(), items=offer_level == "item"
    )
    return non_product_report(lines, reasons, offers_made=keep_non_products)


CATEGORY_POLICY = (
    "order lines kept; the item's product takes its most recent category: the one on its "
    "latest line with a category; a tie among lines at that time goes to the category on most "
    "of them, then to the first by name"
)
"""What an import does with an item whose lines name several categories (the default)."""

_EXAMPLES = 5


def _products_from_lines(
    orders: pd.DataFrame,
    category: pd.Series | None,
    columns: dict[str, str],
    *,
    strict_categories: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One product per item, its category resolved by :data:`CATEGORY_POLICY`, and the
    data-quality entry for the items whose lines name several categories."""
    items = pd.DataFrame({"product_id": orders["product_id"], "ordered_at": orders["ordered_at"]})
    quality: dict[str, Any] = {
        "items": 0,
        "lines_in_other_categories": 0,
        "share": 0.0,
        "examples": [],
        "treatment": (
            "none allowed: such an item is refused (strict_categories)"
            if strict_categories
            else CATEGORY_POLICY
        ),
    }
    if category is None:
        chosen = pd.Series(dtype="object")
        quality["treatment"] = "not checked: no category column (--category)"
    else:
        items["category"] = category.astype("str").str.strip().replace("", None)
        pairs = items[["product_id", "category"]].dropna(subset=["category"]).drop_duplicates()
        conflicting = pairs["product_id"].duplicated(keep=False)
        if conflicting.any() and strict_categories:
            item = pairs.loc[conflicting, "product_id"].iloc[0]
            seen = items[(items["product_id"] == item) & items["category"].notna()]
            first, other = seen.iloc[0], seen[seen["category"] != seen["category"].iloc[0]].iloc[0]
            raise ContractError(
                "transactions",
                f"is a duplicate key: item {item!r} has two categories, "
                f"{first['category']!r} (row {seen.index[0] + 1}) and "
                f"{other['category']!r} (row {other.name + 1})",
                column=f"{columns['category']} (→ category)",
                row=int(other.name) + 1,
                value=other["category"],
                hint="With --strict-categories an item belongs to one category: fix the file, "
                "or leave out --strict-categories to give each item its most recent category",
                more=int(pairs.loc[conflicting, "product_id"].nunique()) - 1,
            )
        chosen = pairs[~conflicting].set_index("product_id")["category"]
        if conflicting.any():
            several = items["product_id"].isin(pairs.loc[conflicting, "product_id"])
            resolved, found = _resolve_categories(items[several].dropna(subset=["category"]))
            chosen = pd.concat([chosen, resolved])
            quality |= found
            quality["share"] = round(found["lines_in_other_categories"] / len(orders), 5)
    sold = orders[orders["quantity"] > 0]
    unit_price = (sold["amount"] / sold["quantity"]).groupby(sold["product_id"]).median()
    products = pd.DataFrame(
        {"product_id": orders["product_id"].drop_duplicates().sort_values(ignore_index=True)}
    )
    products["category"] = products["product_id"].map(chosen)
    products["title"] = products["product_id"]
    products["price"] = products["product_id"].map(unit_price).round(2)
    return products, quality


def _titles(orders: pd.DataFrame, titles: pd.Series, products: pd.DataFrame) -> pd.Series:
    """Each item's name: the one on its latest line that has one (a retailer renames items
    as it reclassifies them), else its id."""
    named = pd.DataFrame(
        {"product_id": orders["product_id"], "at": orders["ordered_at"], "title": titles}
    )
    named["title"] = named["title"].astype("string").str.strip()
    named = named[named["title"].notna() & (named["title"] != "")]
    latest = named.sort_values(["product_id", "at"], kind="stable").groupby("product_id").last()
    return products["product_id"].map(latest["title"]).fillna(products["product_id"])


def _resolve_categories(lines: pd.DataFrame) -> tuple[pd.Series, dict[str, Any]]:
    """Each item's category by :data:`CATEGORY_POLICY`, from ``lines`` (``product_id``,
    ``ordered_at``, ``category``; each item in several categories), and what was found:
    how many items, how many of their lines name another category than the one chosen,
    and examples (the items with most such lines first, then by id)."""
    latest = lines.groupby("product_id")["ordered_at"].transform("max")
    seen = (
        lines.assign(at_latest=lines["ordered_at"] == latest)
        .groupby(["product_id", "category"])
        .agg(
            lines=("at_latest", "size"), at_latest=("at_latest", "sum"), last=("ordered_at", "max")
        )
        .reset_index()
    )
    ranked = seen.sort_values(
        ["product_id", "last", "at_latest", "category"],
        ascending=[True, False, False, True],
        na_position="last",
    )
    chosen = ranked.drop_duplicates("product_id").set_index("product_id")["category"]
    other = seen["category"].to_numpy() != seen["product_id"].map(chosen).to_numpy()
    moved = seen[other].groupby("product_id")["lines"].sum()
    first = sorted(chosen.index, key=lambda item: (-int(moved[item]), item))[:_EXAMPLES]
    examples = [
        {
            "item": item,
            "categories": {
                str(row.category): int(row.lines)
                for row in seen[seen["product_id"] == item].itertuples()
            },
            "chosen": chosen[item],
        }
        for item in first
    ]
    return chosen, {
        "items": len(chosen),
        "lines_in_other_categories": int(moved.sum()),
        "examples": examples,
    }


def import_transactions(
    path: Path | str,
    mapping: OrderLineMapping,
    workspace: Path | str,
    *,
    offer_level: OfferLevel = "item",
    keep_non_products: bool = False,
    strict_categories: bool = False,
) -> Workspace:
    """Read order lines from ``path`` and write them as the workspace ``workspace``.

    The manifest's ``data_quality["non_product_categories"]`` lists the categories whose
    items or category made no offer (see :func:`order_lines_to_tables`), with reasons and
    counts; ``data_quality["items_in_several_categories"]`` counts the items whose lines
    name several categories, with examples (the item, its categories with their lines, the
    one chosen by :data:`CATEGORY_POLICY`). ``strict_categories`` refuses such an item.
    """
    source = str(path)
    several: dict[str, Any] = {}
    try:
        lines = read_table_file(path)
        tables = order_lines_to_tables(
            lines,
            mapping,
            offer_level=offer_level,
            keep_non_products=keep_non_products,
            strict_categories=strict_categories,
            quality=several,
        )
    except ContractError as error:
        raise (error if error.source else error.with_source(source)) from None
    return write_workspace(
        workspace,
        tables,
        source={
            "name": "import",
            "file": str(Path(path).resolve()),
            "mapping": {k: v for k, v in asdict(mapping).items() if v is not None},
            "offer_level": offer_level,
            "keep_non_products": keep_non_products,
            "strict_categories": strict_categories,
        },
        data_quality={
            "non_product_categories": _non_product_quality(
                tables, mapping, offer_level, keep_non_products
            ),
            **several,
        },
    )


def import_table(
    table: str, path: Path | str, workspace: Path | str, *, time_format: str | None = None
) -> Workspace:
    """Replace one contract table of an existing workspace with a contract-shaped file.

    The file's columns carry the contract's names. Every reference to and from the new
    table is checked against the workspace (strictly: unknown ids are errors).
    """
    if table not in TABLES:
        raise ContractError(table, "is not a contract table", hint=f"Use one of {list(TABLES)}")
    existing = Workspace(Path(workspace)).require()
    source = str(path)
    try:
        frame = coerce_table(table, read_table_file(path, table=table), time_format=time_format)
        tables = existing.read_all()
        tables[table] = frame
        given = existing.manifest["source"]
        imported = list(given.get("imported_tables", []))
        return rewrite_workspace(
            existing,
            tables,
            source=dict(given)
            | {"imported_tables": [*imported, {"table": table, "file": str(Path(path).resolve())}]},
        )
    except ContractError as error:
        raise (error if error.source else error.with_source(source)) from None
