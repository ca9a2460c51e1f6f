"""Who is calling: an authenticated key, its team, and the limits that apply to them.

The gateway resolves a request's `Authorization` (or `x-api-key`) to a
`Caller` before anything is journaled; with `auth = "none"` there is none.
Everything downstream (attribution, rate limits, budgets) reads this one
shape, never the key table.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

BudgetPeriod = Literal["day", "week", "month"]


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's or a team's limits; None means no limit of that kind.

    Rates are per minute; a burst is how many may be taken at once (the
    bucket's size), the rate when unset. A budget is spend per period, in the
    price table's currency.
    """

    rpm: int | None = None
    rpm_burst: int | None = None
    tpm: int | None = None
    tpm_burst: int | None = None
    budget: float | None = None
    budget_period: BudgetPeriod | None = None


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request's key and team; never holds the secret."""

    key_id: uuid.UUID
    key_name: str
    team_id: uuid.UUID | None = None
    team_name: str | None = None
    models: frozenset[str] | None = None  # the models the key may use; None: all
    key_limits: Limits = field(default_factory=Limits)
    team_limits: Limits = field(default_factory=Limits)
