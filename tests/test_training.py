"""Training: deterministic, tracked in MLflow, registered as challenger, and evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from model_helpers import assert_same_rows, rows_with_and_without_the_future
from typer.testing import CliRunner

from features import (
    OrderLineMapping,
    ScenarioConfig,
    Workspace,
    import_transactions,
    load_snapshot,
    make_world,
    write_world,
)
from features.history import second_ceil
from nextbest.cli import app
from policy import load_rules
from runtime.registry import FEATURES_TAG, find_version
from training.config import ConfigError, load_config
from training.dataset import _opportunities, cut_points
from training.pipeline import bucket_rows_options, train

CONFIG = {
    "min_pair_orders": 3,
    "train_customers_per_cut": 150,
    "eval_customers_per_cut": 150,
    "n_estimators": 60,
    "bootstrap_samples": 100,
    "n_jobs": 1,  # two test workers share two cores (see serving_helpers.CONFIG)
}


@pytest.fixture(scope="module")
def world_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = make_world(ScenarioConfig(n_customers=150, n_days=150, seed=4))
    return write_world(world, tmp_path_factory.mktemp("train") / "ws").path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NEXTBEST_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "config.yaml").write_text(json.dumps(CONFIG))
    return tmp_path


def test_same_data_and_config_give_the_same_model(world_path: Path) -> None:
    snapshot = load_snapshot(Workspace(world_path))
    config = load_config(None, **CONFIG)
    first = train(snapshot, load_rules(), config)
    again = train(snapshot, load_rules(), config)
    assert first.booster.model_to_string() == again.booster.model_to_string()
    assert first.metrics == again.metrics


def test_splits_are_in_time_order_and_cover_the_history(world_path: Path) -> None:
    config = load_config(None, **CONFIG)
    snapshot = load_snapshot(Workspace(world_path))
    splits = cut_points(snapshot, config)
    last_line = pd.Timestamp(int(snapshot.line_seconds.max()), unit="s")
    assert splits.train[-1] < splits.ends["train"] <= splits.validation[0]
    assert splits.validation[-1] < splits.ends["validation"] <= splits.test[0]
    assert splits.test[-1] < splits.ends["test"] and splits.ends["test"] > last_line
    # 2025-01-06 .. 2025-06-04: the warm-up is a quarter of it (37 days), shorter than 8 weeks
    assert splits.train[0] == pd.Timestamp("2025-02-12")
    assert all(
        b - a == pd.Timedelta(days=7) for a, b in zip(splits.train, splits.train[1:], strict=False)
    )


def test_a_twelve_week_history_trains_on_thousands_of_opportunities(tmp_path: Path) -> None:
    """Weekly cut points after an 8-week warm-up and a 14-day embargo gave a 12-week
    history 2 cut points, and training refused it. Basket buckets after a quarter-length
    warm-up give it 7 training buckets, each taking more customers to reach the minimum."""
    world = make_world(ScenarioConfig(n_customers=150, n_days=84, seed=5))
    snapshot = load_snapshot(write_world(world, tmp_path / "ws"))
    config = load_config(None, **CONFIG, min_train_opportunities=2_100)
    splits = cut_points(snapshot, config)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (7, 2, 2)
    assert bucket_rows_options(config, splits, "train", 0)["customers_per_cut"] == 300
    # 300 a bucket is more than the world's 150 customers: every customer who ordered in a
    # bucket and had ordered before is an opportunity, once (plain pandas on the raw orders)
    orders = world.tables["orders"]
    orders = orders[(orders["quantity"] > 0) & (orders["customer_id"] != "UNKNOWN")]
    first = orders.groupby("customer_id")["ordered_at"].min()
    expected = 0
    for start, end in zip(splits.train, [*splits.train[1:], splits.ends["train"]], strict=True):
        inside = orders[(orders["ordered_at"] >= start) & (orders["ordered_at"] < end)]
        ordered = inside.groupby("customer_id")["ordered_at"].max()
        expected += int((first.reindex(ordered.index) < ordered).sum())
    sampled = 0
    for index, (start, end) in enumerate(
        zip(splits.train, [*splits.train[1:], splits.ends["train"]], strict=True)
    ):
        rng = np.random.default_rng(index)
        sampled += len(_opportunities(snapshot, second_ceil(start), second_ceil(end), 300, rng)[0])
    assert sampled == expected and expected > 300
    result = train(snapshot, load_rules(), config)
    # rows exist for the opportunities with at least one eligible candidate
    assert 300 < result.rows["train_opportunities"] <= expected
    assert result.metrics["served"]["opportunities"] > 100


@pytest.mark.parametrize("name", ["train", "validation", "test"])
def test_no_label_or_feature_reads_past_its_split(world_path: Path, name: str) -> None:
    """Remove everything at or after a split's end from the raw tables: that split's rows
    (opportunities, features and labels) must not change. For the test split the end is
    ``until``, so this also holds ``--until``. (Coupons: the demo's test does it.)"""
    config = load_config(None, **{**CONFIG, "until": "2025-05-20"})
    before, after = rows_with_and_without_the_future(Workspace(world_path), config, name)
    assert_same_rows(before, after)


def test_train_logs_everything_and_registers_a_challenger(world_path: Path, home: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    runner = CliRunner()
    result = runner.invoke(
        app, ["train", "-w", str(world_path), "--config", str(home / "config.yaml"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model_version"] == "1" and summary["alias"] == "challenger"
    assert {"item", "cross_sell"} <= set(summary["metrics"])

    client = MlflowClient()
    assert mlflow.get_tracking_uri() == f"sqlite:///{home / 'models' / 'mlflow.db'}"
    run = client.get_run(summary["run_id"])
    assert run.data.params["config.max_depth"] == "5"
    assert run.data.params["rules.hash"] == load_rules().content_hash
    assert run.data.tags["dataset.fingerprint"] == Workspace(world_path).fingerprint
    metrics = run.data.metrics
    assert "item.model.ndcg_at_10" in metrics
    for baseline in (
        "popularity",
        "personal_frequency",
        "personal_then_global",
        "copurchase",
        "rules_only",
    ):
        assert f"item.baselines.{baseline}.ndcg_at_10" in metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "bundle", "model_card.md", "features.json", "rules.yaml"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {
        "shap_beeswarm.png",
        "feature_importance.png",
        "lift_gain_by_decile.png",
        "calibration_curve.png",
    }
    card = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_card.md")
    assert "NDCG@10" in card and "personal_then_global" in card
    assert (
        str(client.get_model_version_by_alias(summary["model_name"], "challenger").version) == "1"
    )
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(summary["model_name"], "champion")
    booster = mlflow.lightgbm.load_model(f"models:/{summary['model_name']}@challenger")
    assert booster.num_feature() == len(
        json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/bundle/bundle.json"))[
            "feature_names"
        ]
    )

    skipped = runner.invoke(
        app,
        [
            "train",
            "-w",
            str(world_path),
            "--config",
            str(home / "config.yaml"),
            "--quiet",
            "--if-missing",
        ],
    )
    assert json.loads(skipped.stdout) == {"model_version": "1", "skipped": True}
    assert summary["model_name"] == f"nextbest-ranker-{Workspace(world_path).workspace_id}"

    again = runner.invoke(
        app, ["train", "-w", str(world_path), "--config", str(home / "config.yaml"), "--quiet"]
    )
    assert json.loads(again.stdout)["model_version"] == "2"
    assert (
        str(client.get_model_version_by_alias(summary["model_name"], "challenger").version) == "2"
    )
    # a version trained with other features (older code) is not "already trained"
    fingerprint, rules_hash = (
        client.get_model_version(summary["model_name"], "2").tags[k]
        for k in ("dataset.fingerprint", "rules.hash")
    )
    assert find_version(summary["model_name"], fingerprint, rules_hash) == "2"
    client.set_model_version_tag(summary["model_name"], "2", FEATURES_TAG, "older-features")
    assert find_version(summary["model_name"], fingerprint, rules_hash) == "1"
    client.delete_model_version_tag(summary["model_name"], "1", FEATURES_TAG)  # before the tag
    assert find_version(summary["model_name"], fingerprint, rules_hash) is None

    evaluated = runner.invoke(app, ["evaluate", "-w", str(world_path), "--version", "1", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["model_version"] == "1"
    item = report["metrics"]["item"]
    assert item["model"]["ndcg_at_10"] == pytest.approx(
        summary["metrics"]["item"]["ndcg_at_10"], abs=1e-4
    )
    assert set(item["baselines"]) == {
        "popularity",
        "personal_frequency",
        "personal_then_global",
        "copurchase",
        "rules_only",
    }


def test_evaluate_without_a_model_says_so(world_path: Path, home: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "-w", str(world_path)])
    assert result.exit_code == 2
    assert "has no alias 'challenger'" in result.stderr and "nextbest train" in result.stderr


def test_imported_order_lines_train_and_beat_top_frequency(tmp_path: Path, home: Path) -> None:
    world = make_world(ScenarioConfig(n_customers=250, n_days=160, seed=9))
    orders = world.tables["orders"]
    orders.rename(
        columns={
            "customer_id": "shopper",
            "ordered_at": "when",
            "product_id": "sku",
            "amount": "paid",
            "quantity": "units",
        }
    )[["shopper", "when", "sku", "paid", "units"]].to_csv(tmp_path / "lines.csv", index=False)
    mapping = OrderLineMapping(
        customer="shopper", time="when", item="sku", amount="paid", quantity="units"
    )
    workspace = import_transactions(tmp_path / "lines.csv", mapping, tmp_path / "imported")
    result = CliRunner().invoke(
        app, ["train", "-w", str(workspace.path), "--config", str(home / "config.yaml"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    evaluated = CliRunner().invoke(app, ["evaluate", "-w", str(workspace.path), "--json"])
    item = json.loads(evaluated.stdout)["metrics"]["item"]
    assert item["model"]["recall_at_10"] > item["baselines"]["personal_then_global"]["recall_at_10"]


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"field 'max_depth': Input should be greater"):
        load_config(None, max_depth=0)
    (tmp_path / "c.yaml").write_text("max_dept: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: field 'max_dept': Extra inputs"):
        load_config(tmp_path / "c.yaml")
    assert load_config(None).max_depth == 5
    assert np.isclose(load_config(None, learning_rate=0.05).learning_rate, 0.05)


def test_training_learns_nothing_from_a_customer_without_consent_to_personalisation() -> None:
    """A customer who withdrew consent to personalisation is served as an unknown one
    (ranked by popularity, nothing of theirs cited), but their later opportunities still
    became training rows: the model learnt from histories it may not use. The consent
    table is the oracle: after the withdrawal, on every channel, no row of theirs."""
    from features import FeatureBuilder, ScenarioConfig, Snapshot, coerce_table, make_world
    from features.candidates import CandidateGenerator
    from features.contract import CHANNELS
    from features.workspace import TABLES
    from policy import load_rules
    from training.config import TrainConfig
    from training.dataset import build_rows

    world = make_world(ScenarioConfig(n_customers=80, n_days=120, seed=5))
    tables = {name: coerce_table(name, world.tables[name]) for name in TABLES}
    start = pd.Timestamp(world.config.start)
    withdrawn_at = start + pd.Timedelta(days=60)
    ids = tables["customers"]["customer_id"].tolist()
    withdrawn = ids[::3]
    withdrawal = pd.DataFrame(
        [
            {
                "customer_id": c,
                "channel": channel,
                "purpose": "personalisation",
                "granted": False,
                "updated_at": withdrawn_at,
            }
            for c in withdrawn
            for channel in CHANNELS
        ]
    )
    tables["consent"] = coerce_table("consent", pd.concat([tables["consent"], withdrawal]))
    snapshot = Snapshot.from_tables(tables)
    config = TrainConfig(min_pair_orders=3)
    cuts = [start + pd.Timedelta(days=d) for d in range(28, 113, 7)]
    rows = build_rows(
        snapshot,
        load_rules(),
        lambda t: FeatureBuilder(min_pair_orders=3).fit(snapshot, t),
        CandidateGenerator(min_pair_orders=3).fit(snapshot, cuts[0]),
        cuts,
        config,
        split_end=start + pd.Timedelta(days=119),
        customers_per_cut=80,
        negatives_per_group=None,
        out_of_fold=False,
    )
    who = np.asarray(snapshot.customers.decode(rows.customer)).astype(str)
    theirs = np.isin(who, [str(c) for c in withdrawn])
    after = rows.as_of_s >= int(withdrawn_at.value // 10**9)
    assert (theirs & ~after).sum() > 0  # they were rows before, so the check can fail
    assert (~theirs & after).sum() > 0  # and the others still are, after
    assert (theirs & after).sum() == 0
