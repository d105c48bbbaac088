"""What a run shows a person: plots and a model card (files written to a folder)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from features import FEATURES
from policy.fairness import FairnessReport
from training.dataset import TASKS, RowSet

__all__ = ["metrics_table", "model_card", "write_plots"]

SHAP_SAMPLE = 1000


def write_plots(
    booster: Any,
    validation: RowSet,
    test: RowSet,
    test_scores: np.ndarray,
    probability: np.ndarray,
    folder: Path,
    seed: int,
) -> list[Path]:
    """SHAP beeswarm (validation sample), feature importance, lift and gain by decile,
    and the calibration curve. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shap

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(validation), size=min(SHAP_SAMPLE, len(validation)), replace=False)
    data = validation.values[np.sort(sample)]
    contributions = booster.predict(data, pred_contrib=True)
    explanation = shap.Explanation(
        values=contributions[:, :-1],
        base_values=contributions[:, -1],
        data=data,
        feature_names=validation.names,
    )
    plt.figure()
    with warnings.catch_warnings():
        # features that are empty in this data (all NaN) have no colour scale; shap warns
        warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
        shap.plots.beeswarm(explanation, max_display=20, show=False)
    plt.title("SHAP values, validation sample")
    written.append(_save(plt, folder / "shap_beeswarm.png"))

    gain = booster.feature_importance(importance_type="gain")
    order = np.argsort(gain)[-20:]
    _, ax = plt.subplots(figsize=(7, 6))
    ax.barh(np.asarray(validation.names)[order], gain[order])
    ax.set_title("Feature importance (total gain)")
    written.append(_save(plt, folder / "feature_importance.png"))

    _, axes = plt.subplots(1, 2, figsize=(11, 4))
    for code, task in enumerate(TASKS):
        mine = test.task == code
        if not mine.any() or not test.label[mine].any():
            continue
        lift, cumulative = _deciles(test_scores[mine], test.label[mine])
        axes[0].plot(range(1, 11), lift, marker="o", label=task)
        axes[1].plot(range(0, 11), np.r_[0, cumulative], marker="o", label=task)
    axes[0].axhline(1, color="grey", lw=0.8)
    axes[0].set(title="Lift by score decile (test)", xlabel="decile (1 = top)", ylabel="lift")
    axes[1].plot([0, 10], [0, 1], color="grey", lw=0.8)
    axes[1].set(title="Cumulative gain (test)", xlabel="deciles", ylabel="share of positives")
    axes[0].legend()
    written.append(_save(plt, folder / "lift_gain_by_decile.png"))

    _, ax = plt.subplots(figsize=(5, 5))
    for code, task in enumerate(TASKS):
        mine = test.task == code
        if not mine.any():
            continue
        predicted, observed = _calibration(probability[mine], test.label[mine])
        ax.plot(predicted, observed, marker="o", label=task)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    top = max(0.05, float(np.quantile(probability, 0.999)) if len(probability) else 0.05)
    ax.set(
        xlim=(0, top),
        ylim=(0, top),
        title="Calibration (test)",
        xlabel="predicted P(accept)",
        ylabel="observed rate",
    )
    ax.legend()
    written.append(_save(plt, folder / "calibration_curve.png"))
    return written


def _save(plt: Any, path: Path) -> Path:
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close("all")
    return path


def _deciles(scores: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    chunks = np.array_split(label[order], 10)
    rate = label.mean()
    lift = np.array([chunk.mean() / rate if len(chunk) else 0 for chunk in chunks])
    cumulative = np.cumsum([chunk.sum() for chunk in chunks]) / max(label.sum(), 1)
    return lift, cumulative


def _calibration(probability: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(probability, kind="stable")
    bins = np.array_split(order, 10)
    return (
        np.array([probability[b].mean() for b in bins if len(b)]),
        np.array([label[b].mean() for b in bins if len(b)]),
    )


def model_card(
    *,
    name: str,
    version: str | None,
    run_id: str,
    fingerprint: str,
    workspace: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, Any],
    splits: dict[str, list[str]],
    rules_hash: str,
    rows: dict[str, int],
    trees: int,
    timings: dict[str, float],
    fairness: FairnessReport | None = None,
) -> str:
    """A markdown model card: what it is, what it was trained on, how it did, its
    fairness, its limits."""
    lines = [
        f"# {name}{f' v{version}' if version else ''}",
        "",
        "LightGBM lambdarank over eligible candidates, one group per (opportunity, task); "
        "isotonic calibration per task on validation; arbitration = P(accept) × value × lever.",
        "",
        "## Data",
        f"- workspace: {workspace.get('dataset') or workspace.get('name')} "
        f"(fingerprint `{fingerprint}`)",
        f"- buckets: train {splits['train'][0]} → {splits['train'][-1]} "
        f"({len(splits['train'])}), validation {len(splits['validation'])}, "
        f"test {splits['test'][0]} → {splits['test'][-1]} ({len(splits['test'])})",
        f"- rows: {rows}",
        f"- rules: `{rules_hash}`; run `{run_id}`; {trees} trees",
        "",
        "## Results on the test buckets, per task (NDCG@10; baselines chosen on validation)",
        "",
        "| task | model | best baseline | margin [95 % CI] | recall@10 | Brier |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, report in metrics.items():
        if task not in TASKS:
            continue
        best = report["best_baseline"]
        margin = report["ndcg_at_10_margin"]
        lines.append(
            f"| {task} | {report['model']['ndcg_at_10']:.4f} | {best} "
            f"{report['baselines'][best]['ndcg_at_10']:.4f} | {margin['mean']:+.4f} "
            f"[{margin['ci95_low']:+.4f}, {margin['ci95_high']:+.4f}] | "
            f"{report['model']['recall_at_10']:.4f} | {report['model']['brier']:.5f} |"
        )
    served = metrics.get("served")
    if served:
        best = served["best_baseline"]
        margin = served["ndcg_at_10_margin"]
        verdict = "beats" if served["beats_best_baseline"] else "does NOT beat"
        lines += [
            "",
            "## The served slate (every task together, ranked as serving ranks)",
            "",
            f"- {served['opportunities']:,} test opportunities of {served['customers']:,} "
            "customers; a hit is any offer taken",
            f"- NDCG@10 {served['model']['ndcg_at_10']:.4f}, recall@10 "
            f"{served['model']['recall_at_10']:.4f}, hit rate@3 "
            f"{served['model']['hit_rate_at_3']:.4f}",
            f"- best baseline (chosen on validation): {best} NDCG@10 "
            f"{served['baselines'][best]['ndcg_at_10']:.4f}; margin {margin['mean']:+.4f} "
            f"[{margin['ci95_low']:+.4f}, {margin['ci95_high']:+.4f}] (customers resampled)",
            f"- this version {verdict} its best baseline",
        ]
    off_policy = metrics.get("off_policy", {})
    if off_policy.get("available"):
        lines += ["", "## Off-policy value (accepted offers per request, test period)", ""]
        for key in ("logging_policy", "ips", "snips"):
            v = off_policy[key]
            lines.append(
                f"- {key}: {v['estimate']:.4f} [{v['ci95_low']:.4f}, {v['ci95_high']:.4f}]"
            )
    elif off_policy:
        lines += ["", f"Off-policy value: not available ({off_policy.get('reason')})."]
    lines += [
        "",
        "## Fairness (the served test slates, per group of the rules' attributes)",
        "",
        *(
            fairness.summary()
            if fairness is not None
            else ["Not judged: this run served no test slates."]
        ),
    ]
    lines += [
        "",
        "## Features",
        "",
        *[f"- `{spec.name}` ({spec.family}): {spec.description}" for spec in FEATURES],
        "",
        "## Configuration",
        "",
        "```",
        *[f"{key}: {value}" for key, value in config.items()],
        "```",
        "",
        "## Limits",
        "- Trained on observational data: offers the old policy never showed are ranked "
        "by what similar customers bought, not by measured response.",
        "- The demo has no browse, support, usage or consent data: those features are flat.",
        "- A person reviews the top recommendations before this version becomes champion.",
        "",
        "## Stage timings (s)",
        "",
        *[f"- {stage}: {seconds}" for stage, seconds in timings.items()],
    ]
    return "\n".join(lines) + "\n"


def metrics_table(metrics: dict[str, Any], metric: str = "ndcg_at_10") -> Any:
    """Model against every baseline, per task, for one metric (a pandas DataFrame)."""
    import pandas as pd

    rows = {}
    for task, report in metrics.items():
        if task not in TASKS:
            continue
        rows[task] = {"model": report["model"][metric]} | {
            name: values[metric] for name, values in report["baselines"].items()
        }
    return pd.DataFrame(rows).T
