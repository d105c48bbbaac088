"""Point-in-time lookups over event histories, vectorised with ``searchsorted``.

A :class:`TimeIndex` holds events sorted by (group, time) for integer group codes. Every
query asks about one group strictly before one time, so that answering "how many, how
much, how long ago" for a million (customer, offer, as_of) rows is a handful of binary
searches and cumulative sums, and answering it for one customer at request time is the
very same code on a shorter query array.

Times are integer seconds. An event counts for ``as_of`` only if ``time < as_of``; query
times are rounded *up* to the second so that sub-second request times stay strict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["EPOCH", "TimeIndex", "second_ceil", "to_seconds", "to_seconds_ceil"]

EPOCH = np.datetime64("1970-01-01T00:00:00", "us")
_GROUP_STRIDE = np.int64(1) << np.int64(33)  # 272 years of seconds between groups
_NONE = np.int64(-1)


def to_seconds(times: pd.Series | np.ndarray) -> np.ndarray:
    """Event times (datetime64) as int64 seconds, floored."""
    values = np.asarray(times, dtype="datetime64[us]")
    return ((values - EPOCH) // np.timedelta64(1, "s")).astype(np.int64)


def to_seconds_ceil(times: pd.Series | np.ndarray) -> np.ndarray:
    """Query times (datetime64) as int64 seconds, rounded up: 'strictly before' stays strict."""
    values = np.asarray(times, dtype="datetime64[us]")
    micros = (values - EPOCH) // np.timedelta64(1, "us")
    return (-(-micros // 1_000_000)).astype(np.int64)


def second_ceil(moment: Any) -> int:
    """One moment (anything ``pd.Timestamp`` reads) as int seconds, rounded up."""
    return int(to_seconds_ceil(np.array([pd.Timestamp(moment)]))[0])


@dataclass(frozen=True)
class TimeIndex:
    """Events of many groups, sorted by (group, time), with cumulative sums of values.

    ``keys`` = group × stride + seconds (sorted); ``cumulative`` holds running totals of
    each value column with a leading zero, so a window sum is two lookups.
    """

    keys: np.ndarray
    groups: np.ndarray
    seconds: np.ndarray
    cumulative: dict[str, np.ndarray]
    payload: dict[str, np.ndarray]

    @classmethod
    def build(
        cls,
        groups: np.ndarray,
        seconds: np.ndarray,
        values: dict[str, np.ndarray] | None = None,
        payload: dict[str, np.ndarray] | None = None,
    ) -> TimeIndex:
        """Index events by group code (int ≥ 0) and time; ``values`` get cumulative sums and
        ``payload`` columns are carried along (for "which one was it" lookups)."""
        groups = np.asarray(groups, dtype=np.int64)
        seconds = np.asarray(seconds, dtype=np.int64)
        keys = groups * _GROUP_STRIDE + seconds
        order = np.argsort(keys, kind="stable")
        cumulative = {}
        for name, column in (values or {}).items():
            sorted_values = np.asarray(column, dtype=np.float64)[order]
            cumulative[name] = np.concatenate(([0.0], np.cumsum(sorted_values)))
        return cls(
            keys=keys[order],
            groups=groups[order],
            seconds=seconds[order],
            cumulative=cumulative,
            payload={name: np.asarray(col)[order] for name, col in (payload or {}).items()},
        )

    def __len__(self) -> int:
        return len(self.keys)

    def position(self, groups: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        """For each query, the index of the first event of its group at or after ``seconds``:
        the events strictly before are ``[group_start, position)``."""
        query = np.asarray(groups, dtype=np.int64) * _GROUP_STRIDE + np.asarray(
            seconds, dtype=np.int64
        )
        return np.searchsorted(self.keys, query, side="left")

    def group_start(self, groups: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.keys, np.asarray(groups, dtype=np.int64) * _GROUP_STRIDE)

    def count(self, groups: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Events of each group with ``start <= time < end``."""
        return self.position(groups, end) - self.position(groups, start)

    def total(
        self, name: str, groups: np.ndarray, start: np.ndarray, end: np.ndarray
    ) -> np.ndarray:
        """Sum of value ``name`` over events of each group with ``start <= time < end``."""
        cumulative = self.cumulative[name]
        return cumulative[self.position(groups, end)] - cumulative[self.position(groups, start)]

    def last_before(self, groups: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        """Index of each group's last event strictly before ``seconds``, or -1 if none."""
        groups = np.asarray(groups, dtype=np.int64)
        index = self.position(groups, seconds) - 1
        valid = index >= 0
        valid[valid] &= self.groups[index[valid]] == groups[valid]
        return np.where(valid, index, _NONE)

    def first_of_group(self, groups: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        """Index of each group's first event if it is strictly before ``seconds``, else -1."""
        groups = np.asarray(groups, dtype=np.int64)
        index = self.group_start(groups)
        valid = index < len(self.keys)
        valid[valid] &= (self.groups[index[valid]] == groups[valid]) & (
            self.seconds[index[valid]] < np.asarray(seconds)[valid]
        )
        return np.where(valid, index, _NONE)

    def seconds_at(self, index: np.ndarray) -> np.ndarray:
        """Event time (seconds) at each index, NaN where the index is -1."""
        out = np.full(len(index), np.nan)
        hit = index >= 0
        out[hit] = self.seconds[index[hit]]
        return out

    def payload_at(self, name: str, index: np.ndarray, missing: float = np.nan) -> np.ndarray:
        column = self.payload[name]
        out = np.full(len(index), missing, dtype=np.float64)
        hit = index >= 0
        out[hit] = column[index[hit]]
        return out
