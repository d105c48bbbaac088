"""requirements/audit.py: the exceptions pip-audit is given, and the offline check of the
pins against a safety-db copy, on a database and pins written by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def audit():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("audit", ROOT / "requirements" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit"] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["audit"]


def test_pins_in_an_affected_range_are_found_and_only_exceptions_pass(  # type: ignore[no-untyped-def]
    audit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        "# a comment\nFoo_Bar==1.1\nmlflow==3.17.2\nsafe==2.0\nuvicorn[standard]==0.30.0\n"
    )
    database = tmp_path / "insecure.json"
    database.write_text(
        json.dumps(
            {
                "$meta": {"timestamp": 1775023247},
                "foo-bar": ["<1.0", "<1.2", ">=2,<2.3"],  # 1.1 is in "<1.2" only
                "mlflow": [">=0.5.0", "<3.0", ">=3.1,<3.17.2"],  # only the open-ended one
                "safe": ["<2.0"],  # 2.0 is the fix
                "uvicorn": [">=0.29,<0.31"],  # a pin with extras is still a pin
            }
        )
    )
    assert audit.main(["--safety-db", str(database), str(constraints)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        "4 pins, 4 with advisories in the database (as of 2026-04-01), 3 inside an affected range"
    )
    assert "foo-bar==1.1 in <1.2: NOT COVERED" in out
    assert "mlflow==3.17.2 in >=0.5.0: exception CVE-2024-37052…" in out
    assert "uvicorn==0.30.0 in >=0.29,<0.31: NOT COVERED" in out
    assert "safe==" not in out and "<3.0" not in out and "foo-bar==1.1 in <1.0" not in out

    constraints.write_text("mlflow==3.17.2\nsafe==2.0\n")  # only what an exception covers
    assert audit.main(["--safety-db", str(database), str(constraints)]) == 0


def test_pip_audit_is_given_every_exception(audit, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert audit.main(["--ignore-args"]) == 0
    words = capsys.readouterr().out.split()
    assert words[::2] == ["--ignore-vuln"] * (len(words) // 2)
    assert {"CVE-2024-37052", "CVE-2024-37056", "CVE-2024-37057", "CVE-2024-37065"} <= set(
        words[1::2]
    )
