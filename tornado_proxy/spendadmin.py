"""LiteLLM's spend endpoints: ``GET /spend/logs`` (the spend log's rows, filtered) and
``GET /global/spend/report`` (spend per day, grouped by team, customer, key or model). Admin
only (the master key or a ``proxy_admin`` user's key); they read PostgreSQL, never the request
path's memory. Keys appear only as their SHA-256 hash."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .errors import InvalidRequestError
from .keyadmin import TenantAdminHandler
from .keystore import now, token_of

MAX_LOG_ROWS = 10_000
DEFAULT_LOG_ROWS = 1000
REPORT_DAYS = 30
# group_by -> (spend-log column, the answer's list name, its entries' name field)
GROUPS = {"team": ("team_id", "teams", "team_name"), "customer": ("end_user", "customers", "customer"),
          "model": ("model_group", "models", "model")}


def parse_date(text: str | None, name: str, end: bool = False) -> dt.datetime | None:
    """``YYYY-MM-DD`` (a whole day: an end date includes it) or an ISO 8601 time (UTC if no zone)."""
    if not text:
        return None
    try:
        if len(text) == 10:
            day = dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), dt.timezone.utc)
            return day + dt.timedelta(days=1) if end else day
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequestError(f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 time, got {text!r}.",
                                  param=name) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


class SpendLogsHandler(TenantAdminHandler):
    """``GET /spend/logs?api_key=&user_id=&team_id=&request_id=&start_date=&end_date=``: rows,
    newest first (at most ``limit``, default 1000)."""

    async def read(self) -> list[dict]:
        where: dict[str, Any] = {}
        if self.arg("api_key"):
            where["api_key"] = token_of(self.arg("api_key"))
        for param, column in (("user_id", "user"), ("team_id", "team_id"), ("request_id", "request_id")):
            if self.arg(param):
                where[column] = self.arg(param)
        try:
            limit = min(max(int(self.arg("limit", str(DEFAULT_LOG_ROWS))), 1), MAX_LOG_ROWS)
        except ValueError:
            raise InvalidRequestError("limit must be a whole number.", param="limit") from None
        start = parse_date(self.arg("start_date"), "start_date")
        end = parse_date(self.arg("end_date"), "end_date", end=True)
        return await self.spend_store.logs(where, start, end, limit)

    @property
    def spend_store(self):
        self.store  # noqa: B018 - the 400 without database storage
        return self.gw.spend_store


class GlobalSpendReportHandler(SpendLogsHandler):
    """``GET /global/spend/report?start_date=&end_date=&group_by=team|customer|model|api_key``
    (default ``team``, the last 30 days), or ``api_key=`` / ``internal_user_id=`` for one key's
    or one user's keys' spend per model: LiteLLM's two answer shapes."""

    async def read(self) -> list[dict]:
        end = parse_date(self.arg("end_date"), "end_date", end=True) or now()
        start = parse_date(self.arg("start_date"), "start_date") or end - dt.timedelta(days=REPORT_DAYS)
        group = self.arg("group_by") or "team"
        where: dict[str, Any] = {}
        if self.arg("api_key"):
            where["api_key"] = token_of(self.arg("api_key"))
        if self.arg("internal_user_id"):
            where["user"] = self.arg("internal_user_id")
        if self.arg("team_id"):
            where["team_id"] = self.arg("team_id")
        if group == "api_key" or "api_key" in where or "user" in where:
            rows = await self.spend_store.report("api_key", start, end, where)
            return per_key(rows)
        if group not in GROUPS:
            raise InvalidRequestError("group_by must be one of team, customer, api_key, model.", param="group_by")
        column, plural, name_field = GROUPS[group]
        rows = await self.spend_store.report(f'"{column}"', start, end, where)
        names = {t: (r.team_alias or t) for t, r in self.gw.tenants.teams.items()} if group == "team" else {}
        return by_day(rows, plural, name_field, names, "Unassigned Team" if group == "team" else None)


def by_day(rows: list[tuple], plural: str, name_field: str, names: dict, unassigned: str | None) -> list[dict]:
    days: dict[Any, dict[Any, dict]] = {}
    for day, grp, model, api_key, spend, total, _prompt, _completion in rows:
        entry = days.setdefault(day, {}).setdefault(grp, {"total_spend": 0.0, "metadata": []})
        entry["total_spend"] += spend
        entry["metadata"].append({"model": model, "spend": spend, "total_tokens": int(total), "api_key": api_key})
    out = []
    for day, groups in days.items():
        entries = [{name_field: names.get(grp, grp) if grp is not None else unassigned, **entry}
                   for grp, entry in groups.items()]
        out.append({"group_by_day": day.replace(tzinfo=dt.timezone.utc).isoformat(), plural: entries})
    return out


def per_key(rows: list[tuple]) -> list[dict]:
    keys: dict[str, dict] = {}
    for _day, _grp, model, api_key, spend, _total, prompt, completion in rows:
        entry = keys.setdefault(api_key, {"api_key": api_key, "total_cost": 0.0, "total_input_tokens": 0,
                                          "total_output_tokens": 0, "model_details": {}})
        entry["total_cost"] += spend
        entry["total_input_tokens"] += int(prompt)
        entry["total_output_tokens"] += int(completion)
        detail = entry["model_details"].setdefault(model, {"model": model, "total_cost": 0.0,
                                                           "total_input_tokens": 0, "total_output_tokens": 0})
        detail["total_cost"] += spend
        detail["total_input_tokens"] += int(prompt)
        detail["total_output_tokens"] += int(completion)
    return [{**e, "model_details": list(e["model_details"].values())} for e in keys.values()]


HANDLERS = {
    "spend_logs": SpendLogsHandler,
    "global_spend_report": GlobalSpendReportHandler,
}
