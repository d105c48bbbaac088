"""What-if replay and the off-policy estimators: IPS, SNIPS and DR against hand-computed
values and against a synthetic logging policy's exactly known truth; inclusion
probabilities against exact enumeration and against counted draws; a replay of a served
world under a rule that kills an offer, with the ledger untouched; deterministic logs
refused."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from features import Snapshot, Workspace
from policy import load_rules
from policy.exploration import Exploration, draw_slate, inclusion_probabilities
from training.offpolicy import (
    cross_fitted_offer_means,
    doubly_robust,
    ips,
    off_policy_estimates,
    snips,
)

# -- the estimators, by hand ------------------------------------------------------------
# request 0 showed a (π0 .5, accepted) and b (π0 .25, not); the target's slate is {a, c}
# request 1 showed c (π0 .8, accepted) and a (π0 .4, accepted); the target's slate is {a}
REQUESTS = np.array([0, 0, 1, 1])
REWARDS = np.array([1.0, 0.0, 1.0, 1.0])
LOGGING = np.array([0.5, 0.25, 0.8, 0.4])
TARGET = np.array([1.0, 0.0, 0.0, 1.0])
SIZE = np.array([2.0, 1.0])
Q = {"a": 0.6, "b": 0.1, "c": 0.5}
PREDICTED = np.array([Q["a"], Q["b"], Q["c"], Q["a"]])
DIRECT = np.array([Q["a"] + Q["c"], Q["a"]])


def test_ips_snips_and_dr_by_hand() -> None:
    # weights: a in request 0: 1/.5 = 2; a in request 1: 1/.4 = 2.5; b, c: 0
    assert ips(REQUESTS, REWARDS, LOGGING, TARGET) == pytest.approx((2 + 2.5) / 2)
    # Σ w r / Σ w = 1, times the target's mean slate size (2 + 1) / 2
    assert snips(REQUESTS, REWARDS, LOGGING, TARGET, SIZE) == pytest.approx(1.5)
    # direct 1.1 + .6, residuals 2 · (1 − .6) + 2.5 · (1 − .6)
    dr = doubly_robust(REQUESTS, REWARDS, LOGGING, TARGET, PREDICTED, DIRECT)
    assert dr == pytest.approx((1.1 + 0.6 + 0.8 + 1.0) / 2)
    # a third request that showed nothing counts in the denominator
    assert ips(REQUESTS, REWARDS, LOGGING, TARGET, n_requests=3) == pytest.approx(4.5 / 3)
    both = off_policy_estimates(
        REQUESTS,
        REWARDS,
        LOGGING,
        TARGET,
        n_requests=2,
        target_size=SIZE,
        predicted=PREDICTED,
        direct=DIRECT,
        bootstrap_samples=200,
    )
    assert both["logging_policy"]["estimate"] == pytest.approx(1.5)  # (1 + 2) / 2
    assert both["ips"]["estimate"] == pytest.approx(2.25)
    assert both["snips"]["estimate"] == pytest.approx(1.5)
    assert both["doubly_robust"]["estimate"] == pytest.approx(1.75)
    for estimate in both.values():
        assert estimate["ci95_low"] <= estimate["estimate"] <= estimate["ci95_high"]


def test_a_deterministic_row_is_refused_by_the_estimators() -> None:
    with pytest.raises(ValueError, match="refuse deterministic rows"):
        ips(REQUESTS, REWARDS, np.array([0.5, np.nan, 0.8, 0.4]), TARGET)


def test_the_reward_model_by_hand() -> None:
    offers = np.array([0, 1, 2, 0])  # a, b, c, a
    on_logged, on_query = cross_fitted_offer_means(
        REQUESTS, offers, REWARDS, np.array([0, 1]), np.array([2, 1]), folds=1
    )
    overall = 3 / 4  # 5 pseudo-rows at the overall mean
    a, b, c = (2 + 5 * overall) / 7, (0 + 5 * overall) / 6, (1 + 5 * overall) / 6
    assert on_logged == pytest.approx([a, b, c, a])
    assert on_query == pytest.approx([c, b])
    # cross-fitted: with two folds, request 0's rows are predicted from request 1's alone
    on_logged, _ = cross_fitted_offer_means(
        REQUESTS, offers, REWARDS, np.array([0]), np.array([0]), folds=2, seed=0
    )
    fold = np.random.default_rng(0).permutation(2) % 2
    other = 1 - fold[0]  # requests 0 and 1 land in different folds
    assert fold[0] != fold[1] and other == fold[1]
    assert on_logged[0] == pytest.approx((1 + 5 * 1.0) / (1 + 5))  # a in request 1: 1/1


# -- inclusion probabilities --------------------------------------------------------------
def _exact_inclusion(scores, demoted, groups, k, method, rate, temperature=1.0):  # type: ignore[no-untyped-def]
    """Every ordered slate the draw can make, enumerated with its probability (written
    apart from policy.exploration: the module docstring's formulas, by hand)."""
    m = len(scores)
    included = np.zeros(m)

    def walk(open_: tuple[bool, ...], probability: float, depth: int) -> None:
        pool = [j for j in range(m) if open_[j]]
        if depth == k or not pool:
            return
        tier = [j for j in pool if demoted[j] == demoted[pool[0]]]
        if method == "softmax":
            weights = [math.exp(scores[j] / temperature) for j in tier]
            q = [w / sum(weights) for w in weights]
        else:
            q = [1 / len(tier)] * len(tier)
        for position, j in enumerate(tier):
            p = rate * q[position] + (1 - rate) * (position == 0)
            if p == 0:
                continue
            included[j] += probability * p
            after = list(open_)
            for other in range(m):
                if other == j or (groups[j] >= 0 and groups[other] == groups[j]):
                    after[other] = False
            walk(tuple(after), probability * p, depth + 1)

    walk(tuple([True] * m), 1.0, 0)
    return included


CASES = [
    ("softmax", 1.0, [2.0, 1.5, 1.0, 0.2, -1.0], [0, 0, 0, 0, 1], [-1, 0, 0, -1, -1], 3),
    ("softmax", 0.4, [1.0, 0.9, 0.3, 0.1], [0, 0, 0, 0], [-1, -1, -1, -1], 2),
    ("epsilon", 0.3, [5.0, 4.0, 3.0, 2.0, 1.0], [0, 0, 0, 1, 1], [1, -1, 1, -1, -1], 3),
]


@pytest.mark.parametrize(("method", "rate", "scores", "demoted", "groups", "k"), CASES)
def test_inclusion_probabilities_match_exact_enumeration(  # type: ignore[no-untyped-def]
    method, rate, scores, demoted, groups, k
) -> None:
    def estimate(k: int, draws: int, seed: int) -> np.ndarray:
        return inclusion_probabilities(
            np.array(scores),
            np.array(demoted, dtype=bool),
            np.array(groups),
            np.full(len(scores), -1),
            k,
            Exploration(method, rate, 1.0),
            np.random.default_rng(seed),
            draws=draws,
        )

    exact = _exact_inclusion(scores, demoted, groups, k, method, rate)
    assert estimate(k, 20_000, 3) == pytest.approx(exact, abs=0.01)
    # rank 1 alone is exact, whatever the draws
    first = estimate(1, 3, 0)
    assert first == pytest.approx(_exact_inclusion(scores, demoted, groups, 1, method, rate))


@pytest.fixture(scope="module")
def snapshot(small_workspace: Workspace) -> Snapshot:
    from features import load_snapshot

    return load_snapshot(small_workspace)


def test_logged_inclusions_match_the_frequencies_of_seeded_draws(snapshot: Snapshot) -> None:
    """The real draw (draw_slate), many times: how often each offer is in the slate
    against the inclusion probability each draw logs for it."""
    free = np.flatnonzero(snapshot.offer_bundle_ladder < 0)[:6]
    scores = np.array([1.2, 1.0, 0.9, 0.5, 0.4, 0.0])
    exploration = Exploration("softmax", rate=0.6, temperature=0.5)
    rules = load_rules().model_copy(update={"rules": []})
    demoted = np.zeros(len(free), dtype=bool)
    n = 3000
    shown: Counter[int] = Counter()
    logged: dict[int, list[float]] = {}
    for seed in range(n):
        slate = draw_slate(
            snapshot, rules, free, scores, demoted, 3, exploration, np.random.default_rng(seed)
        )
        assert slate.inclusions is not None and len(slate.inclusions) == len(slate.chosen)
        for code, inclusion in zip(slate.chosen, slate.inclusions, strict=True):
            shown[code] += 1
            logged.setdefault(code, []).append(inclusion)
    for code in (int(c) for c in free):
        p = float(np.mean(logged[code]))
        assert np.std(logged[code]) < 0.02  # one offer's figure barely varies between draws
        assert abs(shown[code] / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n)


# -- a synthetic logging policy with planted rewards ----------------------------------------
CONTEXTS, OFFERS, SLATE = 4, 5, 2
RNG = np.random.default_rng(11)
ACCEPT = RNG.uniform(0.02, 0.35, size=(CONTEXTS, OFFERS))  # planted P(accept | context, offer)
LOGGING_SCORES = RNG.normal(size=(CONTEXTS, OFFERS))
TARGET_SLATES = np.argsort(-(ACCEPT + 0.05 * RNG.normal(size=ACCEPT.shape)), axis=1)[:, :SLATE]


def _plackett_luce(context: int) -> np.ndarray:
    """Exact inclusion probabilities of the logging policy (softmax, rate 1, no collisions)."""
    weights = np.exp(LOGGING_SCORES[context])
    included = np.zeros(OFFERS)
    for first, second in itertools.permutations(range(OFFERS), 2):
        p = weights[first] / weights.sum() * weights[second] / (weights.sum() - weights[first])
        included[[first, second]] += p
    return included


VALUE = RNG.uniform(1.0, 5.0, size=(CONTEXTS, OFFERS))  # planted mean revenue per shown offer


def _simulate(seed: int, n: int, reward: str):  # type: ignore[no-untyped-def]
    """n logged requests: contexts uniform, slates drawn by Gumbel-top-2, rewards planted
    (accepted: Bernoulli; revenue: the planted mean plus a little noise)."""
    rng = np.random.default_rng(seed)
    context = rng.integers(0, CONTEXTS, n)
    keys = LOGGING_SCORES[context] + rng.gumbel(size=(n, OFFERS))
    slate = np.argsort(-keys, axis=1)[:, :SLATE]
    requests = np.repeat(np.arange(n), SLATE)
    offers = slate.ravel()
    contexts = np.repeat(context, SLATE)
    if reward == "accepted":
        rewards = (rng.random(len(offers)) < ACCEPT[contexts, offers]).astype(float)
    else:
        rewards = VALUE[contexts, offers] + rng.normal(0, 0.3, len(offers))
    inclusion = np.array([_plackett_luce(c) for c in range(CONTEXTS)])[contexts, offers]
    target = (TARGET_SLATES[contexts] == offers[:, None]).any(axis=1).astype(float)
    slate_requests = np.repeat(np.arange(n), SLATE)
    slate_offers = TARGET_SLATES[context].ravel()
    # DR's reward model: per (context, offer), so that it is close to the truth
    codes = contexts * OFFERS + offers
    predicted, on_slate = cross_fitted_offer_means(
        requests, codes, rewards, slate_requests, np.repeat(context, SLATE) * OFFERS + slate_offers
    )
    return off_policy_estimates(
        requests,
        rewards,
        inclusion,
        target,
        n_requests=n,
        target_size=np.full(n, float(SLATE)),
        predicted=predicted,
        direct=np.bincount(slate_requests, weights=on_slate, minlength=n),
        bootstrap_samples=300,
        seed=seed,
    )


@pytest.mark.parametrize("reward", ["accepted", "revenue"])
def test_ips_snips_and_dr_cover_a_target_policys_exact_value(reward: str) -> None:
    planted = ACCEPT if reward == "accepted" else VALUE
    truth = float(np.mean([planted[c, TARGET_SLATES[c]].sum() for c in range(CONTEXTS)]))
    logging_truth = float(
        np.mean([(_plackett_luce(c) * planted[c]).sum() for c in range(CONTEXTS)])
    )
    assert truth > logging_truth + 0.1  # the target is a different, better policy
    runs = [_simulate(seed, 1500, reward) for seed in range(30)]
    tolerance = 0.02 * max(truth, 1.0)
    for name in ("ips", "snips", "doubly_robust"):
        covered = sum(r[name]["ci95_low"] <= truth <= r[name]["ci95_high"] for r in runs)
        assert covered >= 25, (name, covered)  # 95 % intervals: 28.5 of 30 expected
        mean = np.mean([r[name]["estimate"] for r in runs])
        assert mean == pytest.approx(truth, abs=tolerance)
    # the logging policy's plain mean estimates its own value, not the target's
    assert np.mean([r["logging_policy"]["estimate"] for r in runs]) == pytest.approx(
        logging_truth, abs=tolerance
    )
    ips_error = np.mean([r["ips"]["std_error"] for r in runs])
    dr_error = np.mean([r["doubly_robust"]["std_error"] for r in runs])
    spread = {n: np.std([r[n]["estimate"] for r in runs]) for n in ("ips", "doubly_robust")}
    assert dr_error < ips_error
    if reward == "revenue":  # a reward the model explains: far less variance, seen too
        assert dr_error < 0.5 * ips_error
        assert spread["doubly_robust"] < 0.5 * spread["ips"]


# -- a replay of a served world --------------------------------------------------------------
DEFAULT_RULES = Path("policy/default_rules.yaml")


def _replay(served, url: str, rules: Path, bootstrap_samples: int):  # type: ignore[no-untyped-def]
    """The replay of the ledger at ``url`` on the served workspace, under ``rules``."""
    from measurement.replay import replay
    from serving.settings import ServingSettings

    return replay(
        ServingSettings(db_url=url, holdout_share=0.0),
        workspace=served.workspace,
        rules=rules,
        bootstrap_samples=bootstrap_samples,
    )


def _ledger_state(path: Path) -> tuple[str, dict[str, list[tuple[object, ...]]], list[str]]:
    """The ledger file's bytes (hashed), every table's rows, and the folder's files."""
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            tables = sa.inspect(connection).get_table_names()
            rows = {
                t: sorted(map(tuple, connection.execute(sa.text(f'SELECT * FROM "{t}"')).all()))
                for t in tables
            }
    finally:
        engine.dispose()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest, rows, sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def served_world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A trained, registered world; one ledger served with softmax exploration (with
    feedback), one served deterministically."""
    from serving_helpers import recommender_for, train_and_register

    root = tmp_path_factory.mktemp("replay")
    served = train_and_register(root / "home")
    customers = None
    ledgers = {}
    for name, settings in (
        ("explored", {"exploration": "softmax", "exploration_rates": (("*", 1.0),)}),
        ("deterministic", {}),
    ):
        folder = root / name
        folder.mkdir()
        recommender = recommender_for(served, folder / "ledger.db", **settings)
        customers = customers or sorted(recommender.known_customers())[:60]
        responses = recommender.recommend_many(customers, channel="web", placement="home", k=3)
        if name == "explored":
            for i, response in enumerate(responses):
                if response["offers"] and i % 3 == 0:
                    recommender.ledger.record_feedback(
                        request_id=response["request_id"],
                        offer_id=response["offers"][0]["offer_id"],
                        outcome="purchased",
                        value=10.0 + i,
                        at_s=recommender.now_s() + 60,
                    )
        recommender.ledger.dispose()
        ledgers[name] = (folder / "ledger.db", responses)
    return served, ledgers, root


def test_a_replay_under_a_rule_that_kills_an_offer(served_world) -> None:  # type: ignore[no-untyped-def]
    served, ledgers, root = served_world
    path, responses = ledgers["explored"]
    counts = Counter(o["offer_id"] for r in responses for o in r["offers"])
    killed, times = counts.most_common(1)[0]
    rules = yaml.safe_load(Path("policy/default_rules.yaml").read_text())
    for rule in rules["rules"]:
        if rule["type"] == "killed":
            rule["offers"] = [killed]
    new_rules = root / "kill.yaml"
    new_rules.write_text(yaml.safe_dump(rules))
    before = _ledger_state(path)
    report = _replay(served, f"sqlite:///{path}", new_rules, 100)
    assert _ledger_state(path) == before  # nothing served, nothing logged, no file made
    assert report.requests == len(responses)
    with_killed = [r for r in responses if killed in {o["offer_id"] for o in r["offers"]}]
    assert len(with_killed) == times
    assert report.slates_changed >= times
    assert report.slates_changed_by_policy >= 1
    assert report.exposure[killed] == {"logged": times, "new": 0}
    assert report.losses[killed] == times
    assert sum(report.gains.values()) >= 1
    # the kill fires once per request that had the offer as a candidate, and only then
    assert "offer_killed" not in report.reasons["logged"]
    generator = _candidates_with(served, responses, killed)
    assert report.reasons["new"]["offer_killed"] == generator
    collisions = {"mutually_exclusive", "bundle_ladder_conflict", "offer_killed"}
    for code, n in report.reasons["logged"].items():
        if code not in collisions:
            assert report.reasons["new"][code] == n, code
    estimates = report.estimates
    assert estimates["available"] and report.refused["deterministic"] == 0
    explored = sum(bool(r["offers"]) for r in responses)
    assert estimates["requests"] == explored == report.requests - report.refused["empty_slate"]
    # the logging policy's own value: the accepted offers (one per third request) per request
    accepted = sum(bool(r["offers"]) and i % 3 == 0 for i, r in enumerate(responses))
    assert estimates["accepted"]["logging_policy"]["estimate"] == pytest.approx(accepted / explored)
    revenue = sum(10.0 + i for i, r in enumerate(responses) if r["offers"] and i % 3 == 0)
    assert estimates["revenue"]["logging_policy"]["estimate"] == pytest.approx(revenue / explored)
    for reward in ("accepted", "revenue"):
        for name in ("ips", "snips", "doubly_robust"):
            e = estimates[reward][name]
            assert e["ci95_low"] <= e["estimate"] <= e["ci95_high"]
    json.dumps(report.to_json())  # the CLI's --json


def _candidates_with(served, responses, offer_id: str) -> int:  # type: ignore[no-untyped-def]
    """How many of the requests had ``offer_id`` among their candidates (the candidate
    generator asked directly, at the requests' moment)."""
    from features import Requests, load_snapshot
    from features.candidates import CandidateGenerator
    from training.config import load_config

    snapshot = load_snapshot(served.workspace)
    moment = pd.Timestamp(responses[0]["as_of"])
    data_end = pd.Timestamp(
        int(
            max(
                snapshot.line_seconds.max(initial=0),
                snapshot.events_by_customer_type.seconds.max(initial=0),
            )
        )
        + 1,
        unit="s",
    )
    config = load_config(None, min_pair_orders=3)
    generator = CandidateGenerator(
        max_candidates=config.max_candidates, min_pair_orders=config.min_pair_orders
    ).fit(snapshot, data_end)
    customers = [r["customer_id"] for r in responses]
    requests = Requests.build(
        snapshot, customers, [moment] * len(customers), channel=["web"] * len(customers)
    )
    candidates = generator.generate(snapshot, requests)
    code = int(snapshot.offers.encode([offer_id])[0])
    return len(set(candidates.request[candidates.offer == code].tolist()))


def test_a_deterministic_ledger_is_refused_with_its_reason(served_world) -> None:  # type: ignore[no-untyped-def]
    served, ledgers, _ = served_world
    path, responses = ledgers["deterministic"]
    before = _ledger_state(path)
    report = _replay(served, f"sqlite:///{path}", DEFAULT_RULES, 50)
    assert _ledger_state(path) == before
    served_slates = sum(bool(r["offers"]) for r in responses)
    assert report.refused["deterministic"] == served_slates > 0
    assert report.estimates == {
        "available": False,
        "reason": "no requests with a logging propensity in the evaluation period: "
        f"{served_slates} requests refused, logged by a deterministic policy (no "
        "propensity); off-policy estimates need slates drawn with exploration",
    }
    # the same rules as served, deterministically: the replay reproduces every slate
    assert report.slates_changed == 0 and report.slates_changed_by_policy == 0


def test_a_read_only_ledger_logs_nothing(served_world) -> None:  # type: ignore[no-untyped-def]
    from test_exploration import _log

    from serving.ledger import ServedOffer, SqlLedger

    _, ledgers, root = served_world
    path, _ = ledgers["deterministic"]
    before = _ledger_state(path)
    ledger = SqlLedger(f"sqlite:///{path}", buffer_path=root / "ro.buffer", read_only=True)
    try:
        with pytest.raises(PermissionError, match="read-only"):
            _log(ledger, "x", 1, [ServedOffer("o", 1, 1.0, None)], [])
        with pytest.raises(PermissionError, match="read-only"):
            ledger.record_feedback(
                request_id="x", offer_id="o", outcome="accepted", value=None, at_s=1
            )
    finally:
        ledger.dispose()
    assert _ledger_state(path) == before


def test_nextbest_simulate_prints_the_report(served_world) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from nextbest.cli import app

    served, ledgers, _ = served_world
    path, responses = ledgers["deterministic"]
    runner = CliRunner()
    common = ["--workspace", str(served.workspace.path), "--db-url", f"sqlite:///{path}"]
    refused = runner.invoke(app, ["simulate", *common])
    assert refused.exit_code == 2
    assert "--rules FILE and/or --version N" in refused.output
    before = _ledger_state(path)
    done = runner.invoke(
        app,
        ["simulate", "--rules", "policy/default_rules.yaml", *common, "--json"],
    )
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["requests"] == len(responses) and report["slates_changed"] == 0
    assert report["estimates"]["available"] is False
    text = runner.invoke(
        app, ["simulate", "--version", served.version, "--bootstrap", "20", *common]
    )
    assert text.exit_code == 0, text.output
    assert f"{len(responses)} requests replayed (0 holdout skipped)" in text.stdout
    assert "Off-policy estimates: not available (no requests with a logging" in text.stdout
    assert _ledger_state(path) == before


def test_a_replay_reads_a_postgresql_ledger_and_leaves_it_as_it_was(  # type: ignore[no-untyped-def]
    served_world, fresh_postgres: str
) -> None:
    from serving_helpers import recommender_for

    served, _, root = served_world
    recommender = recommender_for(
        served,
        root / "unused.db",
        db_url=fresh_postgres,
        exploration="epsilon",
        exploration_rates=(("*", 0.5),),
    )
    customers = sorted(recommender.known_customers())[:20]
    responses = recommender.recommend_many(customers, channel="web", placement="home", k=3)
    recommender.ledger.dispose()
    engine = sa.create_engine(fresh_postgres)

    def rows() -> dict[str, list[tuple[object, ...]]]:
        with engine.connect() as connection:
            return {
                t: sorted(map(tuple, connection.execute(sa.text(f'SELECT * FROM "{t}"')).all()))
                for t in sa.inspect(connection).get_table_names()
            }

    try:
        before = rows()
        report = _replay(served, fresh_postgres, DEFAULT_RULES, 50)
        assert rows() == before
    finally:
        engine.dispose()
    assert report.requests == len(responses)
    assert report.estimates["available"]
    assert report.estimates["requests"] == sum(bool(r["offers"]) for r in responses)
    logged = before["slate_offers"]
    assert logged and all(row[-1] is not None and 0 < row[-1] <= 1 for row in logged)


def test_a_ledger_from_before_inclusions_is_replayed_as_is_then_migrated(  # type: ignore[no-untyped-def]
    served_world, tmp_path: Path
) -> None:
    import shutil

    from serving.ledger import SqlLedger

    served, ledgers, _ = served_world
    source, responses = ledgers["explored"]
    path = tmp_path / "old.db"
    shutil.copy2(source, path)
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:  # the schema before inclusions were logged
        connection.execute(sa.text("ALTER TABLE slate_offers DROP COLUMN inclusion"))
    engine.dispose()
    before = _ledger_state(path)
    report = _replay(served, f"sqlite:///{path}", DEFAULT_RULES, 20)
    assert _ledger_state(path) == before  # read as it is: no column added by a replay
    explored = sum(bool(r["offers"]) for r in responses)
    assert report.refused["no_inclusion_probability"] == explored
    assert report.estimates["available"] is False
    assert report.estimates["reason"].endswith(
        f"; {explored} explored requests logged before inclusion probabilities were"
    )
    SqlLedger(f"sqlite:///{path}").dispose()  # the service's ledger migrates it
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        values = connection.execute(sa.text("SELECT inclusion FROM slate_offers")).all()
    engine.dispose()
    assert values and all(v is None for (v,) in values)
