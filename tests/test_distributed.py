"""The Dask engine: the same rows and a DaskLGBMRanker on a 2-worker LocalCluster land
within 2 % of the single-machine validation NDCG."""

from __future__ import annotations

import pytest

from features import TABLES, ScenarioConfig, Snapshot, coerce_table, make_world
from policy import load_rules
from training.config import load_config
from training.distributed import train_on_dask
from training.pipeline import train

pytestmark = pytest.mark.slow


def test_dask_matches_the_single_machine_run() -> None:
    world = make_world(ScenarioConfig(n_customers=400, n_days=180, seed=3))
    snapshot = Snapshot.from_tables({n: coerce_table(n, world.tables[n]) for n in TABLES})
    config = load_config(
        None,
        min_pair_orders=3,
        train_customers_per_cut=400,
        eval_customers_per_cut=400,
        bootstrap_samples=50,
        n_jobs=1,
    )
    local = train(snapshot, load_rules(), config)
    distributed = train_on_dask(snapshot, load_rules(), config, n_workers=2)
    assert distributed.extra["dask"]["scheduler"] == "LocalCluster(2 workers)"
    assert distributed.rows == local.rows  # the same rows, built on the workers
    reference = local.extra["validation_ndcg_at_k"]
    assert abs(distributed.extra["validation_ndcg_at_k"] - reference) <= 0.02 * reference
