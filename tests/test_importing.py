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
        ["--strict-categories"],
        r"column 'aisle \(→ category\)', row 3: value 'Frozen' is a duplicate key: item 'A-1' "
        r"has two categories, 'Bakery' \(row 1\) and 'Frozen' \(row 3\)\. With "
        r"--strict-categories an item belongs to one category: fix the file, or leave out "
        r"--strict-categories to give each item its most recent category$",
        id="duplicate-key-strict",
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


RECLASSIFIED_CSV = """\
shopper,ts,sku,aisle,paid,units
0042,2025-03-01 09:00:00,A-1,Bakery,1.5,1
0042,2025-03-09 10:00:00,A-1,Frozen,1.5,1
77,2025-03-02 12:00:00,A-1,Bakery,1.5,1
77,2025-03-02 12:00:00,B-2,Cheese,1.5,1
0042,2025-03-01 09:00:00,B-2,Cheese,1.5,1
77,2025-03-09 12:00:00,B-2,Cheese,1.5,1
88,2025-03-09 12:00:00,B-2,Dairy,1.5,1
99,2025-03-09 12:00:00,B-2,Dairy,1.5,1
0042,2025-03-01 09:00:00,C-3,Produce,1.5,1
88,2025-03-09 12:00:00,C-3,Produce,1.5,1
99,2025-03-09 12:00:00,C-3,Fruit,1.5,1
77,2025-03-02 12:00:00,E-5,Snacks,1.5,1
88,2025-03-09 12:00:00,E-5,,1.5,1
"""
"""Order lines of reclassified items. A-1 moved from Bakery to Frozen: its latest line is
Frozen (Bakery comes first and last in the file, has more lines and comes first by name).
B-2's latest time has two Dairy lines and one Cheese: Dairy (Cheese has more lines overall
and comes first by name). C-3's latest time has one Produce and one Fruit line, a tie:
Fruit, first by name (Produce comes first in the file and has more lines). E-5's latest
line has no category: Snacks, its only one, and it is not counted."""


def _reclassified(tmp_path: Path) -> Path:
    source = tmp_path / "lines.csv"
    source.write_text(RECLASSIFIED_CSV)
    return source


RECLASSIFIED = {
    "items": 3,
    "lines_in_other_categories": 7,  # 2 Bakery, B-2: 3 Cheese, C-3: 2 Produce
    "share": 0.53846,  # 7 of 13 lines
    "examples": [  # most lines in another category first, then by id
        {"item": "B-2", "categories": {"Cheese": 3, "Dairy": 2}, "chosen": "Dairy"},
        {"item": "A-1", "categories": {"Bakery": 2, "Frozen": 1}, "chosen": "Frozen"},
        {"item": "C-3", "categories": {"Fruit": 1, "Produce": 2}, "chosen": "Fruit"},
    ],
    "treatment": "order lines kept; the item's product takes its most recent category: the "
    "one on its latest line with a category; a tie among lines at that time goes to the "
    "category on most of them, then to the first by name",
}


def test_an_item_in_several_categories_takes_its_most_recent_one(tmp_path: Path) -> None:
    source = _reclassified(tmp_path)
    workspace = import_transactions(source, MAPPING, tmp_path / "ws")

    products = workspace.read("products").set_index("product_id")["category"]
    assert products.to_dict() == {"A-1": "Frozen", "B-2": "Dairy", "C-3": "Fruit", "E-5": "Snacks"}
    orders = workspace.read("orders")
    assert len(orders) == 13
    assert orders["product_id"].tolist() == ["A-1"] * 3 + ["B-2"] * 5 + ["C-3"] * 3 + ["E-5"] * 2
    offers = workspace.read("offers").set_index("offer_id")["category"]
    assert offers.to_dict() == products.to_dict()
    assert workspace.manifest["data_quality"]["items_in_several_categories"] == RECLASSIFIED
    assert workspace.manifest["source"]["strict_categories"] is False


def test_category_offers_follow_the_resolved_categories(tmp_path: Path) -> None:
    source = _reclassified(tmp_path)
    workspace = import_transactions(source, MAPPING, tmp_path / "ws", offer_level="category")
    assert sorted(workspace.read("offers")["offer_id"]) == ["Dairy", "Frozen", "Fruit", "Snacks"]


def test_strict_categories_refuses_an_item_in_several_categories(tmp_path: Path) -> None:
    source = _reclassified(tmp_path)
    with pytest.raises(
        ContractError,
        match=r"lines.csv: table 'transactions', column 'aisle \(→ category\)', row 2: value "
        r"'Frozen' is a duplicate key: item 'A-1' has two categories, 'Bakery' \(row 1\) and "
        r"'Frozen' \(row 2\) \(2 more problems of this kind\)\. With --strict-categories .* "
        r"its most recent category$",
    ):
        import_transactions(source, MAPPING, tmp_path / "ws", strict_categories=True)
    assert not (tmp_path / "ws").exists()


def test_one_category_per_item_reports_none_and_strict_accepts_it(tmp_path: Path) -> None:
    source = _write(_lines(), tmp_path / "lines.csv")
    workspace = import_transactions(source, MAPPING, tmp_path / "ws", strict_categories=True)
    assert workspace.manifest["data_quality"]["items_in_several_categories"] == {
        "items": 0,
        "lines_in_other_categories": 0,
        "share": 0.0,
        "examples": [],
        "treatment": "none allowed: such an item is refused (strict_categories)",
    }
    unchecked = import_transactions(
        source, OrderLineMapping(customer="shopper", time="ts", item="sku"), tmp_path / "bare"
    )
    report = unchecked.manifest["data_quality"]["items_in_several_categories"]
    assert report["items"] == 0
    assert report["treatment"] == "not checked: no category column (--category)"


def test_cli_import_prints_and_records_items_in_several_categories(tmp_path: Path) -> None:
    source = _reclassified(tmp_path)
    target = tmp_path / "ws"
    result = CliRunner().invoke(
        app, ["import", "transactions", str(source), *CLI_MAPPING, "--workspace", str(target)]
    )
    assert result.exit_code == 0, result.output
    line = (
        "quality     3 items are in several categories (e.g. B-2: Cheese, Dairy → Dairy; "
        "A-1: Bakery, Frozen → Frozen; C-3: Fruit, Produce → Fruit): order lines kept; the "
        "item's product takes its most recent category"
    )
    assert line in result.stdout
    assert Workspace(target).manifest["data_quality"]["items_in_several_categories"]["items"] == 3
    summary = CliRunner().invoke(app, ["data", "summary", "-w", str(target)])
    assert summary.exit_code == 0 and line in summary.stdout


def test_item_names_come_from_their_latest_line_and_reach_the_offers(tmp_path: Path) -> None:
    lines = _lines().assign(
        # A-1 was renamed on its later line; C-3 has no name and keeps its id
        name=["Bread", "Milk 1L", "Sourdough Bread", "", "Milk 1L"],
    )
    source = _write(lines, tmp_path / "lines.csv")
    mapping = OrderLineMapping(**{**MAPPING.__dict__, "title": "name"})
    workspace = import_transactions(source, mapping, tmp_path / "ws")
    products = workspace.read("products").set_index("product_id")["title"]
    assert products.to_dict() == {"A-1": "Sourdough Bread", "B-2": "Milk 1L", "C-3": "C-3"}
    offers = workspace.read("offers").set_index("offer_id")["title"]
    assert offers["A-1"] == "Sourdough Bread"
    result = CliRunner().invoke(
        app,
        [
            "import",
            "transactions",
            str(source),
            *CLI_MAPPING,
            "--title",
            "label",
            "-w",
            str(tmp_path / "ws2"),
        ],
    )
    assert result.exit_code != 0 and "'label' (given with --title)" in result.output
    assert not (tmp_path / "ws2").exists()
