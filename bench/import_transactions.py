"""Import of 1 M order lines: at most 60 s and 4 GB, beside a plain read of the same file.

The input is real: the first 1,000,000 lines of the demo's transactions, written as a
plain CSV with a retailer's own column names. Both the import and the reference run in
fresh subprocesses, so that their peak memory (max RSS) is measured separately.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LINES = 1_000_000
TIME_LIMIT_S = 60.0
MEMORY_LIMIT_GB = 4.0

_READ_ONLY = """
import sys, pandas as pd
frame = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False, na_values=[""])
print(len(frame))
"""


def _write_input(path: Path) -> None:
    from features import load_complete_journey

    raw = load_complete_journey(("transactions", "products"))
    lines = raw["transactions"].head(LINES)
    category = lines["product_id"].map(raw["products"].set_index("product_id")["product_category"])
    lines.assign(category=category).rename(
        columns={
            "household_id": "shopper",
            "transaction_timestamp": "when",
            "product_id": "sku",
            "sales_value": "paid",
            "quantity": "units",
            "basket_id": "receipt",
        }
    )[["receipt", "shopper", "when", "sku", "category", "units", "paid"]].to_csv(path, index=False)


def _timed(mode: str, target: str, *args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of `python -m target args` or `python -c target args`."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as peak:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bench._peak", peak.name, mode, target, *args],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - started
        return seconds, int(Path(peak.name).read_text()) / 1024**2


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "order_lines.csv"
        _write_input(source)
        size_mb = source.stat().st_size / 1024**2
        read_s, read_gb = _timed("-c", _READ_ONLY, str(source))
        import_s, import_gb = _timed(
            "-m",
            "nextbest.cli",
            "import",
            "transactions",
            str(source),
            "--customer",
            "shopper",
            "--time",
            "when",
            "--item",
            "sku",
            "--category",
            "category",
            "--quantity",
            "units",
            "--amount",
            "paid",
            "--order",
            "receipt",
            "--workspace",
            str(Path(folder) / "ws"),
        )
    return {
        "lines": LINES,
        "input_mb": round(size_mb, 1),
        "reference_read_csv_s": round(read_s, 2),
        "reference_read_csv_peak_gb": round(read_gb, 2),
        "import_s": round(import_s, 2),
        "import_peak_gb": round(import_gb, 2),
        "import_over_read_ratio": round(import_s / read_s, 2),
        "limits": {"seconds": TIME_LIMIT_S, "peak_gb": MEMORY_LIMIT_GB},
        "within_limits": import_s <= TIME_LIMIT_S and import_gb <= MEMORY_LIMIT_GB,
    }
