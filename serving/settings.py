"""How serving decides: every setting the service, the CLI, batch scoring, the review gate
and the benchmark read, in one place. No BentoML here: the CLI and Dask workers import it.

Settings come from :meth:`ServingSettings.from_env` (``nextbest serve`` sets the
environment for its workers), or are built directly in code and tests. Every field has a
safe default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from policy.exploration import METHODS, Exploration, Method
from runtime.registry import CHAMPION

__all__ = ["ServingSettings"]

HoldoutControl = Literal["nothing", "rules_only"]


@dataclass(frozen=True)
class ServingSettings:
    """What a recommender needs to know besides its data and model.

    * ``clock``: ``data`` (the workspace's last event: replaying a past dataset, time
      stands still), ``now`` (the wall clock) or an ISO time.
    * holdout: a sticky ``holdout_share`` of customers (hash of id and ``holdout_salt``)
      gets ``holdout_control``; ``offer_holdout_share`` holds out (customer, offer) pairs.
    * ``alias``: the registered model alias to serve; ``rules_path`` overrides the
      version's own rules file.
    * the storefront API: ``api_keys`` (none: the API is open; else every data endpoint
      needs one of them), ``max_body_bytes`` (a larger body is a 413, refused before it is
      read whole) and ``as_of_margin_days`` (how far past the data's end, or the clock's
      now, an ``as_of`` may go).
    * ``refusals_per_s``: how many requests a second one client address may have refused
      (a 400, 401, 413 or 415) at once; beyond it (a bucket of one second's worth), each
      refusal is answered after the wait its turn needs, at most a second, and not logged
      one by one: a client looping on bad requests is slowed to this rate instead of
      taking the worker from everyone else. 0 turns it off. Valid requests are never
      delayed.
    * ``max_batch``: how many waiting ``/recommend`` requests (same parameters, distinct
      customers) the present's thread may serve in one call when they queued while it
      was busy (``serving.coalesce``); 1 serves every request alone.
    * ``budget_ms``: the latency budget of one customer's slate, in milliseconds, checked
      once, before the explanation. A request for the present has it from when its
      handler queued it for the present's thread (its body read and validated): the time
      it waited there (behind other requests, or a queue under overload; behind the
      present's builder refitted after a switch, once) counts, then the recommender's own
      work after its feature builder is ready; requests served together each have their
      own. A replay of the past (``as_of``) has it for its own work, not counting a builder
      fit; a call of its own for n customers (a campaign's chunk) has n times it for its
      work. When it is used up, the ranked slate
      is served at once with a short, true because (a stated fact, as the rules-only
      ranking says it) instead of the SHAP explanation, and the answer says
      ``"budget_exceeded": true``: under overload the explanation's work is shed before
      any request is.
    * exploration (:mod:`policy.exploration`): ``exploration`` is ``off`` (the default:
      the arbitration's best slate, logged as deterministic), ``epsilon`` or ``softmax``;
      ``exploration_rates`` is the rate per channel (``*``: every channel not named; a
      channel with no rate is not explored) and ``exploration_temperature`` the
      softmax's temperature, in the arbitration score's units. Only logged requests are
      explored (never a review's preview, which logs nothing), and never a holdout's
      slate.
    * ``request_seed`` (``NEXTBEST_REQUEST_SEED``; for simulations and tests only): request
      ids are derived from it, the customer, the moment, the channel, the placement and
      how many such requests this process served before, instead of drawn at random; a
      simulated run, whose exploration is seeded by the request id, then replays exactly.
      Never in production: such ids can be guessed.

    The salt and the keys are secrets: they are left out of the settings' ``repr``, so a
    logged settings object never shows them.
    """

    workspace: Path | None = None
    db_url: str | None = None
    clock: str = "data"
    holdout_share: float = 0.05
    holdout_salt: str = field(default="nextbest-holdout-1", repr=False)
    holdout_control: HoldoutControl = "nothing"
    offer_holdout_share: float = 0.0
    alias: str = CHAMPION
    rules_path: Path | None = None
    max_candidates: int = 200
    max_batch: int = 8
    reload_seconds: float = 5.0
    review_threshold: float = 0.2
    secure_cookies: bool = False
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 64 * 1024
    as_of_margin_days: int = 30
    budget_ms: float = 150.0
    refusals_per_s: int = 50
    exploration: Method = "off"
    exploration_rates: tuple[tuple[str, float], ...] = ()
    exploration_temperature: float = 1.0
    request_seed: str | None = field(default=None, repr=False)

    def exploration_for(self, channel: str) -> Exploration:
        """How a logged, non-holdout request on ``channel`` is drawn."""
        rates = dict(self.exploration_rates)
        rate = rates.get(channel, rates.get("*", 0.0))
        if self.exploration == "off" or rate <= 0:
            return Exploration()
        return Exploration(self.exploration, rate, self.exploration_temperature)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """``NEXTBEST_WORKSPACE``, ``NEXTBEST_DB_URL``, ``NEXTBEST_CLOCK``,
        ``NEXTBEST_HOLDOUT_SHARE``, ``NEXTBEST_HOLDOUT_SALT``, ``NEXTBEST_HOLDOUT_CONTROL``,
        ``NEXTBEST_OFFER_HOLDOUT_SHARE``, ``NEXTBEST_MODEL_ALIAS``, ``NEXTBEST_RULES``,
        ``NEXTBEST_RELOAD_SECONDS``, ``NEXTBEST_REVIEW_THRESHOLD``,
        ``NEXTBEST_SECURE_COOKIES``, ``NEXTBEST_API_KEYS`` (comma-separated),
        ``NEXTBEST_MAX_BATCH``, ``NEXTBEST_MAX_BODY_BYTES``, ``NEXTBEST_AS_OF_MARGIN_DAYS``,
        ``NEXTBEST_BUDGET_MS``, ``NEXTBEST_REFUSALS_PER_S``, ``NEXTBEST_EXPLORATION``
        (off, epsilon or softmax), ``NEXTBEST_EXPLORATION_RATES`` (one rate for every
        channel, ``0.1``, or per channel, ``web=0.1,email=0.05,*=0.02``),
        ``NEXTBEST_EXPLORATION_TEMPERATURE``; unset means the default."""
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            workspace=Path(env["NEXTBEST_WORKSPACE"]) if env.get("NEXTBEST_WORKSPACE") else None,
            db_url=env.get("NEXTBEST_DB_URL") or None,
            clock=env.get("NEXTBEST_CLOCK", default.clock),
            holdout_share=_share(env, "NEXTBEST_HOLDOUT_SHARE", default.holdout_share),
            holdout_salt=env.get("NEXTBEST_HOLDOUT_SALT", default.holdout_salt),
            holdout_control=_control(env.get("NEXTBEST_HOLDOUT_CONTROL", "nothing")),
            offer_holdout_share=_share(
                env, "NEXTBEST_OFFER_HOLDOUT_SHARE", default.offer_holdout_share
            ),
            alias=env.get("NEXTBEST_MODEL_ALIAS", default.alias),
            rules_path=Path(env["NEXTBEST_RULES"]) if env.get("NEXTBEST_RULES") else None,
            max_batch=_whole(env, "NEXTBEST_MAX_BATCH", default.max_batch),
            reload_seconds=float(env.get("NEXTBEST_RELOAD_SECONDS", default.reload_seconds)),
            review_threshold=_threshold(env.get("NEXTBEST_REVIEW_THRESHOLD", "0.2")),
            secure_cookies=env.get("NEXTBEST_SECURE_COOKIES", "").lower() in ("1", "true", "yes"),
            api_keys=tuple(
                k.strip() for k in env.get("NEXTBEST_API_KEYS", "").split(",") if k.strip()
            ),
            max_body_bytes=_whole(env, "NEXTBEST_MAX_BODY_BYTES", default.max_body_bytes),
            as_of_margin_days=_whole(env, "NEXTBEST_AS_OF_MARGIN_DAYS", default.as_of_margin_days),
            budget_ms=float(_whole(env, "NEXTBEST_BUDGET_MS", int(default.budget_ms))),
            refusals_per_s=_whole(env, "NEXTBEST_REFUSALS_PER_S", default.refusals_per_s, least=0),
            exploration=_method(env.get("NEXTBEST_EXPLORATION") or default.exploration),
            exploration_rates=_rates(env.get("NEXTBEST_EXPLORATION_RATES", "")),
            exploration_temperature=_temperature(env.get("NEXTBEST_EXPLORATION_TEMPERATURE")),
            request_seed=env.get("NEXTBEST_REQUEST_SEED") or None,
        )

    def ledger_url(self, data_dir: Path) -> str:
        """The ledger database: ``db_url``, else SQLite in the data folder."""
        return self.db_url or f"sqlite:///{data_dir / 'ledger.db'}"


def _share(env: Mapping[str, str], name: str, default: float, said: str | None = None) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    share = float(raw)
    if not 0 <= share <= 1:
        raise ValueError(f"{said or name} must be in [0, 1], not {raw!r}")
    return share


def _whole(env: Mapping[str, str], name: str, default: int, least: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, not {raw!r}")
    return int(raw)


def _threshold(value: str) -> float:
    share = float(value)
    if not 0 < share <= 1:
        raise ValueError(f"NEXTBEST_REVIEW_THRESHOLD must be in (0, 1], not {value!r}")
    return share


def _control(value: str) -> HoldoutControl:
    if value == "nothing":
        return "nothing"
    if value == "rules_only":
        return "rules_only"
    raise ValueError(f"NEXTBEST_HOLDOUT_CONTROL must be 'nothing' or 'rules_only', not {value!r}")


def _method(value: str) -> Method:
    for method in METHODS:
        if value == method:
            return method
    raise ValueError(f"NEXTBEST_EXPLORATION must be one of {', '.join(METHODS)}, not {value!r}")


def _rates(value: str) -> tuple[tuple[str, float], ...]:
    """``0.1`` (every channel) or ``web=0.1,email=0.05`` (``*``: the other channels)."""
    rates = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        channel, _, raw = part.rpartition("=")
        rate = _share({"rate": raw}, "rate", 0.0, "NEXTBEST_EXPLORATION_RATES")
        rates.append((channel.strip() or "*", rate))
    return tuple(rates)


def _temperature(value: str | None) -> float:
    if value is None or value == "":
        return 1.0
    temperature = float(value)
    if not temperature > 0:
        raise ValueError(f"NEXTBEST_EXPLORATION_TEMPERATURE must be above 0, not {value!r}")
    return temperature
