"""The locked set's known vulnerabilities: the documented exceptions, and a check that runs
where pip-audit cannot.

``make audit`` runs pip-audit over ``constraints.txt`` with the exceptions below as
``--ignore-vuln`` options (``--ignore-args`` prints them). pip-audit needs PyPI's
per-version JSON or OSV; a machine that reaches neither can still check the pins against
a copy of PyUp's safety-db (``data/insecure.json``: each package's affected ranges, no
advisory ids)::

    python requirements/audit.py --ignore-args
    python requirements/audit.py --safety-db insecure.json [constraints.txt]

The second prints every pin inside an affected range and exits 1 if one is not covered by
an exception (its package and that range). It is weaker than pip-audit: the database
names no advisory, and it is as old as its copy.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class Exception_:
    """Advisories that stay in the locked set, and why that is safe here."""

    package: str
    ids: tuple[str, ...]  # as pip-audit matches them (an advisory's id or an alias)
    ranges: tuple[str, ...]  # their affected ranges, as safety-db writes them
    why: str


EXCEPTIONS = (
    Exception_(
        "mlflow",
        tuple(f"CVE-2024-{n}" for n in range(37052, 37061)),
        (">=0.5.0", ">=0.9.0", ">=1.1.0", ">=1.23.0", ">=1.24.0", ">=1.27.0", ">=2.0.0rc0"),
        "MLflow's model flavors unpickle what they load (scikit-learn, LightGBM's scikit-learn "
        "API, pyfunc, PyTorch, TensorFlow, ...): a crafted model in a store runs code when "
        "loaded. No fixed version. nextbest loads no model through a flavor: the booster is "
        "LightGBM's text model, read by runtime.registry, checked against its sha256 and "
        "refused unless it is a Booster; and every nextbest process sets "
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, so MLflow's pickle flavors refuse too "
        "(tests/test_registry_faults.py)",
    ),
    Exception_(
        "skops",
        ("CVE-2024-37065",),
        (">=0.6",),
        "skops loads crafted models into code execution. No fixed version. It is installed "
        "as MLflow's dependency, for its scikit-learn flavor, which nextbest does not use",
    ),
)


def pins(constraints: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by canonical name."""
    found = {}
    for line in constraints.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)(?:\[[^\]]*\])?==([^\s;#]+)", line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def findings(
    locked: dict[str, str], database: dict[str, list[str]]
) -> list[tuple[str, str, str, Exception_ | None]]:
    """(package, pinned version, affected range, the exception that covers it or None) for
    every pin inside a range of ``database`` (package -> ranges)."""
    affected = {canonicalize_name(k): v for k, v in database.items() if not k.startswith("$")}
    covered = {(e.package, r): e for e in EXCEPTIONS for r in e.ranges}
    found = []
    for package, pinned in sorted(locked.items()):
        try:
            version = Version(pinned)
        except InvalidVersion:
            continue
        for spec in affected.get(package, []):
            if version in SpecifierSet(spec, prereleases=True):
                found.append((package, pinned, spec, covered.get((package, spec))))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ignore-args", action="store_true", help="pip-audit's options")
    parser.add_argument("--safety-db", type=Path, help="a copy of safety-db's insecure.json")
    parser.add_argument("constraints", type=Path, nargs="?", default=Path("constraints.txt"))
    args = parser.parse_args(argv)
    if args.ignore_args:
        print(" ".join(f"--ignore-vuln {i}" for e in EXCEPTIONS for i in e.ids))
        return 0
    if args.safety_db is None:
        parser.error("give --ignore-args or --safety-db")
    database = json.loads(args.safety_db.read_text())
    stamp = database.get("$meta", {}).get("timestamp")
    locked = pins(args.constraints)
    found = findings(locked, database)
    known = sum(canonicalize_name(k) in locked for k in database if not k.startswith("$"))
    as_of = datetime.fromtimestamp(stamp, UTC).date() if stamp else "an unknown date"
    print(
        f"{len(locked)} pins, {known} with advisories in the database (as of {as_of}), "
        f"{len({f[0] for f in found})} inside an affected range"
    )
    for package, pinned, spec, exception in found:
        print(
            f"{package}=={pinned} in {spec}: "
            + (f"exception {exception.ids[0]}…" if exception else "NOT COVERED")
        )
    for exception in sorted({f[3] for f in found if f[3]}, key=lambda e: e.package):
        print(f"  {exception.package}: {exception.why}")
    return 1 if any(f[3] is None for f in found) else 0


if __name__ == "__main__":
    sys.exit(main())
