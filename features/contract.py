"""The data contract: the canonical tables every stage of nextbest reads.

Each table is declared once, as a :class:`TableSpec`. From that declaration come the
pandera schema that validates a frame, the coercion that turns raw file columns into
the contract's types, the foreign-key checks across tables, and the PII tags.

Conventions that hold for every table:

* Ids (customers, products, offers, orders, exposures) are strings, exactly as the source
  gives them: ``"00123"`` stays ``"00123"``.
* Times are timezone-naive ``datetime64[us]`` in the retailer's local time.
* List-valued columns (an offer's products, channels and targets) hold Python lists of
  strings; an empty list means "no restriction" where the column is a restriction.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

__all__ = [
    "CHANNELS",
    "EVENT_TYPES",
    "OFFER_KINDS",
    "OUTCOMES",
    "TABLES",
    "ColumnSpec",
    "ContractError",
    "TableSpec",
    "coerce_table",
    "empty_table",
    "validate_foreign_keys",
    "validate_table",
    "validate_tables",
]

Dtype = Literal["string", "float", "int", "bool", "datetime", "string_list"]

CHANNELS = ("web", "app", "email", "sms", "mailer")
OFFER_KINDS = ("item", "category", "coupon", "bundle")
BUNDLE_TIERS = ("good", "better", "best")
LEDGER_EXPOSURE_PREFIX = "ledger:"
"""Exposures exported from the live ledger (``nextbest ledger export``) have ids that start
with it; no source's own ids do."""
OUTCOMES = ("viewed", "accepted", "declined", "purchased", "redeemed", "returned")
EVENT_TYPES = (
    "browse",
    "view",
    "cart_add",
    "cart_abandon",
    "support_opened",
    "support_resolved",
    "usage",
    "email_open",
    "email_click",
    "loyalty_tier_change",
)
CONSENT_PURPOSES = ("marketing", "personalisation")
COMPATIBILITY_RELATIONS = ("completes", "upgrades_to", "same_family")

_PANDAS_DTYPES: dict[str, Any] = {
    "string": "str",
    "float": "float64",
    "int": "Int64",
    "bool": "bool",
    "datetime": "datetime64[us]",
    "string_list": "object",
}

_EXPECTED_WORDS = {
    "string": "text",
    "float": "a number",
    "int": "a whole number",
    "bool": "true or false",
    "datetime": "a date/time",
    "string_list": "a list of ids",
}


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a contract table."""

    name: str
    dtype: Dtype
    description: str
    required: bool = True
    nullable: bool = False
    pii: bool = False
    allowed: tuple[str, ...] | None = None
    min_value: float | None = None
    max_value: float | None = None
    default: Any = None


@dataclass(frozen=True)
class TableSpec:
    """A contract table: its columns, its unique key and its references to other tables."""

    name: str
    description: str
    columns: tuple[ColumnSpec, ...]
    key: tuple[str, ...] = ()
    foreign_keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def column_names(self) -> list[str]:
        return [column.name for column in self.columns]

    @property
    def required_columns(self) -> list[str]:
        return [column.name for column in self.columns if column.required]

    @property
    def pii_columns(self) -> list[str]:
        return [column.name for column in self.columns if column.pii]

    def column(self, name: str) -> ColumnSpec:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"table '{self.name}' has no column '{name}'")


class ContractError(ValueError):
    """A table broke the data contract.

    The message names the table, the column, the row (counted from 1, header excluded)
    and the offending value, and says what to do instead. ``source`` is the file the
    table came from, when there is one.
    """

    def __init__(
        self,
        table: str,
        problem: str,
        *,
        column: str | None = None,
        row: int | None = None,
        value: Any = None,
        hint: str = "",
        source: str | None = None,
        more: int = 0,
    ) -> None:
        self.table = table
        self.problem = problem
        self.column = column
        self.row = row
        self.value = value.item() if isinstance(value, np.generic) else value
        self.hint = hint
        self.source = source
        self.more = more
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = [f"table '{self.table}'"]
        if self.column is not None:
            where.append(f"column '{self.column}'")
        if self.row is not None:
            where.append(f"row {self.row}")
        message = (f"{self.source}: " if self.source else "") + ", ".join(where) + ": "
        if self.value is not None:
            message += f"value {self.value!r} "
        message += self.problem
        if self.more:
            message += f" ({self.more} more problem{'s' if self.more > 1 else ''} of this kind)"
        if self.hint:
            message += f". {self.hint}"
        return message

    def with_source(self, source: str) -> ContractError:
        return ContractError(
            self.table,
            self.problem,
            column=self.column,
            row=self.row,
            value=self.value,
            hint=self.hint,
            source=source,
            more=self.more,
        )


def _col(name: str, dtype: Dtype, description: str, **kwargs: Any) -> ColumnSpec:
    return ColumnSpec(name=name, dtype=dtype, description=description, **kwargs)


def _optional(name: str, dtype: Dtype, description: str, **kwargs: Any) -> ColumnSpec:
    kwargs.setdefault("nullable", True)
    return ColumnSpec(name=name, dtype=dtype, description=description, required=False, **kwargs)


_CUSTOMER_ID = _col("customer_id", "string", "The customer's id, as the source gives it.", pii=True)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "customers",
            "One row per customer, with segment attributes where they are known.",
            (
                _CUSTOMER_ID,
                _optional("segment", "string", "Segment label used for targeting and fairness."),
                _optional("signup_at", "datetime", "When the customer signed up (tenure)."),
                _optional("loyalty_tier", "string", "Current loyalty tier."),
                _optional("age_band", "string", "Age band.", pii=True),
                _optional("income_band", "string", "Income band.", pii=True),
                _optional("household_size", "string", "People in the household.", pii=True),
                _optional("household_composition", "string", "Adults and kids.", pii=True),
                _optional("kids_count", "string", "Children in the household.", pii=True),
                _optional("home_ownership", "string", "Homeowner or renter.", pii=True),
                _optional("marital_status", "string", "Marital status.", pii=True),
            ),
            key=("customer_id",),
        ),
        TableSpec(
            "products",
            "The catalog: one row per product, with its department → category → type.",
            (
                _col("product_id", "string", "The product's id, as the source gives it."),
                _optional("title", "string", "A name a customer would recognise."),
                _optional("department", "string", "Top level of the hierarchy."),
                _optional("category", "string", "Middle level of the hierarchy."),
                _optional("product_type", "string", "Lowest level of the hierarchy."),
                _optional("brand", "string", "Brand."),
                _optional("price", "float", "Typical unit price.", min_value=0.0),
                _optional("cost", "float", "Unit cost, where known.", min_value=0.0),
                _optional("package_size", "string", "Package size as printed."),
                _optional("family", "string", "Product family (ecosystem) it belongs to."),
                _optional("ladder", "string", "Upgrade ladder it sits on."),
                _optional("ladder_step", "int", "Position on the ladder, 1 = entry.", min_value=1),
            ),
            key=("product_id",),
        ),
        TableSpec(
            "orders",
            "Order lines. A negative quantity is a return.",
            (
                _col("order_id", "string", "Order (basket) id."),
                _CUSTOMER_ID,
                _col("product_id", "string", "The product bought."),
                _col("ordered_at", "datetime", "When the order was placed."),
                _col("quantity", "float", "Units; negative for a return."),
                _col(
                    "amount",
                    "float",
                    "What the customer paid for the line, after discounts (empty if unknown).",
                    nullable=True,
                ),
                _optional("discount", "float", "Total discount on the line.", default=0.0),
                _optional("store_id", "string", "Store or site."),
            ),
            foreign_keys={"customer_id": "customers", "product_id": "products"},
        ),
        TableSpec(
            "offers",
            "What can be offered: items, categories, coupons and bundles.",
            (
                _col("offer_id", "string", "The offer's id."),
                _col("kind", "string", "item, category, coupon or bundle.", allowed=OFFER_KINDS),
                _optional("title", "string", "What the customer sees."),
                _optional(
                    "product_ids",
                    "string_list",
                    "The products it covers (empty for a category offer: the category does).",
                    nullable=False,
                    default=(),
                ),
                _optional("category", "string", "The category it belongs to."),
                _optional("department", "string", "The department it belongs to."),
                _optional("discount", "float", "Discount given, in currency.", min_value=0.0),
                _optional("value", "float", "Expected revenue if accepted.", min_value=0.0),
                _optional("margin", "float", "Expected margin if accepted."),
                _optional(
                    "channels",
                    "string_list",
                    "Channels it may be shown on (empty = all).",
                    nullable=False,
                    default=(),
                    allowed=CHANNELS,
                ),
                _optional("valid_from", "datetime", "First moment it may be shown."),
                _optional("valid_to", "datetime", "Last moment it may be shown."),
                _optional(
                    "target_audiences",
                    "string_list",
                    "Audiences it is limited to (empty = everyone).",
                    nullable=False,
                    default=(),
                ),
                _optional(
                    "target_segments",
                    "string_list",
                    "Segments it is limited to (empty = everyone).",
                    nullable=False,
                    default=(),
                ),
                _optional("bundle_ladder", "string", "Good-better-best ladder of a bundle."),
                _optional("bundle_tier", "string", "good, better or best.", allowed=BUNDLE_TIERS),
                _optional("mission", "string", "The outcome a mission bundle is named for."),
                _optional(
                    "lever",
                    "float",
                    "Business weight for arbitration.",
                    nullable=False,
                    default=1.0,
                    min_value=0.0,
                ),
            ),
            key=("offer_id",),
            foreign_keys={"product_ids": "products"},
        ),
        TableSpec(
            "exposures",
            "An offer shown to a customer.",
            (
                _col("exposure_id", "string", "Exposure id."),
                _CUSTOMER_ID,
                _col("offer_id", "string", "The offer shown."),
                _col("shown_at", "datetime", "When it was shown."),
                _col("channel", "string", "Channel it was shown on.", allowed=CHANNELS),
                _optional("placement", "string", "Placement (home, pdp, cart, …)."),
                _optional("model_version", "string", "Model version that chose it."),
                _optional(
                    "holdout", "bool", "Customer was in the holdout.", nullable=False, default=False
                ),
                _optional(
                    "propensity",
                    "float",
                    "Probability the logging policy showed it.",
                    min_value=0.0,
                    max_value=1.0,
                ),
                _optional("request_id", "string", "The request that served it."),
                _optional("rank", "int", "Its rank in the slate, 1 = first.", min_value=1),
            ),
            key=("exposure_id",),
            foreign_keys={"customer_id": "customers", "offer_id": "offers"},
        ),
        TableSpec(
            "outcomes",
            "What happened after an exposure.",
            (
                _CUSTOMER_ID,
                _col("offer_id", "string", "The offer."),
                _col("outcome", "string", "What happened.", allowed=OUTCOMES),
                _col("occurred_at", "datetime", "When it happened."),
                _optional("value", "float", "Money involved, where known."),
                _optional("exposure_id", "string", "The exposure it follows, where known."),
            ),
            foreign_keys={"customer_id": "customers", "offer_id": "offers"},
        ),
        TableSpec(
            "events",
            "Behaviour that is not an order: browsing, carts, support, usage, email, loyalty.",
            (
                _CUSTOMER_ID,
                _col("event_type", "string", "What kind of event.", allowed=EVENT_TYPES),
                _col("occurred_at", "datetime", "When it happened."),
                _optional("product_id", "string", "The product involved, where any."),
                _optional("category", "string", "The category involved, where any."),
                _optional("value", "float", "A measure: usage share, tier rank, …"),
                _optional("detail", "string", "Free detail, such as the new loyalty tier."),
            ),
            foreign_keys={"customer_id": "customers", "product_id": "products"},
        ),
        TableSpec(
            "consent",
            "What each customer agreed to, per channel and purpose.",
            (
                _CUSTOMER_ID,
                _col("channel", "string", "Channel.", allowed=CHANNELS),
                _col("purpose", "string", "Purpose.", allowed=CONSENT_PURPOSES),
                _col("granted", "bool", "Whether consent is given."),
                _optional("updated_at", "datetime", "When it was last set."),
            ),
            key=("customer_id", "channel", "purpose"),
            foreign_keys={"customer_id": "customers"},
        ),
        TableSpec(
            "audiences",
            "Targeting lists, such as the households a campaign was sent to.",
            (
                _col("audience_id", "string", "Audience (campaign) id."),
                _CUSTOMER_ID,
                _optional("added_at", "datetime", "When the customer joined it."),
            ),
            key=("audience_id", "customer_id"),
            foreign_keys={"customer_id": "customers"},
        ),
        TableSpec(
            "compatibility",
            "Explicit product relations from the catalog, where it has them.",
            (
                _col("product_id", "string", "The product owned."),
                _col("related_product_id", "string", "The related product."),
                _col("relation", "string", "How they relate.", allowed=COMPATIBILITY_RELATIONS),
            ),
            key=("product_id", "related_product_id", "relation"),
            foreign_keys={"product_id": "products", "related_product_id": "products"},
        ),
    )
}


def empty_table(name: str) -> pd.DataFrame:
    """An empty frame with the contract's columns and types for table ``name``."""
    spec = TABLES[name]
    return pd.DataFrame(
        {c.name: pd.Series([], dtype=_PANDAS_DTYPES[c.dtype]) for c in spec.columns}
    )


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _as_list(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(item) for item in value]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        return [part.strip() for part in text.split("|") if part.strip()]
    return None


def _coerce_column(
    table: str, spec: ColumnSpec, values: pd.Series, time_format: str | None
) -> pd.Series:
    """Convert one raw column to the contract type, or raise naming the first bad value."""
    raw = values.reset_index(drop=True)
    present = raw.notna().to_numpy().copy()
    if raw.dtype == object or pd.api.types.is_string_dtype(raw.dtype):
        text = raw.astype("str").str.strip()
        present &= (text != "").fillna(False).to_numpy()
    if spec.dtype == "string":
        if pd.api.types.is_float_dtype(raw.dtype) and bool(
            np.all(np.mod(raw[present].to_numpy(), 1) == 0)
        ):
            raw = raw.astype("Int64")
        out = raw.astype("str").where(present, None).astype("str")
        return out
    if spec.dtype == "string_list":
        lists = [_as_list(value) for value in raw]
        bad = np.array([item is None for item in lists])
        if bad.any():
            row = _first_row(bad)
            raise ContractError(
                table,
                "is not a list",
                column=spec.name,
                row=row + 1,
                value=raw.iloc[row],
                hint="Give a list, or ids separated by '|'",
                more=int(bad.sum()) - 1,
            )
        return pd.Series(lists, dtype="object")
    if spec.dtype == "datetime":
        if pd.api.types.is_datetime64_any_dtype(raw.dtype):
            parsed = raw
            if getattr(raw.dt, "tz", None) is not None:
                parsed = raw.dt.tz_convert(None)
        else:
            parsed = pd.to_datetime(raw.astype("str"), format=time_format, errors="coerce")
        bad = present & parsed.isna().to_numpy()
        if bad.any():
            row = _first_row(bad)
            expected = (
                f"does not match the time format '{time_format}'"
                if time_format
                else "is not a recognisable date/time"
            )
            raise ContractError(
                table,
                expected,
                column=spec.name,
                row=row + 1,
                value=str(raw.iloc[row]),
                hint=(
                    "Fix the value, or pass the format the file uses with --time-format "
                    "(strftime codes, e.g. '%Y-%m-%d %H:%M:%S')"
                ),
                more=int(bad.sum()) - 1,
            )
        return parsed.astype("datetime64[us]")
    if spec.dtype == "bool":
        if pd.api.types.is_bool_dtype(raw.dtype):
            return raw.astype("bool")
        mapping = {"true": True, "1": True, "yes": True, "y": True, "t": True}
        mapping |= {"false": False, "0": False, "no": False, "n": False, "f": False}
        lowered = raw.astype("str").str.strip().str.lower()
        mapped = lowered.map(mapping)
        bad = present & mapped.isna().to_numpy()
        if bad.any():
            row = _first_row(bad)
            raise ContractError(
                table,
                "is not true or false",
                column=spec.name,
                row=row + 1,
                value=raw.iloc[row],
                hint="Use true/false, yes/no or 1/0",
                more=int(bad.sum()) - 1,
            )
        if spec.default is not None:
            mapped = mapped.where(present, spec.default)
        return mapped.astype("bool") if not (~present).any() else mapped.astype("boolean")
    # numbers
    if pd.api.types.is_bool_dtype(raw.dtype) or pd.api.types.is_numeric_dtype(raw.dtype):
        numeric = raw.astype("float64")
    else:
        numeric = pd.to_numeric(raw.astype("str").str.strip(), errors="coerce")
    bad = present & numeric.isna().to_numpy()
    if bad.any():
        row = _first_row(bad)
        raise ContractError(
            table,
            f"is not {_EXPECTED_WORDS[spec.dtype]}",
            column=spec.name,
            row=row + 1,
            value=raw.iloc[row],
            hint="Fix the value, or map another column",
            more=int(bad.sum()) - 1,
        )
    if spec.default is not None:
        numeric = numeric.fillna(spec.default)
    if spec.dtype == "int":
        fractional = present & (np.mod(numeric.fillna(0).to_numpy(), 1) != 0)
        if fractional.any():
            row = _first_row(fractional)
            raise ContractError(
                table,
                "is not a whole number",
                column=spec.name,
                row=row + 1,
                value=raw.iloc[row],
                more=int(fractional.sum()) - 1,
            )
        return numeric.astype("Int64")
    return numeric.astype("float64")


def coerce_table(name: str, frame: pd.DataFrame, *, time_format: str | None = None) -> pd.DataFrame:
    """Turn a raw frame (text or loosely typed columns) into table ``name``'s contract types.

    Missing optional columns are added with their default; extra columns are dropped.
    Raises :class:`ContractError` for a missing required column or a value that cannot be
    converted, naming the first offending row. The input is not modified.
    """
    spec = TABLES[name]
    if frame.shape[1] == 0:
        raise ContractError(name, "has no columns", hint="Give a table with a header row")
    missing = [c for c in spec.required_columns if c not in frame.columns]
    if missing:
        raise ContractError(
            name,
            f"is missing required column{'s' if len(missing) > 1 else ''} "
            + ", ".join(f"'{c}'" for c in missing),
            hint=f"Found columns: {', '.join(map(str, frame.columns))}",
        )
    columns: dict[str, pd.Series] = {}
    for column in spec.columns:
        if column.name in frame.columns:
            columns[column.name] = _coerce_column(name, column, frame[column.name], time_format)
        else:
            columns[column.name] = _default_column(column, len(frame))
    return pd.DataFrame(columns)


def _default_column(column: ColumnSpec, length: int) -> pd.Series:
    if column.dtype == "string_list":
        return pd.Series([list(column.default or ()) for _ in range(length)], dtype="object")
    if column.default is not None:
        return pd.Series([column.default] * length, dtype=_PANDAS_DTYPES[column.dtype])
    return pd.Series([None] * length, dtype=_PANDAS_DTYPES[column.dtype])


def _pandera_schema(spec: TableSpec) -> pa.DataFrameSchema:
    columns = {}
    for column in spec.columns:
        checks = []
        if column.allowed is not None and column.dtype != "string_list":
            checks.append(pa.Check.isin(column.allowed))
        if column.min_value is not None:
            checks.append(pa.Check.ge(column.min_value))
        if column.max_value is not None:
            checks.append(pa.Check.le(column.max_value))
        if column.dtype == "string_list":
            allowed = column.allowed
            checks.append(
                pa.Check(
                    lambda series, allowed=allowed: series.map(
                        lambda items: (
                            isinstance(items, list)
                            and (allowed is None or all(item in allowed for item in items))
                        )
                    ),
                    name="list_of_allowed_ids" if allowed else "list_of_ids",
                )
            )
        dtype = _PANDAS_DTYPES[column.dtype]
        if column.dtype == "bool" and column.nullable:
            dtype = None
        columns[column.name] = pa.Column(
            dtype,
            checks=checks,
            nullable=column.nullable,
            required=True,
            description=column.description,
            metadata={"pii": column.pii},
        )
    return pa.DataFrameSchema(
        columns,
        name=spec.name,
        strict=True,
        unique=list(spec.key) if spec.key else None,
        report_duplicates="all",
    )


_SCHEMAS: dict[str, pa.DataFrameSchema] = {}


def pandera_schema(name: str) -> pa.DataFrameSchema:
    """The pandera schema for table ``name`` (PII tags are in each column's metadata)."""
    if name not in _SCHEMAS:
        _SCHEMAS[name] = _pandera_schema(TABLES[name])
    return _SCHEMAS[name]


def _problem_for(check: str, column: str | None, spec: TableSpec) -> tuple[str, str]:
    if check == "column_in_dataframe":
        return "is missing", "Add the column"
    if check == "column_in_schema":
        return "is not part of the contract", "Drop the column"
    if check.startswith("dtype("):
        return f"has the wrong type (expected {check[6:-1]})", "Convert it with coerce_table"
    if check == "not_nullable":
        return "is empty but the column requires a value", "Fill it in"
    if check in ("field_uniqueness", "multiple_fields_uniqueness") or "unique" in check:
        key = ", ".join(spec.key)
        return f"is a duplicate key ({key} must be unique)", "Remove or merge the duplicate rows"
    if check.startswith("isin("):
        column_spec = spec.column(column) if column else None
        allowed = ", ".join(column_spec.allowed or ()) if column_spec else ""
        return f"is not allowed (allowed: {allowed})", "Use one of the allowed values"
    if check.startswith("greater_than_or_equal_to("):
        return f"is below the minimum {check[len('greater_than_or_equal_to(') : -1]}", ""
    if check.startswith("less_than_or_equal_to("):
        return f"is above the maximum {check[len('less_than_or_equal_to(') : -1]}", ""
    if check == "list_of_allowed_ids":
        column_spec = spec.column(column) if column else None
        allowed = ", ".join(column_spec.allowed or ()) if column_spec else ""
        return f"holds a value that is not allowed (allowed: {allowed})", "Use allowed values"
    if check == "list_of_ids":
        return "is not a list of ids", "Give a list of ids"
    return f"fails the check {check}", ""


def validate_table(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Validate a frame already in contract types; return it unchanged, or raise.

    Raises :class:`ContractError` for the first failure pandera finds (missing or extra
    column, wrong type, empty required value, duplicate key, value out of range).
    """
    spec = TABLES[name]
    checked = frame.reset_index(drop=True)
    try:
        pandera_schema(name).validate(checked, lazy=True)
    except SchemaErrors as errors:
        cases = errors.failure_cases
        first = cases.iloc[0]
        if "uniqueness" in str(first["check"]):
            _raise_duplicate_key(spec, checked)
        same = cases[(cases["column"] == first["column"]) & (cases["check"] == first["check"])]
        _raise_from_case(spec, first, len(same) - 1)
    except SchemaError as error:  # raised outside lazy mode for dataframe-level checks
        raise ContractError(name, str(error)) from error
    return frame


def _raise_duplicate_key(spec: TableSpec, frame: pd.DataFrame) -> None:
    key = list(spec.key)
    duplicated = frame.duplicated(key, keep=False).to_numpy()
    first = _first_row(duplicated)
    value = tuple(frame.loc[first, key]) if len(key) > 1 else frame.loc[first, key[0]]
    same = (frame[key] == frame.loc[first, key]).all(axis=1).to_numpy()
    rows = np.flatnonzero(same) + 1
    raise ContractError(
        spec.name,
        f"is a duplicate key: {', '.join(key)} must be unique, "
        f"and rows {', '.join(map(str, rows[:5]))} share it",
        column=", ".join(key),
        row=first + 1,
        value=value,
        hint="Remove or merge the duplicate rows",
        more=int(duplicated.sum()) - len(rows),
    )


def _raise_from_case(spec: TableSpec, case: pd.Series, more: int) -> None:
    check = str(case["check"])
    column = case["column"] if isinstance(case["column"], str) else None
    index = case["index"]
    row = int(index) + 1 if index is not None and not pd.isna(index) else None
    value = case["failure_case"]
    if check in ("column_in_dataframe", "column_in_schema"):
        column, value = str(value), None
    if check.startswith("dtype(") or check == "not_nullable":
        value = None
    if check == "multiple_fields_uniqueness" or (spec.key and column is None and row is not None):
        column = ", ".join(spec.key)
    problem, hint = _problem_for(check, column, spec)
    raise ContractError(
        spec.name, problem, column=column, row=row, value=value, hint=hint, more=max(more, 0)
    )


def validate_foreign_keys(
    tables: Mapping[str, pd.DataFrame], *, allow_orphans: Collection[str] = ()
) -> dict[str, int]:
    """Check every reference between the tables present in ``tables``.

    ``allow_orphans`` names references (``"orders.product_id"``) whose unknown ids are
    tolerated; their counts are returned so the caller can report them. Any other unknown
    id raises :class:`ContractError` naming the row and the id.
    """
    allowed = set(allow_orphans)
    orphans: dict[str, int] = {}
    for name, frame in tables.items():
        spec = TABLES[name]
        for column, target in spec.foreign_keys.items():
            if target not in tables or column not in frame.columns:
                continue
            target_ids = tables[target][TABLES[target].key[0]]
            values = frame[column]
            if spec.column(column).dtype == "string_list":
                exploded = values.explode()
                known = exploded.isna() | exploded.isin(target_ids)
                unknown_rows = ~known.groupby(level=0).all().reindex(values.index).to_numpy()
                first_value = exploded[~known].iloc[0] if (~known).any() else None
            else:
                unknown_rows = (values.notna() & ~values.isin(target_ids)).to_numpy()
                first_value = values[unknown_rows].iloc[0] if unknown_rows.any() else None
            count = int(unknown_rows.sum())
            if not count:
                continue
            reference = f"{name}.{column}"
            if reference in allowed:
                orphans[reference] = count
                continue
            raise ContractError(
                name,
                f"refers to an unknown {target[:-1] if target.endswith('s') else target} "
                f"(not in table '{target}')",
                column=column,
                row=_first_row(unknown_rows) + 1,
                value=first_value,
                hint=f"Add it to '{target}' or remove the row",
                more=count - 1,
            )
    return orphans


def validate_tables(
    tables: Mapping[str, pd.DataFrame], *, allow_orphans: Collection[str] = ()
) -> dict[str, int]:
    """Validate every table, then every reference between them. Returns tolerated orphans."""
    for name, frame in tables.items():
        if name not in TABLES:
            raise ContractError(name, "is not a contract table", hint=f"Use one of {list(TABLES)}")
        validate_table(name, frame)
    return validate_foreign_keys(tables, allow_orphans=allow_orphans)
