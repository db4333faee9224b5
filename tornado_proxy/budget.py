"""Budgets: the check made before any provider call (the key's, team's and user's
``max_budget``, the key's per-model ``model_max_budget``), the ``soft_budget`` warning, and the
periodic ``budget_duration`` reset.

The check reads this worker's memory only: its own spend is added there as each request ends,
other workers' and instances' with the periodic re-read. Requests already running when a budget
is reached still finish (their cost is known only at the end), so a budget is overshot by at
most the requests in flight at that moment."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import DatabaseUnavailable, ProxyError
from .tasks import Timer

if TYPE_CHECKING:
    from .auth import Principal
    from .spendstore import SpendStore

log = logging.getLogger(__name__)


class BudgetExceededError(ProxyError):
    """LiteLLM's ``budget_exceeded`` (422 in LiteLLM 1.108, or general_settings.budget_exceeded_status_code)."""

    status = 422
    type = "budget_exceeded"


def exceeded(message: str, status: int) -> BudgetExceededError:
    return BudgetExceededError(message, status=status)


def model_limit(value: Any) -> float | None:
    """A ``model_max_budget`` entry: ``{"budget_limit": 10.0, "time_period": "1d"}`` (LiteLLM) or a number."""
    if isinstance(value, dict):
        value = value.get("budget_limit", value.get("max_budget"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def check_budgets(principal: Principal | None, model: str, status: int) -> None:
    """Refuse (before any provider call) when the key, its team or its user has spent its
    ``max_budget``, or the key its ``model_max_budget`` for ``model``."""
    if principal is None or principal.key is None:
        return
    key, team, user = principal.key, principal.team, principal.user
    if key.max_budget is not None and key.spend >= key.max_budget:
        name = key.key_alias or key.key_name
        raise exceeded(f"Budget has been exceeded! Key={name} ({key.key_name}) Current cost: {key.spend}, "
                       f"Max budget: {key.max_budget}", status)
    limit = model_limit((key.model_max_budget or {}).get(model))
    if limit is not None:
        spent = (key.model_spend or {}).get(model, 0.0)
        if spent >= limit:
            raise exceeded(f"Budget has been exceeded! Key={key.key_alias or key.key_name} ({key.key_name}) "
                           f"model={model} Current cost: {spent}, Max budget: {limit}", status)
    if team is not None and team.max_budget is not None and team.spend >= team.max_budget:
        raise exceeded(f"Budget has been exceeded! Team={team.team_id} Current cost: {team.spend}, "
                       f"Max budget: {team.max_budget}", status)
    if user is not None and user.max_budget is not None and user.spend >= user.max_budget:
        raise exceeded(f"Budget has been exceeded! User={user.user_id} Current cost: {user.spend}, "
                       f"Max budget: {user.max_budget}", status)


def budget_used_up(records: list, cost: float) -> bool:
    """Whether this call's ``cost`` has just taken one of these records to its ``max_budget``."""
    return any(r.max_budget is not None and r.spend - cost < r.max_budget <= r.spend for r in records)


def soft_budget_crossings(records: list, cost: float) -> list[tuple[str, str, float, float]]:
    """(kind, id, spend, soft_budget) for each record whose spend has just reached its soft budget."""
    out = []
    for record in records:
        soft = record.soft_budget
        if soft is None or not record.spend - cost < soft <= record.spend:
            continue
        if hasattr(record, "token"):
            out.append(("key", record.key_alias or record.key_name, record.spend, soft))
        elif hasattr(record, "team_alias"):
            out.append(("team", record.team_id, record.spend, soft))
        else:
            out.append(("user", record.user_id, record.spend, soft))
    return out


class BudgetReset(Timer):
    """Every ``interval`` seconds, resets the budgets that are due. Every worker runs the
    timer; a PostgreSQL advisory lock makes one of them (of all instances) do the work."""

    def __init__(self, store: SpendStore | None, interval: float):
        self.store = store
        self.interval = interval

    def start(self) -> None:
        if self.store is not None:
            self.start_rounds()

    def delay(self, first: bool) -> float:
        return self.interval

    async def round(self) -> None:
        try:
            reset = await self.store.reset_budgets()
        except DatabaseUnavailable:
            return
        except Exception:  # e.g. not migrated yet: try again next time
            log.exception("budget reset")
            return
        for table, ids in (reset or {}).items():
            log.info("budget reset: spend set to 0 for %d row(s) of %s", len(ids), table)
