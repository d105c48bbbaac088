"""The data contract: coercion and validation produce one clear error per bad input."""

from __future__ import annotations

import pandas as pd
import pytest

from features import TABLES, ContractError, coerce_table, validate_foreign_keys, validate_table


def _orders(**overrides: list[object]) -> pd.DataFrame:
    data: dict[str, list[object]] = {
        "order_id": ["o1", "o1", "o2"],
        "customer_id": ["c1", "c1", "c2"],
        "product_id": ["p1", "p2", "p1"],
        "ordered_at": ["2025-01-01 10:00", "2025-01-01 10:00", "2025-01-02 11:30"],
        "quantity": ["1", "2", "-1"],
        "amount": ["2.50", "5", "-2.50"],
    }
    data.update(overrides)
    return pd.DataFrame(data)


def test_coerce_gives_contract_types_and_keeps_ids_as_text() -> None:
    raw = _orders(customer_id=["007", "007", "010"])
    orders = coerce_table("orders", raw)
    assert list(orders.columns) == TABLES["orders"].column_names
    assert orders["customer_id"].tolist() == ["007", "007", "010"]
    assert str(orders["ordered_at"].dtype) == "datetime64[us]"
    assert orders["quantity"].tolist() == [1.0, 2.0, -1.0]
    assert orders["discount"].tolist() == [0.0, 0.0, 0.0]
    validate_table("orders", orders)


def test_coerce_does_not_mutate_its_input() -> None:
    raw = _orders()
    before = raw.copy()
    coerce_table("orders", raw)
    pd.testing.assert_frame_equal(raw, before)


@pytest.mark.parametrize(
    ("overrides", "time_format", "match"),
    [
        (
            {"quantity": ["1", "two", "3"]},
            None,
            r"table 'orders', column 'quantity', row 2: value 'two' is not a number",
        ),
        (
            {"ordered_at": ["2025-01-01", "01/02/2025", "2025-01-03"]},
            "%Y-%m-%d",
            r"column 'ordered_at', row 2: value '01/02/2025' does not match the time format "
            r"'%Y-%m-%d'",
        ),
        (
            {"ordered_at": ["2025-01-01", "yesterday", "2025-01-03"]},
            None,
            r"row 2: value 'yesterday' is not a recognisable date/time",
        ),
    ],
)
def test_unconvertible_values_name_column_row_and_value(
    overrides: dict[str, list[object]], time_format: str | None, match: str
) -> None:
    with pytest.raises(ContractError, match=match):
        coerce_table("orders", _orders(**overrides), time_format=time_format)


def test_missing_required_column_is_named() -> None:
    with pytest.raises(ContractError, match=r"table 'orders'.*missing required column 'amount'"):
        coerce_table("orders", _orders().drop(columns=["amount"]))


@pytest.mark.parametrize(
    ("table", "frame", "match"),
    [
        (
            "customers",
            pd.DataFrame({"customer_id": ["a", "b", "a"]}),
            r"column 'customer_id', row 1: value 'a' is a duplicate key: customer_id must be "
            r"unique, and rows 1, 3 share it",
        ),
        (
            "offers",
            pd.DataFrame({"offer_id": ["x"], "kind": ["voucher"]}),
            r"column 'kind', row 1: value 'voucher' is not allowed \(allowed: item, category",
        ),
        (
            "offers",
            pd.DataFrame({"offer_id": ["x"], "kind": ["item"], "channels": ["web|fax"]}),
            r"column 'channels', row 1: .* holds a value that is not allowed",
        ),
        (
            "exposures",
            pd.DataFrame(
                {
                    "exposure_id": ["e1"],
                    "customer_id": ["c"],
                    "offer_id": ["o"],
                    "shown_at": ["2025-01-01"],
                    "channel": ["web"],
                    "propensity": ["1.5"],
                }
            ),
            r"column 'propensity', row 1: value 1.5 is above the maximum 1.0",
        ),
        (
            "orders",
            _orders(customer_id=["c1", None, "c2"]),
            r"column 'customer_id', row 2: is empty but the column requires a value",
        ),
    ],
)
def test_validation_failures_are_one_clear_error(
    table: str, frame: pd.DataFrame, match: str
) -> None:
    with pytest.raises(ContractError, match=match):
        validate_table(table, coerce_table(table, frame))


def test_wrong_dtype_in_memory_is_reported() -> None:
    orders = coerce_table("orders", _orders()).astype({"quantity": "str"})
    with pytest.raises(ContractError, match=r"column 'quantity': has the wrong type"):
        validate_table("orders", orders)


def test_unknown_foreign_key_names_row_and_id() -> None:
    orders = coerce_table("orders", _orders())
    products = coerce_table("products", pd.DataFrame({"product_id": ["p1"]}))
    with pytest.raises(
        ContractError,
        match=r"table 'orders', column 'product_id', row 2: value 'p2' refers to an unknown "
        r"product \(not in table 'products'\)",
    ):
        validate_foreign_keys({"orders": orders, "products": products})


def test_tolerated_orphans_are_counted_not_raised() -> None:
    orders = coerce_table("orders", _orders())
    products = coerce_table("products", pd.DataFrame({"product_id": ["p1"]}))
    orphans = validate_foreign_keys(
        {"orders": orders, "products": products}, allow_orphans={"orders.product_id"}
    )
    assert orphans == {"orders.product_id": 1}


def test_list_references_are_checked_per_item() -> None:
    products = coerce_table("products", pd.DataFrame({"product_id": ["p1", "p2"]}))
    offers = coerce_table(
        "offers",
        pd.DataFrame(
            {
                "offer_id": ["a", "b"],
                "kind": ["bundle", "bundle"],
                "product_ids": ["p1|p2", "p2|p9"],
            }
        ),
    )
    with pytest.raises(ContractError, match=r"column 'product_ids', row 2: value 'p9'"):
        validate_foreign_keys({"offers": offers, "products": products})


def test_every_table_tags_pii_and_describes_every_column() -> None:
    for spec in TABLES.values():
        assert all(column.description for column in spec.columns), spec.name
        if "customer_id" in spec.column_names:
            assert "customer_id" in spec.pii_columns, spec.name
    assert {"age_band", "income_band"} <= set(TABLES["customers"].pii_columns)
    assert "price" not in TABLES["products"].pii_columns
