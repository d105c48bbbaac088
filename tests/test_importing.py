"""Generic import: any retailer's order lines become a workspace, or one clear error."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from features import (
    ContractError,
    OrderLineMapping,
    Workspace,
    World,
    import_table,
    import_transactions,
    summarize,
)
from nextbest.cli import app

MAPPING = OrderLineMapping(
    customer="shopper", time="ts", item="sku", category="aisle", amount="paid", quantity="units"
)
CLI_MAPPING = [
    "--customer",
    "shopper",
    "--time",
    "ts",
    "--item",
    "sku",
    "--category",
    "aisle",
    "--amount",
    "paid",
    "--quantity",
    "units",
]


def _lines() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "shopper": ["0042", "0042", "0042", "77", "77"],
            "ts": [
                "2025-03-01 09:00:00",
                "2025-03-01 09:00:00",
                "2025-03-05 18:30:00",
                "2025-03-02 12:00:00",
                "2025-03-09 12:00:00",
            ],
            "sku": ["A-1", "B-2", "A-1", "C-3", "B-2"],
            "aisle": ["Bakery", "Dairy", "Bakery", "Produce", "Dairy"],
            "paid": ["2.0", "3.5", "4.0", "1.25", "3.5"],
            "units": ["1", "1", "2", "1", "1"],
        }
    )


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def test_import_round_trip_keeps_every_line_and_id(tmp_path: Path) -> None:
    source = _write(_lines(), tmp_path / "lines.csv")
    workspace = import_transactions(source, MAPPING, tmp_path / "ws")

    orders = workspace.read("orders")
    assert len(orders) == 5
    assert orders["customer_id"].tolist() == ["0042", "0042", "0042", "77", "77"]
    assert orders["product_id"].tolist() == ["A-1", "B-2", "A-1", "C-3", "B-2"]
    assert orders["amount"].tolist() == [2.0, 3.5, 4.0, 1.25, 3.5]
    assert orders["ordered_at"].iloc[2] == pd.Timestamp("2025-03-05 18:30:00")
    # Lines of one customer at one time are one order.
    assert orders["order_id"].nunique() == 4
    offers = workspace.read("offers")
    assert sorted(offers["offer_id"]) == ["A-1", "B-2", "C-3"]
    assert set(offers["kind"]) == {"item"}
    assert offers.set_index("offer_id").loc["A-1", "product_ids"] == ["A-1"]
    products = workspace.read("products").set_index("product_id")
    assert products.loc["A-1", "category"] == "Bakery"
    assert products.loc["A-1", "price"] == 2.0  # median unit price of 2.0 and 4.0/2
    summary = summarize(workspace)
    assert summary["customers_with_orders"] == 2
    assert summary["date_range"] == {"first": "2025-03-01T09:00:00", "last": "2025-03-09T12:00:00"}
    assert workspace.manifest["source"]["mapping"]["item"] == "sku"


def test_category_offer_level_makes_one_offer_per_category(tmp_path: Path) -> None:
    source = _write(_lines(), tmp_path / "lines.csv")
    workspace = import_transactions(source, MAPPING, tmp_path / "ws", offer_level="category")
    offers = workspace.read("offers")
    assert sorted(offers["offer_id"]) == ["Bakery", "Dairy", "Produce"]
    assert set(offers["kind"]) == {"category"}


def test_parquet_and_time_format(tmp_path: Path) -> None:
    lines = _lines().assign(
        ts=[
            "01/03/2025 09:00",
            "01/03/2025 09:00",
            "05/03/2025 18:30",
            "02/03/2025 12:00",
            "09/03/2025 12:00",
        ]
    )
    lines.to_parquet(tmp_path / "lines.parquet")
    mapping = OrderLineMapping(
        customer="shopper", time="ts", item="sku", time_format="%d/%m/%Y %H:%M"
    )
    workspace = import_transactions(tmp_path / "lines.parquet", mapping, tmp_path / "ws")
    assert workspace.read("orders")["ordered_at"].max() == pd.Timestamp("2025-03-09 12:00")


def test_scenario_orders_survive_a_csv_round_trip(small_world: World, tmp_path: Path) -> None:
    orders = small_world.tables["orders"]
    categories = small_world.tables["products"].set_index("product_id")["category"]
    export = orders.assign(category=orders["product_id"].map(categories))
    export.to_csv(tmp_path / "export.csv", index=False)
    mapping = OrderLineMapping(
        customer="customer_id",
        time="ordered_at",
        item="product_id",
        category="category",
        amount="amount",
        quantity="quantity",
        order="order_id",
    )
    workspace = import_transactions(tmp_path / "export.csv", mapping, tmp_path / "ws")
    back = workspace.read("orders")
    for column in ("order_id", "customer_id", "product_id", "quantity", "amount"):
        assert back[column].tolist() == orders[column].tolist(), column
    assert (back["ordered_at"] == pd.to_datetime(orders["ordered_at"])).all()


BAD_INPUTS = [
    pytest.param(
        lambda d: d.drop(columns=["sku"]),
        [],
        r"lines.csv: table 'transactions': is missing column 'sku' \(given with --item\)",
        id="missing-column",
    ),
    pytest.param(
        lambda d: d.assign(paid=["2.0", "3.5", "four", "1.25", "3.5"]),
        [],
        r"column 'paid \(→ amount\)', row 3: value 'four' is not a number",
        id="wrong-type",
    ),
    pytest.param(
        lambda d: d.assign(ts=["2025-03-01", "2025-03-01", "5 March", "2025-03-02", "2025-03-09"]),
        ["--time-format", "%Y-%m-%d"],
        r"column 'ts \(→ ordered_at\)', row 3: value '5 March' does not match the time format "
        r"'%Y-%m-%d'",
        id="unparseable-time",
    ),
    pytest.param(
        lambda d: d.assign(aisle=["Bakery", "Dairy", "Frozen", "Produce", "Dairy"]),
        [],
        r"column 'aisle \(→ category\)', row 3: value 'Frozen' is a duplicate key: item 'A-1' "
        r"has two categories, 'Bakery' \(row 1\) and 'Frozen' \(row 3\)",
        id="duplicate-key",
    ),
    pytest.param(
        lambda d: d.assign(shopper=["0042", None, "0042", "77", "77"]),
        [],
        r"column 'shopper \(→ customer_id\)', row 2: is empty but every line needs one",
        id="empty-id",
    ),
]


@pytest.mark.parametrize(("corrupt", "extra", "match"), BAD_INPUTS)
def test_bad_order_lines_give_one_clear_error_and_write_nothing(
    tmp_path: Path, corrupt: object, extra: list[str], match: str
) -> None:
    source = _write(corrupt(_lines()), tmp_path / "lines.csv")  # type: ignore[operator]
    target = tmp_path / "ws"
    result = CliRunner().invoke(
        app,
        ["import", "transactions", str(source), *CLI_MAPPING, *extra, "--workspace", str(target)],
    )
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message
    assert pytest.importorskip("re").search(match, message), message
    assert not target.exists()
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(b"", r"is empty \(0 bytes\)", id="empty-file"),
        pytest.param(b"shopper,ts,sku\n", r"has a header but no rows", id="header-only"),
        pytest.param(
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"is not a table: it holds binary", id="binary"
        ),
        pytest.param(b'{"orders": [{"sku": "A-1"}]}\n', r"is not a table: its header", id="json"),
        pytest.param(b"a,b\n1,2\n3,4,5,6\n", r"is not a well-formed CSV table", id="ragged"),
        pytest.param(
            b"PAR1 this is not really parquet",
            r"is not a readable parquet table",
            id="broken-parquet",
        ),
    ],
)
def test_files_that_are_not_tables_are_refused(tmp_path: Path, content: bytes, match: str) -> None:
    source = tmp_path / "lines.csv"
    source.write_bytes(content)
    with pytest.raises(ContractError, match=match):
        import_transactions(source, MAPPING, tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=r"nothere.csv: table 'transactions': does not exist"):
        import_transactions(tmp_path / "nothere.csv", MAPPING, tmp_path / "ws")


def test_import_table_checks_references_strictly_and_leaves_workspace_as_it_was(
    tmp_path: Path,
) -> None:
    workspace = import_transactions(
        _write(_lines(), tmp_path / "lines.csv"), MAPPING, tmp_path / "ws"
    )
    before = workspace.manifest["fingerprint"]
    consent = pd.DataFrame(
        {
            "customer_id": ["0042", "nobody"],
            "channel": ["email", "email"],
            "purpose": ["marketing", "marketing"],
            "granted": ["yes", "no"],
        }
    )
    consent.to_csv(tmp_path / "consent.csv", index=False)
    with pytest.raises(
        ContractError,
        match=r"consent.csv: table 'consent', column 'customer_id', row 2: value 'nobody' refers "
        r"to an unknown customer",
    ):
        import_table("consent", tmp_path / "consent.csv", workspace.path)
    assert Workspace(workspace.path).manifest["fingerprint"] == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    consent.iloc[:1].to_csv(tmp_path / "consent.csv", index=False)
    updated = import_table("consent", tmp_path / "consent.csv", workspace.path)
    assert updated.read("consent")["granted"].tolist() == [True]
    assert updated.manifest["fingerprint"] != before
    assert len(updated.read("orders")) == 5


def test_category_offers_need_a_category_column(tmp_path: Path) -> None:
    mapping = OrderLineMapping(customer="shopper", time="ts", item="sku")
    with pytest.raises(ContractError, match=r"cannot make category offers without a category"):
        import_transactions(
            _write(_lines(), tmp_path / "l.csv"), mapping, tmp_path / "ws", offer_level="category"
        )


def _lines_with_non_products() -> pd.DataFrame:
    extra = pd.DataFrame(
        {
            "shopper": ["0042", "77", "77", "0042"],
            "ts": [
                "2025-03-01 09:00:00",
                "2025-03-02 12:00:00",
                "2025-03-09 12:00:00",
                "2025-03-05 18:30:00",
            ],
            "sku": ["GC-25", "BAG", "BAG", "CARD-1"],
            "aisle": ["Gift Cards", "Bag fee", "Bag fee", "Gift & Greeting Cards"],
            "paid": ["25.0", "0.1", "0.1", "3.0"],
            "units": ["1", "1", "1", "1"],
        }
    )
    return pd.concat([_lines(), extra], ignore_index=True)


@pytest.mark.parametrize(
    ("offer_level", "offered"),
    [
        ("item", ["A-1", "B-2", "C-3", "CARD-1"]),
        ("category", ["Bakery", "Dairy", "Gift & Greeting Cards", "Produce"]),
    ],
)
def test_gift_cards_and_bag_fees_make_no_offers_and_are_reported(
    tmp_path: Path, offer_level: str, offered: list[str]
) -> None:
    source = _write(_lines_with_non_products(), tmp_path / "lines.csv")
    workspace = import_transactions(
        source,
        MAPPING,
        tmp_path / "ws",
        offer_level=offer_level,  # type: ignore[arg-type]
    )
    assert sorted(workspace.read("offers")["offer_id"]) == offered
    # The lines are history: they stay, with their products.
    assert len(workspace.read("orders")) == 9
    assert {"GC-25", "BAG"} <= set(workspace.read("products")["product_id"])

    report = summarize(workspace)["data_quality"]["non_product_categories"]
    assert report["categories"] == {
        "Bag fee": {
            "reason": "fees, charges and deposits; carrier bags",
            "lines": 2,
            "customers": 1,
            "products": 1,
            "amount": 0.2,
        },
        "Gift Cards": {
            "reason": "gift cards and vouchers (stored value)",
            "lines": 1,
            "customers": 1,
            "products": 1,
            "amount": 25.0,
        },
    }
    assert report["lines"] == 3
    assert report["treatment"] == "order lines kept; no offer is made for them"


def test_non_products_can_be_kept_as_offers_on_request(tmp_path: Path) -> None:
    source = _write(_lines_with_non_products(), tmp_path / "lines.csv")
    workspace = import_transactions(source, MAPPING, tmp_path / "ws", keep_non_products=True)
    assert {"GC-25", "BAG"} <= set(workspace.read("offers")["offer_id"])
    report = workspace.manifest["data_quality"]["non_product_categories"]
    assert set(report["categories"]) == {"Bag fee", "Gift Cards"}
    assert report["treatment"] == "kept as offers on request (keep_non_products)"
    assert workspace.manifest["source"]["keep_non_products"] is True


def test_placeholder_categories_keep_their_items_as_offers(tmp_path: Path) -> None:
    lines = _lines().assign(aisle=["Bakery", "Unknown", "Bakery", "Produce", "Unknown"])
    source = _write(lines, tmp_path / "lines.csv")
    items = import_transactions(source, MAPPING, tmp_path / "items")
    assert sorted(items.read("offers")["offer_id"]) == ["A-1", "B-2", "C-3"]
    assert items.manifest["data_quality"]["non_product_categories"]["categories"] == {}
    categories = import_transactions(source, MAPPING, tmp_path / "cats", offer_level="category")
    assert sorted(categories.read("offers")["offer_id"]) == ["Bakery", "Produce"]
    report = categories.manifest["data_quality"]["non_product_categories"]
    assert report["categories"]["Unknown"]["reason"] == "no category given (a placeholder name)"


def test_without_a_category_column_non_products_are_not_checked(tmp_path: Path) -> None:
    mapping = OrderLineMapping(customer="shopper", time="ts", item="sku")
    workspace = import_transactions(
        _write(_lines_with_non_products(), tmp_path / "l.csv"), mapping, tmp_path / "ws"
    )
    assert len(workspace.read("offers")) == 6
    report = workspace.manifest["data_quality"]["non_product_categories"]
    assert report["categories"] == {} and report["treatment"].startswith("not checked")
