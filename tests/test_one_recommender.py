"""One recommender, however it is reached: the service, the CLI and batch (local and Dask)
are assembled by the same factory and serve the same slates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serving_helpers import Served, forget_bentoml_metrics, train_and_register
from typer.testing import CliRunner

from nextbest.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return train_and_register(tmp_path_factory.mktemp("one"))


def test_service_cli_batch_and_dask_serve_identical_slates_with_a_block(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same customers, moment and settings through the four ways in (the service over
    HTTP, `nextbest recommend`, `recommend-batch`, `recommend-batch --engine dask`), each on
    its own ledger holding the same reviewer's segment block: the same slates."""
    import pandas as pd
    from starlette.testclient import TestClient

    from serving.assembly import build_recommender
    from serving.ledger import SqlLedger
    from serving.review import ReviewStore
    from serving.service import NextBest
    from serving.settings import ServingSettings

    customers = [f"S{i:05d}" for i in range(1, 31)]
    email = ("--channel", "email", "--placement", "inbox", "--k", "3")
    monkeypatch.setenv("NEXTBEST_HOME", str(served.home))
    monkeypatch.setenv("NEXTBEST_HOLDOUT_SHARE", "0.1")  # holdouts must agree too
    # the same slates and becauses everywhere: a loaded machine must not use up the latency
    # budget (and serve short becauses) in one of the ways and not in another
    monkeypatch.setenv("NEXTBEST_BUDGET_MS", "600000")
    # a block that matters: the top offer of the first customer with a segment
    probe = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=f"sqlite:///{tmp_path / 'probe.db'}"),
        workspace=served.workspace,
    )
    segments = served.workspace.read("customers").set_index("customer_id")["segment"]
    tops = {
        c: answer["offers"][0]["offer_id"]
        for c in customers
        if isinstance(segments.get(c), str)
        and (answer := probe.recommend(c, channel="email", placement="inbox", k=3))["offers"]
    }
    blocked_customer = next(iter(tops))
    block = (tops[blocked_customer], str(segments[blocked_customer]))

    def ledger(name: str) -> str:
        url = f"sqlite:///{tmp_path / name}"
        store = ReviewStore(SqlLedger(url).engine)
        store.add_user("rita", "reviewer-pass", "reviewer")
        store.block(*block, "irrelevant", actor="rita")
        return url

    def slates(frame: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
        return {
            c: list(zip(group["offer_id"], group["because"], strict=True))
            for c, group in frame.sort_values(["customer_id", "rank"]).groupby("customer_id")
        }

    ways: dict[str, dict[str, list[tuple[str, str]]]] = {}
    monkeypatch.setenv("NEXTBEST_WORKSPACE", str(served.workspace.path))
    monkeypatch.setenv("NEXTBEST_DB_URL", ledger("service.db"))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    forget_bentoml_metrics()
    with TestClient(NextBest.to_asgi()) as http:
        answers = [
            http.post(
                "/recommend",
                json={"customer_id": c, "channel": "email", "placement": "inbox", "k": 3},
            ).json()
            for c in customers
        ]
    ways["service"] = {
        a["customer_id"]: [(o["offer_id"], o["because"]) for o in a["offers"]]
        for a in answers
        if a["offers"]
    }
    monkeypatch.delenv("NEXTBEST_WORKSPACE")
    runner = CliRunner()
    monkeypatch.setenv("NEXTBEST_DB_URL", ledger("recommend.db"))
    single = {}
    for c in customers[:8]:
        result = runner.invoke(
            app,
            ["recommend", c, *email, "--json", "-w", str(served.workspace.path)],
        )
        assert result.exit_code == 0, result.output
        answer = json.loads(result.stdout)
        if answer["offers"]:
            single[c] = [(o["offer_id"], o["because"]) for o in answer["offers"]]
    ways["recommend"] = single
    (tmp_path / "who.csv").write_text("customer_id\n" + "\n".join(customers) + "\n")
    for engine in ("local", "dask"):
        monkeypatch.setenv("NEXTBEST_DB_URL", ledger(f"batch-{engine}.db"))
        out = tmp_path / f"{engine}.csv"
        result = runner.invoke(
            app,
            [
                *("recommend-batch", "--customers", str(tmp_path / "who.csv"), "--out", str(out)),
                *(*email, "--engine", engine, "-w", str(served.workspace.path)),
            ],
        )
        assert result.exit_code == 0, result.output
        ways[f"recommend-batch {engine}"] = slates(pd.read_csv(out, dtype={"customer_id": str}))

    reference = ways["service"]
    assert len(reference) >= 20  # most customers get a slate (a tenth are held out)
    assert blocked_customer in reference
    assert block[0] not in {offer for offer, _ in reference[blocked_customer]}
    for way, got in ways.items():
        expected = {c: reference[c] for c in got} if way == "recommend" else reference
        assert got == expected, way
    assert set(ways["recommend"]) == {c for c in customers[:8] if c in reference}


def test_a_version_from_another_workspace_or_feature_list_is_refused(
    served: Served, tmp_path: Path
) -> None:
    """Each workspace registers its own model: training another one never moves what this
    one serves, and serving refuses a version trained elsewhere or on other features."""
    from dataclasses import replace

    from runtime.registry import CHAMPION, ModelMismatchError, load_bundle, resolve_version
    from serving.assembly import build_recommender
    from serving.settings import ServingSettings

    # the same MLflow store, another workspace (trained and made champion there)
    other = train_and_register(served.home, seed=11, workspace_dir=tmp_path / "elsewhere")
    assert other.model_name != served.model_name
    assert resolve_version(served.model_name, alias=CHAMPION)[0] == served.version

    settings = ServingSettings(holdout_share=0.0, db_url=f"sqlite:///{tmp_path / 'l.db'}")
    foreign = load_bundle(other.model_name, version=other.version)
    with pytest.raises(ModelMismatchError, match="was trained on workspace"):
        build_recommender(settings, workspace=served.workspace, bundle=foreign)
    own = load_bundle(served.model_name, version=served.version)
    shuffled = replace(own, meta=own.meta | {"feature_names": own.feature_names[::-1]})
    with pytest.raises(ModelMismatchError, match="other features"):
        build_recommender(settings, workspace=served.workspace, bundle=shuffled)
    recataloged = replace(own, meta=own.meta | {"catalogue": "0" * 16})
    with pytest.raises(ModelMismatchError, match="another offer catalogue"):
        build_recommender(settings, workspace=served.workspace, bundle=recataloged)
    # an alias that points nowhere yet: the CLI says so and ranks by the rules
    result = CliRunner().invoke(
        app, ["recommend", "S00001", "-w", str(served.workspace.path), "--alias", "nope"]
    )
    assert result.exit_code == 0 and "No 'nope' version" in result.output


def test_batch_on_dask_in_many_chunks_matches_the_local_run(served: Served, tmp_path: Path) -> None:
    """recommend-batch on a 2-worker cluster, 40 customers in chunks of 7: the same rows,
    in the customers' order, with the same scores."""
    import pandas as pd

    from serving.assembly import build_recommender
    from serving.batch import recommend_batch, recommend_batch_dask
    from serving.settings import ServingSettings

    customers = pd.DataFrame({"customer_id": [f"S{i:05d}" for i in range(1, 41)]})

    def recommender(name: str):  # type: ignore[no-untyped-def]
        settings = ServingSettings(holdout_share=0.1, db_url=f"sqlite:///{tmp_path / name}")
        return build_recommender(settings, workspace=served.workspace)

    local = recommend_batch(
        recommender("local.db"), customers, channel="email", placement="inbox", k=3
    )
    spread = recommend_batch_dask(
        recommender("dask.db"), customers, channel="email", placement="inbox", k=3, chunk=7
    )
    assert len(local) > 40
    pd.testing.assert_frame_equal(
        local.drop(columns=["score", "probability"]), spread.drop(columns=["score", "probability"])
    )
    assert spread["score"].to_numpy() == pytest.approx(local["score"].to_numpy())
