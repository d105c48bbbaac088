"""`make bench`: run every benchmark (or those named) and write bench/results.json."""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

from bench import features, import_transactions, load, nextbasket, serving

BENCHMARKS = {
    "import_transactions": import_transactions.run,
    "features": features.run,
    "serving": serving.run,
    "isolation": load.run_isolation,
    "next_basket": nextbasket.run,
}
RESULTS = Path(__file__).with_name("results.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], help="benchmarks to run")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.names or list(BENCHMARKS):
        print(f"== {name}", flush=True)
        outcome = BENCHMARKS[name]()
        outcome["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        outcome["machine"] = f"{platform.machine()}, {platform.python_version()}"
        results[name] = outcome
        print(json.dumps(outcome, indent=2), flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
