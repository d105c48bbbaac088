"""Training and evaluation, end to end, with progress and a timing summary per stage.

``train`` is pure with respect to I/O: it takes a snapshot, rules and a config and
returns a :class:`TrainResult`. Logging to MLflow is a thin shell around it
(``training.tracking``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from features import FeatureBuilder, Snapshot
from features.candidates import CandidateGenerator, fit_with_one_lift
from policy import RuleSet
from policy.arbitration import (
    REPEAT_FEATURE,
    Calibrator,
    arbitrate,
    bounded_value,
    rank_scores,
    row_tasks,
)
from training.baselines import BASELINES
from training.config import TrainConfig
from training.dataset import TASKS, RowSet, Splits, build_rows, cut_points
from training.metrics import (
    METRICS,
    bootstrap_difference,
    brier_score,
    catalog_coverage,
    group_owners,
    ndcg_at_k,
    ranks_within_groups,
)
from training.model import calibrate, fit_ranker, raw_scores
from training.offpolicy import off_policy_value

__all__ = [
    "Evaluation",
    "Stages",
    "TrainResult",
    "evaluate_booster",
    "evaluate_rows",
    "served_measures",
    "served_per_customer",
    "served_scores",
    "served_slates",
    "train",
]

KS = (5, 10)
_SEED_OFFSET = {"train": 1, "validation": 2, "test": 3}
SLATE = 3


class Stages:
    """Wall time per named stage, and rich progress bars for the long ones."""

    def __init__(self, console: Console | None = None, show: bool = True) -> None:
        self.seconds: dict[str, float] = {}
        self.console = console or Console(stderr=True)
        self.show = show

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        started = time.perf_counter()
        if self.show and total:
            with Progress(
                TextColumn(f"[bold]{name}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            ) as progress:
                task = progress.add_task(name, total=total)
                yield lambda n: progress.advance(task, n)
        else:
            if self.show:
                self.console.print(f"[bold]{name}[/bold] …")
            yield lambda n: None
        self.seconds[name] = round(time.perf_counter() - started, 2)

    def note(self, text: str) -> None:
        """Say what the run chose (shown with the progress)."""
        if self.show:
            self.console.print(text)

    def summary(self) -> str:
        width = max(map(len, self.seconds), default=0)
        lines = [f"  {name:<{width}}  {seconds:8.2f} s" for name, seconds in self.seconds.items()]
        lines.append(f"  {'total':<{width}}  {sum(self.seconds.values()):8.2f} s")
        return "\n".join(lines)


@dataclass
class TrainResult:
    booster: lgb.Booster
    calibrators: dict[str, Calibrator]
    config: TrainConfig
    splits: Splits
    metrics: dict[str, Any]
    timings: dict[str, float]
    rows: dict[str, int]
    default_values: dict[str, float]
    validation: RowSet
    test: RowSet
    test_scores: np.ndarray
    catalogue: str = ""  # Snapshot.catalogue_fingerprint(): serving checks it
    extra: dict[str, Any] = field(default_factory=dict)
    # per customer of the test slates the model would serve (served_measures): fairness
    served: pd.DataFrame | None = None


class _Fitted:
    """Feature builders and candidate generators refitted every N days along time."""

    def __init__(self, snapshot: Snapshot, config: TrainConfig, first: pd.Timestamp) -> None:
        self.snapshot, self.config, self.first = snapshot, config, first
        self._cache: dict[pd.Timestamp, tuple[FeatureBuilder, CandidateGenerator]] = {}

    def _anchor(self, t: pd.Timestamp) -> pd.Timestamp:
        step = pd.Timedelta(days=self.config.refit_features_every_days)
        return self.first + step * int((t - self.first) // step)

    def _get(self, t: pd.Timestamp) -> tuple[FeatureBuilder, CandidateGenerator]:
        anchor = self._anchor(t)
        if anchor not in self._cache:
            self._cache[anchor] = fit_with_one_lift(
                self.snapshot,
                anchor,
                FeatureBuilder(min_pair_orders=self.config.min_pair_orders),
                CandidateGenerator(
                    max_candidates=self.config.max_candidates,
                    min_pair_orders=self.config.min_pair_orders,
                ),
            )
        return self._cache[anchor]

    def builder(self, t: pd.Timestamp) -> FeatureBuilder:
        return self._get(t)[0]

    def generator(self, t: pd.Timestamp) -> CandidateGenerator:
        return self._get(t)[1]


def bucket_rows_options(
    config: TrainConfig, splits: Splits, name: str, index: int
) -> dict[str, Any]:
    """How ``build_rows`` samples bucket ``index`` of split ``name``: where the split ends,
    how many opportunities a bucket takes (more per bucket when a short history has few
    buckets), negatives and folds. The local and the Dask engine both read it."""
    train = name == "train"
    cuts = getattr(splits, name)
    per_cut = config.train_customers_per_cut if train else config.eval_customers_per_cut
    at_least = config.min_train_opportunities if train else config.min_eval_opportunities
    return {
        "split_end": splits.ends[name],
        "customers_per_cut": max(per_cut, -(-at_least // max(len(cuts), 1))),
        "negatives_per_group": config.negatives_per_group if train else None,
        "out_of_fold": train,
        "seed_offset": _SEED_OFFSET[name] + index * 7919,
    }


def _rows(
    snapshot: Snapshot,
    rules: RuleSet,
    fitted: _Fitted,
    splits: Splits,
    config: TrainConfig,
    stages: Stages,
    name: str,
) -> RowSet:
    cuts = getattr(splits, name)
    parts = []
    with stages.stage(f"{name} rows", total=len(cuts)) as advance:
        for index, cut in enumerate(cuts):
            parts.append(
                build_rows(
                    snapshot,
                    rules,
                    fitted.builder,
                    fitted.generator(cut),
                    [cut],
                    config,
                    **bucket_rows_options(config, splits, name, index),
                )
            )
            advance(1)
    offset = 0
    for part in parts:  # groups stay unique across cut points
        part.group = part.group + offset
        offset = int(part.group.max()) + 1 if len(part) else offset
    names = next((p.names for p in parts if p.names), [])
    return RowSet.concat([p for p in parts if len(p)], names)


def train(
    snapshot: Snapshot,
    rules: RuleSet,
    config: TrainConfig,
    *,
    stages: Stages | None = None,
    logged: tuple[pd.DataFrame, pd.DataFrame] | None = None,
) -> TrainResult:
    """Build the training set, fit and calibrate the ranker, evaluate it and the baselines.

    ``logged`` (exposures, outcomes) enables the off-policy estimate where exposures carry
    the logging policy's propensities.
    """
    stages = stages or Stages(show=False)
    with stages.stage("cut points"):
        splits = cut_points(snapshot, config)
    stages.note(splits.describe(config.cut_every_days))
    fitted = _Fitted(snapshot, config, splits.train[0])
    train_rows = _rows(snapshot, rules, fitted, splits, config, stages, "train")
    validation = _rows(snapshot, rules, fitted, splits, config, stages, "validation")
    test = _rows(snapshot, rules, fitted, splits, config, stages, "test")
    _require_positives(train_rows, validation)
    with stages.stage("fit ranker"):
        booster = fit_ranker(train_rows, validation, config)
    return finish(
        snapshot,
        rules,
        config,
        splits,
        fitted,
        booster,
        train_rows,
        validation,
        test,
        stages=stages,
        logged=logged,
    )


def _require_positives(train_rows: RowSet, validation: RowSet) -> None:
    if not train_rows.label.any() or not validation.label.any():
        raise ValueError(
            "no positive labels in the training or validation cut points: "
            "there is nothing to learn; train on a longer history (customers without "
            "consent to personalisation give no rows: see the consent table and the "
            "rules' unknown_consent)"
        )


def finish(
    snapshot: Snapshot,
    rules: RuleSet,
    config: TrainConfig,
    splits: Splits,
    fitted: _Fitted,
    booster: lgb.Booster,
    train_rows: RowSet,
    validation: RowSet,
    test: RowSet,
    *,
    stages: Stages,
    logged: tuple[pd.DataFrame, pd.DataFrame] | None,
) -> TrainResult:
    """Calibrate on validation, evaluate on test (and off-policy where possible)."""
    with stages.stage("calibrate"):
        calibrators = calibrate(raw_scores(booster, validation, config.n_jobs), validation)
    default_values = {
        task: float(np.nanmedian(train_rows.value[train_rows.task == code]))
        if (train_rows.task == code).any()
        and not np.all(np.isnan(train_rows.value[train_rows.task == code]))
        else 1.0
        for code, task in enumerate(TASKS)
    }
    with stages.stage("evaluate"):
        scores = raw_scores(booster, test, config.n_jobs)
        metrics = evaluate_rows(
            test,
            scores,
            calibrators,
            config,
            snapshot,
            validation=validation,
            default_values=default_values,
        )
        metrics_validation_ndcg = validation_ndcg(
            booster, validation, config.eval_at, config.n_jobs
        )
        ids = snapshot.customers.values
        served = served_per_customer(test, scores, calibrators, default_values, config, ids)
    if logged is not None:
        with stages.stage("off-policy value"):
            scorer = model_scorer(
                booster, calibrators, fitted.builder(splits.test[0]), config, default_values
            )
            metrics["off_policy"] = off_policy_value(
                snapshot,
                logged[0],
                logged[1],
                rules,
                scorer,
                generator=fitted.generator(splits.test[0]),
                builder=fitted.builder(splits.test[0]),
                start=splits.test[0],
                end=splits.ends["test"],
                bootstrap_samples=config.bootstrap_samples,
                seed=config.random_state,
            )
    return TrainResult(
        booster=booster,
        calibrators=calibrators,
        config=config,
        splits=splits,
        metrics=metrics,
        timings=dict(stages.seconds),
        rows={
            "train": len(train_rows),
            "validation": len(validation),
            "test": len(test),
            "train_positives": int(train_rows.label.sum()),
            "train_opportunities": int(opportunities_of(train_rows).max(initial=-1)) + 1,
            "test_groups": len(np.unique(test.group)),
        },
        default_values=default_values,
        validation=validation,
        test=test,
        test_scores=scores,
        catalogue=snapshot.catalogue_fingerprint(),
        extra={"validation_ndcg_at_k": metrics_validation_ndcg},
        served=served,
    )


def validation_ndcg(booster: lgb.Booster, validation: RowSet, k: int, n_jobs: int) -> float:
    """Mean NDCG@k over validation groups with a positive: the early-stopping metric."""
    scores = raw_scores(booster, validation, n_jobs)
    values = ndcg_at_k(validation.group, validation.label, scores, k)
    return float(values.mean()) if len(values) else float("nan")


def probabilities(
    scores: np.ndarray, rows: RowSet, calibrators: dict[str, Calibrator]
) -> np.ndarray:
    out = np.zeros(len(scores))
    for code, task in enumerate(TASKS):
        mine = rows.task == code
        if mine.any() and task in calibrators:
            out[mine] = calibrators[task](scores[mine])
    return out


def _ranking_metrics(rows: RowSet, score: np.ndarray, catalog: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in KS:
        for name, metric in METRICS.items():
            values = metric(rows.group, rows.label, score, k)
            out[f"{name}_at_{k}"] = float(values.mean()) if len(values) else float("nan")
    codes = np.unique(rows.group, return_inverse=True)[1]
    ranks = ranks_within_groups(codes, score)
    top = ranks <= 10
    new = rows.column("category_is_new")
    out["new_category_share_at_10"] = float(np.mean(new[top] == 1)) if top.any() else float("nan")
    out["coverage_at_10"] = catalog_coverage(rows.group, rows.offer, score, 10, catalog)
    return out


def evaluate_rows(
    rows: RowSet,
    scores: np.ndarray,
    calibrators: dict[str, Calibrator],
    config: TrainConfig,
    snapshot: Snapshot,
    *,
    validation: RowSet,
    default_values: dict[str, float],
) -> dict[str, Any]:
    """Model and baseline metrics per task and for the served slate (every task together,
    ranked as serving ranks), each with the model's NDCG@10 margin over the best baseline
    (chosen on validation) and its 95 % interval, resampling customers."""
    probability = probabilities(scores, rows, calibrators)
    report: dict[str, Any] = {}
    for code, task in enumerate(TASKS):
        mine = rows.task == code
        if not mine.any() or not rows.label[mine].any():
            continue
        part = rows.subset(mine)
        catalog = int(np.isin(np.arange(len(snapshot.offers)), np.unique(part.offer)).sum())
        model = _ranking_metrics(part, scores[mine], catalog)
        model["brier"] = brier_score(part.label, probability[mine])
        model["mean_probability"] = float(probability[mine].mean())
        model["label_rate"] = float(part.label.mean())
        model["expected_attach_rate"] = _expected_attach(part, probability[mine])
        model["arbitrated_ndcg_at_10"] = float(
            ndcg_at_k(
                part.group,
                part.label,
                arbitrate(
                    probability[mine],
                    bounded_value(part.value, default_values.get(task, 1.0), config.value_cap),
                    part.lever,
                    config.lever_cap,
                    1.0,
                ),
                10,
            ).mean()
        )
        baselines = {
            name: _ranking_metrics(part, baseline(part), catalog)
            for name, baseline in BASELINES.items()
        }
        best = _best_on_validation(validation.subset(validation.task == code))
        report[task] = {
            "groups": len(np.unique(part.group)),
            "groups_with_positive": len(ndcg_at_k(part.group, part.label, scores[mine], 10)),
            "rows": int(mine.sum()),
            "model": model,
            "baselines": baselines,
            "best_baseline": best,
            "best_baseline_chosen_on": "validation",
            "ndcg_at_10_margin": _margin(
                part.group, part.label, scores[mine], BASELINES[best](part), part.customer, config
            ),
        }
    report["served"] = served_slate_metrics(
        rows, scores, calibrators, default_values, config, validation=validation
    )
    return report


def _margin(
    group: np.ndarray,
    label: np.ndarray,
    model: np.ndarray,
    baseline: np.ndarray,
    customer: np.ndarray,
    config: TrainConfig,
    k: int = 10,
) -> dict[str, float]:
    """Model − baseline NDCG@k over groups with a positive, bootstrapped by customer."""
    mean, low, high = bootstrap_difference(
        ndcg_at_k(group, label, model, k),
        ndcg_at_k(group, label, baseline, k),
        config.bootstrap_samples,
        config.random_state,
        clusters=group_owners(group, label, customer),
    )
    return {"mean": mean, "ci95_low": low, "ci95_high": high}


def _best_on_validation(rows: RowSet, groups: np.ndarray | None = None) -> str:
    """The baseline with the best NDCG@10 on validation rows, ranked within ``groups``
    (default: the rows' own task groups); the first baseline when there is no positive."""
    if not len(rows) or not rows.label.any():
        return next(iter(BASELINES))
    group = rows.group if groups is None else groups
    ndcg = {
        name: float(ndcg_at_k(group, rows.label, baseline(rows), 10).mean())
        for name, baseline in BASELINES.items()
    }
    return max(ndcg, key=lambda name: ndcg[name])


SERVED_KS = (3, 10)


def opportunities_of(rows: RowSet) -> np.ndarray:
    """One code per opportunity (customer at a moment): the unit a served slate ranks,
    across every task's group."""
    return np.unique(
        rows.customer.astype(np.int64) * (1 << 34) + rows.as_of_s.astype(np.int64),
        return_inverse=True,
    )[1]


def _slate_metrics(opportunity: np.ndarray, label: np.ndarray, score: np.ndarray) -> dict:
    out: dict[str, float] = {}
    for k in SERVED_KS:
        for name in ("ndcg", "recall", "hit_rate"):
            values = METRICS[name](opportunity, label, score, k)
            out[f"{name}_at_{k}"] = float(values.mean()) if len(values) else float("nan")
    return out


def served_slate_metrics(
    rows: RowSet,
    raw: np.ndarray,
    calibrators: dict[str, Calibrator],
    default_values: dict[str, float],
    config: TrainConfig,
    *,
    validation: RowSet,
) -> dict[str, Any]:
    """The slate serving would return, evaluated: every eligible offer of an opportunity,
    all tasks together, ranked by P(accept) × value × lever; a hit is any offer taken.
    Beside it, each baseline ranking the same rows; the best is chosen on validation."""
    opportunity = opportunities_of(rows)
    score = served_scores(rows, raw, calibrators, default_values, config)
    best = _best_on_validation(validation, opportunities_of(validation))
    margin = _margin(opportunity, rows.label, score, BASELINES[best](rows), rows.customer, config)
    return {
        "opportunities": int(opportunity.max()) + 1 if len(opportunity) else 0,
        "customers": len(np.unique(rows.customer)),
        "model": _slate_metrics(opportunity, rows.label, score),
        "baselines": {
            name: _slate_metrics(opportunity, rows.label, baseline(rows))
            for name, baseline in BASELINES.items()
        },
        "best_baseline": best,
        "best_baseline_chosen_on": "validation",
        "ndcg_at_10_margin": margin,
        "beats_best_baseline": bool(margin["ci95_low"] > 0),
    }


def served_scores(
    rows: RowSet,
    raw: np.ndarray,
    calibrators: dict[str, Calibrator],
    default_values: dict[str, float],
    config: TrainConfig,
) -> np.ndarray:
    """What serving orders a slate by: P(accept) per task × value × lever."""
    score, _ = rank_scores(
        raw,
        np.asarray(TASKS, dtype=object)[rows.task],
        rows.value,
        rows.lever,
        calibrators,
        default_values,
        config.lever_cap,
        config.value_cap,
    )
    return score


def served_slates(rows: RowSet, score: np.ndarray, k: int = SLATE) -> pd.DataFrame:
    """The top-``k`` slate of every opportunity of ``rows`` by ``score`` (every task
    together, as served): ``opportunity``, ``customer`` (code), ``offer`` (code), ``rank``
    (1-based) and ``accepted`` (its label)."""
    opportunity = opportunities_of(rows)
    rank = ranks_within_groups(opportunity, score)
    top = rank <= k
    return pd.DataFrame(
        {
            "opportunity": opportunity[top],
            "customer": rows.customer[top].astype(np.int64),
            "offer": rows.offer[top].astype(np.int64),
            "rank": rank[top],
            "accepted": rows.label[top].astype(np.int64),
        }
    )


def served_measures(slates: pd.DataFrame, customer_ids: np.ndarray) -> pd.DataFrame:
    """Per customer of the served slates (``policy.fairness``'s measures): ``customer_id``,
    ``opportunities`` (their evaluated opportunities), ``offers`` (offers served) and
    ``accepted`` (of those, taken). ``customer_ids`` decodes the customer codes.

    Every evaluated opportunity had an eligible offer (one that eligibility empties has no
    rows), so the exposure rate here is how full a group's slates are."""
    per = slates.groupby("customer").agg(
        opportunities=("opportunity", "nunique"),
        offers=("offer", "size"),
        accepted=("accepted", "sum"),
    )
    return per.reset_index().assign(
        customer_id=np.asarray(customer_ids, dtype=object)[per.index.to_numpy()]
    )[["customer_id", "opportunities", "offers", "accepted"]]


def _expected_attach(rows: RowSet, probability: np.ndarray) -> float:
    """Expected share of opportunities taking at least one offer of a 3-offer slate."""
    codes = np.unique(rows.group, return_inverse=True)[1]
    ranks = ranks_within_groups(codes, probability)
    top = ranks <= SLATE
    miss = np.ones(codes.max() + 1)
    np.multiply.at(miss, codes[top], 1 - probability[top])
    return float(np.mean(1 - miss))


@dataclass(frozen=True)
class Evaluation:
    """A booster on the test buckets: its metrics and the baselines' (:func:`evaluate_rows`),
    and per customer the slates it would serve there (:func:`served_measures`), which
    fairness is judged on."""

    metrics: dict[str, Any]
    served: pd.DataFrame


def served_per_customer(
    rows: RowSet,
    scores: np.ndarray,
    calibrators: dict[str, Calibrator],
    default_values: dict[str, float],
    config: TrainConfig,
    customer_ids: np.ndarray,
) -> pd.DataFrame:
    """:func:`served_measures` of the slates ``scores`` would serve on ``rows``, as
    serving ranks them: what training and ``nextbest evaluate`` judge fairness on."""
    score = served_scores(rows, scores, calibrators, default_values, config)
    return served_measures(served_slates(rows, score), customer_ids)


def evaluate_booster(
    snapshot: Snapshot,
    rules: RuleSet,
    booster: lgb.Booster,
    calibrators: dict[str, Calibrator],
    config: TrainConfig,
    *,
    default_values: dict[str, float],
    stages: Stages | None = None,
) -> Evaluation:
    """A trained booster and the baselines on this snapshot's test buckets (the best
    baselines chosen on its validation buckets), as training evaluated it."""
    stages = stages or Stages(show=False)
    splits = cut_points(snapshot, config)
    fitted = _Fitted(snapshot, config, splits.train[0])
    validation = _rows(snapshot, rules, fitted, splits, config, stages, "validation")
    test = _rows(snapshot, rules, fitted, splits, config, stages, "test")
    with stages.stage("evaluate"):
        scores = raw_scores(booster, test, config.n_jobs)
        metrics = evaluate_rows(
            test,
            scores,
            calibrators,
            config,
            snapshot,
            validation=validation,
            default_values=default_values,
        )
        ids = snapshot.customers.values
        served = served_per_customer(test, scores, calibrators, default_values, config, ids)
    return Evaluation(metrics, served)


def model_scorer(
    booster: lgb.Booster,
    calibrators: dict[str, Calibrator],
    builder: FeatureBuilder,
    config: TrainConfig,
    default_values: dict[str, float],
) -> Callable[..., np.ndarray]:
    """Rows → arbitration score (P(accept) × value × lever), as serving ranks."""

    def score(
        snapshot: Snapshot, requests: Any, rows: np.ndarray, offers: np.ndarray
    ) -> np.ndarray:
        matrix = builder.build(snapshot, requests, rows, offers)
        raw = np.asarray(booster.predict(matrix.values, num_threads=config.n_jobs))
        score, _ = rank_scores(
            raw,
            row_tasks(snapshot.offer_kind[offers], matrix.columns()[REPEAT_FEATURE]),
            snapshot.offer_value[offers],
            snapshot.offer_lever[offers],
            calibrators,
            default_values,
            config.lever_cap,
            config.value_cap,
        )
        return score

    return score
