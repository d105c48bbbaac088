"""recommend-batch says how many customers the holdout left without rows, and
``--no-holdout`` scores everyone (for offline evaluation), locally and on Dask workers."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from serving_helpers import Served, train_and_register
from typer.testing import CliRunner

from features import ScenarioConfig, make_world, write_world
from nextbest.cli import app
from serving.engine import in_holdout
from serving.settings import ServingSettings

SHARE = 0.3


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    home = tmp_path_factory.mktemp("holdout")
    world = make_world(ScenarioConfig(n_customers=60, n_days=120, seed=3))
    write_world(world, home / "ws")
    return train_and_register(home, workspace_dir=home / "ws", n_estimators=20, cut_every_days=5)


def _batch(
    served: Served,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    customers: list[str],
    *flags: str,
    share: float = SHARE,
) -> tuple[set[str], str]:
    """recommend-batch on the web (no caps there) for these customers: who got rows, and
    the last line on stderr."""
    monkeypatch.setenv("NEXTBEST_HOME", str(served.home))
    monkeypatch.setenv("NEXTBEST_DB_URL", f"sqlite:///{tmp_path / f'ledger-{share}.db'}")
    monkeypatch.setenv("NEXTBEST_HOLDOUT_SHARE", str(share))
    who, out = tmp_path / "who.csv", tmp_path / "out.csv"
    who.write_text("customer_id\n" + "\n".join(customers) + "\n")
    result = CliRunner().invoke(
        app,
        [
            *("recommend-batch", "--customers", str(who), "--out", str(out)),
            *("--channel", "web", "--placement", "home", "--k", "3"),
            *("-w", str(served.workspace.path), *flags),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out, dtype={"customer_id": str, "offer_id": str})
    assert (rows.groupby("customer_id").size() == 3).all()
    return set(rows["customer_id"]), result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def servable(served: Served, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The customers who get a web slate when nobody is held out (the others, in this
    world, gave no consent to the web)."""
    everyone = sorted(set(served.workspace.read("orders")["customer_id"].astype(str)))
    with pytest.MonkeyPatch.context() as monkeypatch:
        got, said = _batch(
            served, tmp_path_factory.mktemp("servable"), monkeypatch, everyone, share=0.0
        )
    assert said.endswith(
        f"0 in the holdout (share 0, control nothing) got nothing; "
        f"{len(everyone) - len(got)} other customers got nothing."
    )
    assert len(got) >= 30
    return sorted(got)


def test_the_last_line_counts_the_held_out_customers_left_without_rows(
    served: Served, servable: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, said = _batch(served, tmp_path, monkeypatch, servable)
    without = set(servable) - got
    held = {c for c in servable if in_holdout(c, ServingSettings().holdout_salt, SHARE)}
    match = re.search(r"; (\d+) in the holdout \(share 0.3, control nothing\) got nothing; ", said)
    assert match, said
    assert int(match[1]) == len(without) == len(held) > 0
    assert without == held and said.endswith("; 0 other customers got nothing.")


def test_no_holdout_scores_every_customer(
    served: Served, servable: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, said = _batch(served, tmp_path, monkeypatch, servable, "--no-holdout")
    assert got == set(servable)
    assert "; holdout off (--no-holdout); 0 other customers got nothing." in said


def test_no_holdout_reaches_the_dask_workers_recommender(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Dask worker builds its recommender from the client's settings: with
    ``--no-holdout`` that one holds nobody out either."""
    from nextbest.cli import _recommender
    from serving.batch import _recommender_plugin

    monkeypatch.setenv("NEXTBEST_HOME", str(served.home))
    monkeypatch.setenv("NEXTBEST_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("NEXTBEST_HOLDOUT_SHARE", str(SHARE))
    monkeypatch.setenv("NEXTBEST_OFFER_HOLDOUT_SHARE", "0.2")
    for holdout, shares in ((True, (SHARE, 0.2)), (False, (0.0, 0.0))):
        client = _recommender(served.workspace.path, "data", None, "champion", holdout=holdout)
        plugin = _recommender_plugin(client)
        plugin.setup(worker=None)
        worker = plugin.recommender.settings
        assert (worker.holdout_share, worker.offer_holdout_share) == shares
        assert plugin.recommender.model.bundle.version == served.version


def test_a_customer_listed_at_two_moments_keeps_two_whole_slates_in_the_inputs_order(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moments are scored in time order (each past builder fitted once), and the rows come
    back in the input's order: a customer listed twice keeps two separate slates."""
    from serving.assembly import build_recommender
    from serving.batch import recommend_batch

    monkeypatch.setenv("NEXTBEST_HOME", str(served.home))
    recommender = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=f"sqlite:///{tmp_path / 'ledger.db'}"),
        workspace=served.workspace,
    )
    end = pd.Timestamp(recommender.data_end_s, unit="s")
    late, early = (end - pd.Timedelta(days=d) for d in (5, 60))
    someone, other = sorted(recommender.known_customers())[:2]
    customers = pd.DataFrame(
        {  # the later moment first, then another customer, then the same one earlier
            "customer_id": [someone, other, someone],
            "as_of": [late.isoformat(), late.isoformat(), early.isoformat()],
        }
    )
    rows = recommend_batch(recommender, customers, channel="web", placement="home", k=3)
    # a block of ranks 1..n per input line, in the input's order
    blocks: list[list[int]] = []
    for rank in rows["rank"]:
        if rank == 1:
            blocks.append([])
        blocks[-1].append(rank)
    assert [b == list(range(1, len(b) + 1)) for b in blocks] == [True] * 3
    sizes = [len(b) for b in blocks]
    owners = rows["customer_id"].tolist()
    assert owners == [someone] * sizes[0] + [other] * sizes[1] + [someone] * sizes[2]
    # the earlier moment is scored first (time order): alone, on a fresh ledger, it gives
    # the same slate as the third block
    fresh = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=f"sqlite:///{tmp_path / 'fresh.db'}"),
        workspace=served.workspace,
    )
    alone = recommend_batch(fresh, customers.iloc[[2]], channel="web", placement="home", k=3)
    assert rows.iloc[sizes[0] + sizes[1] :]["offer_id"].tolist() == alone["offer_id"].tolist()
