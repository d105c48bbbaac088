"""Fairness (issue 12, item 6): exposure, acceptance and lift per group, parity ratios
against the best group, breaches; at training (MLflow metrics and artifact, a registry
tag) and on the review page.

The oracles: hand-made frames whose ratios are worked out by hand in the comments, and for
training an independent pandas recomputation of the top-3 slates from the test rows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from policy import RulesError, load_rules, parse_rules
from policy.fairness import (
    FAIRNESS_TAG,
    Breach,
    breaches_from_tag,
    fairness_report,
    group_table,
    judge,
)
from policy.rules import FairnessSettings


def _frames(groups: dict[str, tuple[int, int, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Customers of each group (size, exposed, accepted): the first ``exposed`` were shown
    one offer, the first ``accepted`` of those took it."""
    customers, measures = [], []
    for group, (size, exposed, accepted) in groups.items():
        for i in range(size):
            customer = f"{group}-{i}"
            customers.append({"customer_id": customer, "age_band": group})
            measures.append(
                {
                    "customer_id": customer,
                    "offers": int(i < exposed),
                    "accepted": int(i < accepted),
                }
            )
    return pd.DataFrame(customers), pd.DataFrame(measures)


# the four-fifths rule by the ratio alone (the significance test has its own test)
SETTINGS = FairnessSettings(
    min_parity=0.8, attributes=["age_band"], min_group_size=50, max_p_value=None
)


def test_four_fifths_exposure_breach_by_hand() -> None:
    # exposure 10/100 = 0.10 (best) and 6/100 = 0.06: 0.06 / 0.10 = 0.6 < 0.8, a breach;
    # 9/100 = 0.09: 0.9, none
    customers, measures = _frames({"18-24": (100, 10, 0), "25-34": (100, 6, 0), "35+": (100, 9, 0)})
    report = fairness_report(customers, measures, SETTINGS)
    rates = {g.group: (g.exposure_rate, g.exposure_parity) for g in report.groups}
    assert rates == {
        "18-24": (pytest.approx(0.10), pytest.approx(1.0)),
        "25-34": (pytest.approx(0.06), pytest.approx(0.6)),
        "35+": (pytest.approx(0.09), pytest.approx(0.9)),
    }
    assert [(b.group, b.measure, b.best_group) for b in report.breaches] == [
        ("25-34", "exposure", "18-24")
    ]
    breach = report.breaches[0]
    assert breach.ratio == pytest.approx(0.6) and breach.threshold == 0.8
    assert report.parity["exposure"] == {"age_band": pytest.approx(0.6)}
    assert report.metrics() == {
        "fairness.exposure_parity.age_band": pytest.approx(0.6),
        "fairness.breaches": 1.0,
    }  # acceptance is not judged: 10, 6 and 9 offers are under 50


def test_a_ratio_under_the_threshold_breaches_only_when_it_is_no_noise() -> None:
    # 6/100 against 10/100: pooled rate 16/200 = 0.08, standard error
    # sqrt(0.08 * 0.92 * (1/100 + 1/100)) = 0.03837, z = 0.04 / 0.03837 = 1.0426,
    # p = erfc(1.0426 / sqrt 2) = 0.297: a ratio of 0.6, but no breach at p < 0.05
    tested = SETTINGS.model_copy(update={"max_p_value": 0.05})
    customers, measures = _frames({"a": (100, 10, 0), "b": (100, 6, 0)})
    assert fairness_report(customers, measures, tested).breaches == []
    # ten times the customers, the same rates: standard error 0.012133, z = 3.297,
    # p = 0.00098: a breach, which carries its p-value
    customers, measures = _frames({"a": (1000, 100, 0), "b": (1000, 60, 0)})
    report = fairness_report(customers, measures, tested)
    assert [(b.group, b.measure) for b in report.breaches] == [("b", "exposure")]
    assert report.breaches[0].p_value == pytest.approx(0.00098, abs=0.00002)
    assert report.breaches[0].describe().endswith("under 0.80 (p = 0.00098)")


def test_acceptance_parity_is_per_offer_shown() -> None:
    # every customer shown one offer; accepted 30/100 = 0.30 (best), 21/100 = 0.21 → 0.7
    # (a breach), 27/100 = 0.27 → 0.9
    customers, measures = _frames({"a": (100, 100, 30), "b": (100, 100, 21), "c": (100, 100, 27)})
    report = fairness_report(customers, measures, SETTINGS)
    parity = {g.group: g.acceptance_parity for g in report.groups}
    assert parity == {"a": pytest.approx(1.0), "b": pytest.approx(0.7), "c": pytest.approx(0.9)}
    assert [(b.group, b.measure) for b in report.breaches] == [("b", "acceptance")]
    assert report.parity == {
        "exposure": {"age_band": pytest.approx(1.0)},
        "acceptance": {"age_band": pytest.approx(0.7)},
    }


def test_small_and_unknown_groups_are_reported_not_judged() -> None:
    # "tiny" (20 customers, nobody exposed: ratio 0) and "rich" (20, everyone exposed)
    # are under min_group_size 50: reported, never a breach, never the best group; the
    # customers without an age band are the group UNKNOWN, not judged either
    customers, measures = _frames(
        {"a": (100, 50, 0), "b": (100, 45, 0), "tiny": (20, 0, 0), "rich": (20, 20, 0)}
    )
    customers.loc[customers["customer_id"].str.startswith("b-9"), "age_band"] = None
    report = fairness_report(customers, measures, SETTINGS)
    groups = {g.group: g for g in report.groups}
    assert groups["tiny"].exposure_parity == 0.0 and not groups["tiny"].judged["exposure"]
    assert groups["rich"].exposure_parity == pytest.approx(2.0)  # against a, the best judged
    # b-9 (exposed) and b-90..b-99 (not) went to UNKNOWN: 11 customers, 1 offer
    unknown = groups["UNKNOWN"]
    assert (unknown.customers, unknown.offers, unknown.judged["exposure"]) == (11, 1, False)
    assert groups["b"].customers == 89
    assert groups["b"].exposure_parity == pytest.approx((44 / 89) / (50 / 100))
    assert report.breaches == []
    # the same data judged with groups of 10 and more: tiny (0 / 1.0) breaches
    strict = fairness_report(
        customers, measures, SETTINGS.model_copy(update={"min_group_size": 10})
    )
    assert {(b.group, b.best_group) for b in strict.breaches} == {
        ("tiny", "rich"),
        ("a", "rich"),
        ("b", "rich"),
    }


def test_lift_from_a_control_arm_by_hand() -> None:
    # group a: treated outcome 30/100, control 10/100 → lift 0.20 (best);
    # group b: treated 25/100, control 15/100 → lift 0.10 → ratio 0.5, a breach
    rows = []
    for group, treated, control in (("a", 30, 10), ("b", 25, 15)):
        for arm, positives in (("treated", treated), ("control", control)):
            for i in range(100):
                rows.append(
                    {
                        "customer_id": f"{group}-{arm}-{i}",
                        "age_band": group,
                        "arm": arm,
                        "offers": int(arm == "treated"),
                        "accepted": int(arm == "treated" and i < 20),
                        "outcome": float(i < positives),
                    }
                )
    frame = pd.DataFrame(rows)
    report = fairness_report(frame[["customer_id", "age_band"]], frame, SETTINGS)
    lift = {g.group: (g.lift, g.lift_parity) for g in report.groups}
    assert lift == {
        "a": (pytest.approx(0.20), pytest.approx(1.0)),
        "b": (pytest.approx(0.10), pytest.approx(0.5)),
    }
    # exposure and acceptance read the treated arm only: 1 offer per customer, 20 % taken
    assert {g.exposure_rate for g in report.groups} == {1.0}
    assert [g.acceptance_rate for g in report.groups] == [pytest.approx(0.2)] * 2
    assert [(b.group, b.measure) for b in report.breaches] == [("b", "lift")]
    assert report.metrics()["fairness.lift_parity.age_band"] == pytest.approx(0.5)


def test_no_lift_to_be_at_parity_with_is_not_judged() -> None:
    # both groups' lifts are negative: there is no positive best lift, no ratio, no breach
    table = pd.DataFrame(
        {
            "attribute": ["age_band"] * 2,
            "group": ["a", "b"],
            "customers": [100, 100],
            "opportunities": [100, 100],
            "offers": [100, 100],
            "accepted": [10, 10],
            "treated_customers": [100, 100],
            "control_customers": [100, 100],
            "treated_outcome": [10, 5],
            "control_outcome": [20, 20],
        }
    )
    report = judge(table, SETTINGS)
    assert [g.lift for g in report.groups] == [pytest.approx(-0.1), pytest.approx(-0.15)]
    assert [g.lift_parity for g in report.groups] == [None, None]
    assert report.parity["lift"] == {"age_band": None} and report.breaches == []


def test_the_result_is_json_and_names_no_customer() -> None:
    customers, measures = _frames({"a": (100, 10, 5), "b": (100, 6, 1)})
    customers["income_band"] = "50-74K"
    report = fairness_report(
        customers,
        measures,
        SETTINGS.model_copy(update={"attributes": ["age_band", "income_band", "kids_count"]}),
    )
    text = json.dumps(report.to_dict(), allow_nan=False)  # no NaN: JSON, not JavaScript
    assert "a-1" not in text and "customer_id" not in text
    assert report.attributes == ["age_band", "income_band"]
    assert report.missing_attributes == ["kids_count"]
    assert len(report.table()) == 3  # a, b and the one income band


def test_the_tag_round_trips_and_an_untagged_version_has_no_verdict() -> None:
    customers, measures = _frames({"a": (100, 10, 0), "b": (100, 6, 0), "c": (100, 7, 0)})
    report = fairness_report(customers, measures, SETTINGS)
    back = breaches_from_tag(report.tag())
    assert back == sorted(report.breaches, key=lambda b: b.ratio)
    assert [b.group for b in back or []] == ["b", "c"]  # the worst first
    assert breaches_from_tag("[]") == [] and breaches_from_tag(None) is None
    assert breaches_from_tag("not json") is None


def test_group_table_counts_every_row_of_a_customer() -> None:
    customers = pd.DataFrame({"customer_id": ["x", "y"], "age_band": ["a", "a"]})
    measures = pd.DataFrame(
        {
            "customer_id": ["x", "x", "y"],
            "opportunities": [1, 1, 2],
            "offers": [3, 2, 0],
            "accepted": [1, 0, 0],
        }
    )
    table = group_table(customers, measures, ["age_band"])
    assert table.to_dict("records") == [
        {
            "attribute": "age_band",
            "group": "a",
            "customers": 2,
            "opportunities": 4,
            "offers": 5,
            "accepted": 1,
        }
    ]
    with pytest.raises(ValueError, match=r"measures need the columns \['accepted'\]"):
        group_table(customers, measures.drop(columns="accepted"), ["age_band"])
    with pytest.raises(ValueError, match="'treated' or 'control'"):
        group_table(customers, measures.assign(arm="both", outcome=0), ["age_band"])


def test_the_rules_file_has_a_validated_fairness_section() -> None:
    default = load_rules().fairness
    assert default.min_parity == 0.8 and default.min_group_size == 100
    assert default.max_p_value == 0.05
    assert default.attributes == ["age_band", "income_band", "household_composition"]
    data = {"rules": [], "fairness": {"min_parity": 1.5}}
    with pytest.raises(RulesError, match=r"field 'fairness\.min_parity'"):
        parse_rules(data, source="r.yaml")
    with pytest.raises(RulesError, match=r"fairness\.threshold"):
        parse_rules({"rules": [], "fairness": {"threshold": 0.8}}, source="r.yaml")
    assert parse_rules({"rules": []}).fairness == FairnessSettings()  # older files


# -- at training ----------------------------------------------------------------------------


def _independent_slates(result: Any) -> pd.DataFrame:
    """The top-3 of every test opportunity, recomputed with pandas from the test rows and
    the served scores: per customer, opportunities, offers served and accepted."""
    from training.pipeline import served_scores

    test = result.test
    score = served_scores(
        test, result.test_scores, result.calibrators, result.default_values, result.config
    )
    rows = pd.DataFrame(
        {
            "customer": test.customer,
            "as_of": test.as_of_s,
            "label": test.label,
            "score": score,
            "row": np.arange(len(score)),
        }
    )
    top = (
        rows.sort_values(["customer", "as_of", "score", "row"], ascending=[1, 1, 0, 1])
        .groupby(["customer", "as_of"])
        .head(3)
    )
    return top.groupby("customer").agg(
        opportunities=("as_of", "nunique"), offers=("label", "size"), accepted=("label", "sum")
    )


@dataclass
class Trained:
    home: Path
    workspace: Any  # features.Workspace
    model_name: str
    result: Any  # TrainResult
    strict: Any  # the rules that judge small groups strictly
    default_version: str  # logged under the default rules
    strict_version: str  # the same run logged under the strict rules


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """One small world trained once and logged twice: version 1 under the default rules
    (champion), version 2 under rules that judge groups of 5 customers and up at a
    parity of 0.99 (a breach is all but certain)."""
    from serving_helpers import CONFIG, _empty_store, _world_copy

    from features import load_snapshot
    from runtime.registry import CHAMPION, configure_tracking, set_alias
    from runtime.settings import Settings
    from training.config import load_config
    from training.pipeline import train
    from training.tracking import log_run

    home = tmp_path_factory.mktemp("fairness")
    strict = load_rules().model_copy(
        update={
            "fairness": FairnessSettings(
                min_parity=0.99,
                attributes=["age_band", "segment"],
                min_group_size=5,
                max_p_value=None,
            )
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEXTBEST_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        workspace = _world_copy(4, home / "ws")
        result = train(load_snapshot(workspace), load_rules(), load_config(None, **CONFIG))
        _empty_store(Settings.load().models_dir)
        configure_tracking()
        default = log_run(result, workspace, load_rules())
        set_alias(default["model_name"], CHAMPION, default["model_version"])
        breached = log_run(result, workspace, strict)
        yield Trained(
            home,
            workspace,
            default["model_name"],
            result,
            strict,
            default["model_version"],
            breached["model_version"],
        )


def test_training_measures_the_slates_it_would_serve(trained: Trained) -> None:
    from features import load_snapshot
    from training.tracking import served_fairness

    result = trained.result
    expected = _independent_slates(result)
    ids = load_snapshot(trained.workspace).customers.values
    expected.index = pd.Index(np.asarray(ids, dtype=object)[expected.index.to_numpy()])
    served = result.served.set_index("customer_id")
    assert len(served) == len(expected) > 20
    pd.testing.assert_frame_equal(
        served.sort_index()[["opportunities", "offers", "accepted"]].astype("int64"),
        expected.sort_index().astype("int64"),
        check_names=False,
    )
    # the groups' rates, recomputed from those slates with pandas
    report = served_fairness(result.served, trained.workspace, trained.strict)
    assert report is not None
    bands = trained.workspace.read("customers").set_index("customer_id")["age_band"]
    by_band = expected.groupby(bands.reindex(expected.index).to_numpy()).sum()
    judged = [g for g in report.groups if g.attribute == "age_band"]
    assert sorted(g.group for g in judged) == sorted(by_band.index)
    for group in judged:
        counts = by_band.loc[group.group]
        assert group.exposure_rate == pytest.approx(counts["offers"] / counts["opportunities"])
        assert group.acceptance_rate == pytest.approx(counts["accepted"] / counts["offers"])
    big = by_band[(by_band["offers"] >= 5)]
    customers = expected.groupby(bands.reindex(expected.index).to_numpy()).size()
    big = big[customers.reindex(big.index) >= 5]
    rates = big["accepted"] / big["offers"]
    assert report.parity["acceptance"]["age_band"] == pytest.approx(rates.min() / rates.max())


def test_training_logs_parity_metrics_an_artifact_and_the_breach_tag(trained: Trained) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    default = client.get_model_version(trained.model_name, trained.default_version)
    # the default rules judge groups of 100 customers: a world of 150 has none that big
    assert default.tags[FAIRNESS_TAG] == "[]"
    metrics = client.get_run(default.run_id).data.metrics
    assert metrics["fairness.breaches"] == 0
    assert not [k for k in metrics if k.startswith("fairness.") and "parity" in k]

    version = client.get_model_version(trained.model_name, trained.strict_version)
    breaches = breaches_from_tag(version.tags[FAIRNESS_TAG])
    assert breaches, version.tags
    run = client.get_run(version.run_id)
    logged = run.data.metrics
    assert logged["fairness.breaches"] >= len(breaches)
    for attribute in ("age_band", "segment"):
        for measure in ("exposure", "acceptance"):
            assert 0 <= logged[f"fairness.{measure}_parity.{attribute}"] <= 1
    folder = Path(client.download_artifacts(run.info.run_id, "", str(trained.home / "dl")))
    table = json.loads((folder / "fairness.json").read_text())
    assert len(table["breaches"]) == logged["fairness.breaches"]
    lowest = min(
        g["acceptance_parity"]
        for g in table["groups"]
        if g["attribute"] == "age_band" and g["judged"]["acceptance"]
    )
    assert logged["fairness.acceptance_parity.age_band"] == pytest.approx(lowest)
    # group labels and counts only: no customer id anywhere in the artifact
    ids = trained.workspace.read("customers")["customer_id"]
    text = (folder / "fairness.json").read_text()
    assert not [c for c in ids if re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", text)]


def test_the_model_card_and_evaluate_state_the_fairness_training_logged(
    trained: Trained,
) -> None:
    """The model card and `nextbest evaluate` said nothing of fairness: a reviewer had
    to open fairness.json. Now both list every breach the registry's tag holds, and
    evaluate, re-ranking the test buckets with the registered version, judges the same
    groups as training did."""
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from nextbest.cli import app

    client = MlflowClient()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEXTBEST_HOME", str(trained.home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        strict = client.get_model_version(trained.model_name, trained.strict_version)
        default = client.get_model_version(trained.model_name, trained.default_version)
        logged = breaches_from_tag(strict.tags[FAIRNESS_TAG])
        assert logged
        folder = Path(client.download_artifacts(strict.run_id, "", str(trained.home / "card")))
        card = (folder / "model_card.md").read_text()
        section = card[card.index("## Fairness") : card.index("## Features")]
        for breach in logged:
            assert f"BREACH: {breach.describe()}" in section
        assert "at least 5 customers" in section and "under 0.99" in section
        plain = Path(
            client.download_artifacts(default.run_id, "model_card.md", str(trained.home / "d"))
        )
        assert "- no breach" in plain.read_text()

        runner = CliRunner()
        ws = str(trained.workspace.path)
        out = runner.invoke(app, ["evaluate", "-w", ws, "--version", trained.strict_version])
        assert out.exit_code == 0, out.output
        assert "fairness of the served test slates:" in out.stdout
        for breach in logged:
            assert f"BREACH: {breach.describe()}" in out.stdout
        as_json = runner.invoke(
            app, ["evaluate", "-w", ws, "--version", trained.strict_version, "--json"]
        )
        judged = json.loads(as_json.stdout)["fairness"]
        table = json.loads((folder / "fairness.json").read_text())
        assert judged["groups"] == table["groups"] and judged["breaches"] == table["breaches"]


# -- on the review page --------------------------------------------------------------------


def test_the_review_page_shows_a_breach_before_sign_off(trained: Trained) -> None:
    from mlflow import MlflowClient
    from serving_helpers import forget_bentoml_metrics
    from starlette.testclient import TestClient

    from runtime.registry import delete_version_tags, set_version_tags
    from serving.ledger import SqlLedger
    from serving.review import ReviewStore
    from serving.service import NextBest

    home = trained.home
    db_url = f"sqlite:///{home / 'ledger.db'}"
    store = ReviewStore(SqlLedger(db_url).engine)
    store.add_user("alan", "approver-pass", "approver")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "NEXTBEST_HOME": str(home),
            "NEXTBEST_WORKSPACE": str(trained.workspace.path),
            "NEXTBEST_DB_URL": db_url,
            "NEXTBEST_HOLDOUT_SHARE": "0",
            "NEXTBEST_RELOAD_SECONDS": "3600",
            "BENTOML_HOME": str(home / "bentoml"),
        }.items():
            patch.setenv(key, value)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        forget_bentoml_metrics()
        breaches = breaches_from_tag(
            MlflowClient()
            .get_model_version(trained.model_name, trained.strict_version)
            .tags[FAIRNESS_TAG]
        )
        assert breaches
        with TestClient(NextBest.to_asgi(), follow_redirects=False) as client:
            csrf = _sign_in(client)

            opened = client.post(
                "/review/open",
                data={
                    "csrf": csrf,
                    "version": trained.strict_version,
                    "sample": 3,
                    "k": 2,
                    "threshold": 0.5,
                },
            )
            assert opened.status_code == 303, opened.text
            path = opened.headers["location"]

            def release_section() -> str:
                page = client.get(path)
                assert page.status_code == 200
                return page.text[page.text.index('id="release-title"') :]

            release = release_section()
            assert 'id="fairness-warning"' in release
            for breach in breaches:  # each: which attribute, which group, ratio vs threshold
                p = "not tested" if breach.p_value is None else f"{breach.p_value:.2g}"
                row = (
                    f"<tr><td>{breach.attribute}</td><td>{breach.group}</td>"
                    f"<td>{breach.measure}</td><td>{breach.rate:.4g}</td>"
                    f"<td>{breach.best_group} ({breach.best_rate:.4g})</td>"
                    f"<td>{breach.ratio:.2f}</td><td>0.99</td>"
                    f"<td>{p}</td></tr>"
                )
                assert row in release, release[:3000]
            assert release.index("fairness-warning") < release.index("Approve release")

            # a version judged without a breach says so, and one never judged says nothing
            set_version_tags(trained.model_name, trained.strict_version, {FAIRNESS_TAG: "[]"})
            clean = release_section()
            assert 'id="fairness-warning"' not in clean and "no parity breach" in clean
            delete_version_tags(trained.model_name, trained.strict_version, [FAIRNESS_TAG])
            never = release_section()
            assert "fairness-warning" not in never and "fairness-verdict" not in never


def _sign_in(client: Any) -> str:
    form = client.get("/review/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token
    response = client.post(
        "/review/login",
        data={
            "username": "alan",
            "password": "approver-pass",
            "csrf": token.group(1),
            "next": "/review/",
        },
    )
    assert response.status_code == 303, response.text
    found = re.search(r'name="csrf" value="([^"]+)"', client.get("/review/").text)
    assert found
    return found.group(1)


def test_a_breach_describes_itself() -> None:
    breach = Breach("age_band", "65+", "acceptance", 0.06, "25-34", 0.1, 0.6, 0.8)
    assert breach.describe() == (
        "age_band 65+: acceptance 0.06 is 0.60 of the best group's (25-34, 0.1), under 0.80"
    )
