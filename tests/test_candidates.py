"""Candidate generation: bounded, explainable by generator, and it finds what was planted."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from features import TABLES, Requests, Snapshot, World, coerce_table
from features.candidates import GENERATORS, CandidateGenerator, next_purchase_offers, recall
from nextbest.cli import app


@pytest.fixture(scope="module")
def snapshot(small_world: World) -> Snapshot:
    return Snapshot.from_tables({n: coerce_table(n, small_world.tables[n]) for n in TABLES})


@pytest.fixture(scope="module")
def moment(small_world: World) -> pd.Timestamp:
    return pd.Timestamp(small_world.config.start) + pd.Timedelta(days=80)


def _everyone(snapshot: Snapshot, moment: pd.Timestamp) -> Requests:
    ids = [c for c in snapshot.customers.values if c != "UNKNOWN"]
    return Requests.build(snapshot, ids, [moment] * len(ids))


def _by_source(candidates, snapshot: Snapshot, request: int) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    mine = candidates.request == request
    out: dict[str, set[str]] = {name: set() for name in GENERATORS}
    for offer, sources in zip(candidates.offer[mine], candidates.sources[mine], strict=True):
        for bit, name in enumerate(GENERATORS):
            if sources >> bit & 1:
                out[name].add(str(snapshot.offers.values[offer]))
    return out


def test_cap_and_no_duplicates(snapshot: Snapshot, moment: pd.Timestamp) -> None:
    generator = CandidateGenerator(max_candidates=7, pass_through_below=0, min_pair_orders=3)
    candidates = generator.fit(snapshot, moment).generate(snapshot, _everyone(snapshot, moment))
    frame = pd.DataFrame({"r": candidates.request, "o": candidates.offer})
    assert frame.groupby("r").size().max() == 7
    assert not frame.duplicated().any()
    assert (candidates.sources > 0).all()


def test_small_catalogs_pass_through_whole(snapshot: Snapshot, moment: pd.Timestamp) -> None:
    requests = _everyone(snapshot, moment)
    candidates = (
        CandidateGenerator(pass_through_below=1000)
        .fit(snapshot, moment)
        .generate(snapshot, requests)
    )
    assert len(candidates) == len(requests) * int(snapshot.offer_known.sum())
    assert (candidates.sources == 0).all()


def test_generators_propose_what_was_planted(
    small_world: World, snapshot: Snapshot, moment: pd.Timestamp
) -> None:
    requests = _everyone(snapshot, moment)
    generator = CandidateGenerator(max_candidates=40, pass_through_below=0, min_pair_orders=3)
    candidates = generator.fit(snapshot, moment).generate(snapshot, requests)
    orders = small_world.tables["orders"]
    audiences = small_world.tables["audiences"]
    checked_completion = checked_target = 0
    for i, customer in enumerate(snapshot.customers.decode(requests.customer)):
        sources = _by_source(candidates, snapshot, i)
        mine = orders[
            (orders["customer_id"] == customer)
            & (orders["ordered_at"] < moment)
            & (orders["quantity"] > 0)
        ]
        if "F1-D1" in set(mine["product_id"]):
            checked_completion += 1
            assert {"item:F1-A1", "item:F1-A2"} & (sources["completion"] | sources["repeat"])
        clubs = audiences.loc[audiences["customer_id"] == customer, "audience_id"]
        for club in clubs:
            checked_target += 1
            assert f"coupon:{club.removesuffix(' club')}" in sources["targeted"]
        assert sources["repeat"] <= {f"item:{p}" for p in mine["product_id"]} | {
            o for o in sources["repeat"] if not o.startswith("item:")
        }
    assert checked_completion > 3 and checked_target > 3


def test_union_recall_beats_each_generator(snapshot: Snapshot, moment: pd.Timestamp) -> None:
    requests = _everyone(snapshot, moment)
    generator = CandidateGenerator(max_candidates=8, pass_through_below=0, min_pair_orders=3)
    candidates = generator.fit(snapshot, moment).generate(snapshot, requests)
    truth = next_purchase_offers(snapshot, requests, 14)
    scores = recall(candidates, truth)
    assert scores["true_offers"] > 100
    assert scores["union"] >= max(scores[name] for name in GENERATORS)
    random_rate = 8 / int(snapshot.offer_known.sum())
    assert scores["union"] > 2 * random_rate


def test_recall_oracle_on_a_worked_example() -> None:
    from features.candidates import Candidates

    candidates = Candidates(np.array([0, 0, 1]), np.array([5, 6, 5]), np.array([1, 2, 1]))
    truth = pd.DataFrame({"request": [0, 0, 1, 1], "offer": [5, 7, 5, 6]})
    scores = recall(candidates, truth)
    assert scores["union"] == 0.5  # (0,5) and (1,5) of four
    assert scores["repeat"] == 0.5 and scores["completion"] == 0.0


def test_candidates_command_reports_recall(small_workspace, moment: pd.Timestamp) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(
        app,
        [
            "candidates",
            "-w",
            str(small_workspace.path),
            "--as-of",
            str(moment),
            "--max",
            "10",
            "--always-generate",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(GENERATORS) <= set(report["recall"])
    assert 0 < report["recall"]["union"] <= 1
    assert report["recall"]["candidates_per_request"] <= 10
