"""The console's pages as HTML strings, from what the store and the daemon report."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from llmsvc.admin.console.charts import usage_charts
from llmsvc.admin.console.html import BASE, button_form, cost, e, millis, page, pretty, table, when
from llmsvc.admin.console.timeline import timeline_svg
from llmsvc.store.attribution import BUCKETS, SPEND_BY
from llmsvc.store.keys import utc
from llmsvc.store.queries import RequestDetail, stopped
from llmsvc.store.search import Searched

FILTERS = (
    *("status", "model", "provider", "key", "team", "user", "metadata", "correlation_id"),
    *("since", "until", "text"),
)
HINTS = {
    "since": "24h, 7d or ISO",
    "until": "24h, 7d or ISO",
    "metadata": "key:value",
    "text": "in the reply",
}
STATUSES = ("", "streaming", "completed", "failed", "interrupted")  # wal.records.Status


def login(message: str = "") -> str:
    shown = f'<p class="error">{e(message)}</p>' if message else ""
    return page(
        "Log in",
        f'{shown}<form method="post" action="{BASE}login" class="login">'
        '<label>Admin token <input type="password" name="token" autocomplete="off" '
        'autofocus required></label> <button type="submit">Log in</button></form>',
    )


def error(status: int, message: str, csrf: str | None) -> str:
    return page(f"Error {status}", f'<p class="error">{e(message)}</p>', csrf)


def requests(
    rows: list[dict[str, Any]],
    given: dict[str, str],
    older: str | None,
    searched: Searched | None,
    csrf: str,
) -> str:
    """The list, its filter form (as given) and a link to the next, older page; after a
    search of replies that ended before a full page, how far it read."""
    fields = []
    for name in FILTERS:
        value = given.get(name, "")
        if name == "status":
            options = "".join(
                f'<option value="{s}"{" selected" if s == value else ""}>{s or "any"}</option>'
                for s in STATUSES
            )
            fields.append(f'<label>status <select name="status">{options}</select></label>')
        else:
            shown = f' placeholder="{HINTS[name]}"' if name in HINTS else ""
            fields.append(
                f"<label>{name.replace('_', ' ')} "
                f'<input name="{name}" value="{e(value)}"{shown}></label>'
            )
    form = (
        f'<form method="get" action="{BASE}requests" class="filters">{"".join(fields)}'
        f'<button type="submit">Filter</button> <a href="{BASE}requests">clear</a></form>'
    )
    body = [
        [
            f'<a href="{BASE}requests/{r["id"]}">{e(when(r["created_at"]))}</a>',
            e(r["model"]),
            e(r["provider"]),
            f'<span class="status {e(r["status"])}">{e(r["status"])}</span>',
            e(_tokens(r)),
            e(cost(r["cost"])),
            e(millis(r["created_at"], r["ended_at"])),
            e(millis(r["created_at"], r["first_token_at"])),
            e(r["attempts"]),
        ]
        for r in rows
    ]
    headings = ["time (UTC)", "model", "provider", "status", "tokens", "cost", "latency"]
    listing = table([*headings, "TTFT", "attempts"], body, "requests")
    if not rows:
        listing = '<p class="empty">No requests match.</p>'
    more = ""
    if older is not None:
        query = urlencode({**{k: v for k, v in given.items() if v}, "before": older})
        label = "Older requests →" if searched is None else "Search older requests →"
        more = f'<p><a class="older" href="{BASE}requests?{e(query)}">{label}</a></p>'
    if searched is not None:
        more = _searched(searched, len(given) > 1) + more
    return page("Requests", form + listing + more, csrf)


def _searched(searched: Searched, filtered: bool) -> str:
    """How far a search of replies read, so that an empty page is not taken for "nowhere"."""
    which = " that the other filters let through" if filtered else ""
    read = f"{searched.requests:,} requests{which}"
    if searched.requests:
        read += f" (created {when(searched.newest)} down to {when(searched.oldest)} UTC)"
    if searched.resume is None:
        return f'<p class="searched">Searched the replies of all {read}.</p>'
    return f'<p class="searched">Searched the replies of {read}; older ones were not read.</p>'


def _tokens(row: dict[str, Any]) -> str:
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    if prompt is None and completion is None:
        return "" if row["deltas_stored"] is None else f"{row['deltas_stored']} stored"
    return f"{prompt or 0} + {completion or 0}"


def request(
    detail: RequestDetail,
    times: dict[Any, list[Any]],
    original: RequestDetail | None,
    routes: list[str],
    targets: list[tuple[str, bool]],
    csrf: str,
) -> str:
    """The prompt, the reply as stored, every attempt, and each attempt's token timeline;
    for a replay, its reply beside the original's; for a chat request, the replay form (to
    one of the `routes`, or pinned to one of the provider:model `targets`, each with whether
    its provider is disabled)."""
    r = detail.request
    facts = [
        ("id", r["id"]),
        ("correlation id", r["correlation_id"]),
        ("created", when(r["created_at"])),
        ("status", r["status"]),
        ("model", r["model"]),
        ("provider", r["provider"]),
        ("api", r["api"] or "chat"),
        ("stream", r["stream"]),
        ("tokens", f"{r['prompt_tokens']} prompt + {r['completion_tokens']} completion"),
        ("cost", cost(r["cost"])),
        ("latency", millis(r["created_at"], r["ended_at"])),
        ("user", r["end_user"]),
        ("metadata", r["metadata"]),
        ("error", r["error"]),
    ]
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts if v not in (None, ""))
    raw = f'<p><a href="{BASE}requests/{quote(str(r["id"]))}.json">raw JSON</a></p>'
    messages = "".join(
        f'<div class="message"><div class="role">{e(m.get("role"))}</div>'
        f"<pre>{pretty(m.get('content'))}</pre>"
        + (f"<pre>{pretty(m['tool_calls'])}</pre>" if m.get("tool_calls") else "")
        + "</div>"
        for m in (detail.request["messages"] or [])
        if isinstance(m, dict)
    )
    reply = _reply(detail)
    attempt_rows = [
        [
            e(a["attempt_no"]),
            e(a["provider"]),
            e(a["model"]),
            e(a["status"]),
            e(a["http_status"]),
            e(stopped(a)),
            e(" ".join(x for x in (a["error_code"], a["error_message"]) if x)),
            e(when(a["started_at"])),
            e(millis(r["created_at"], a["first_token_at"])),
            e(millis(a["started_at"], a["ended_at"])),
            e(len(times.get(a["id"], []))),
        ]
        for a in detail.attempts
    ]
    headings = ["#", "provider", "model", "status", "HTTP", "stop", "error", "started", "TTFT"]
    attempts = table([*headings, "duration", "tokens stored"], attempt_rows, "attempts")
    charts = (
        "".join(
            f"<figure><figcaption>Attempt {e(a['attempt_no'])} ({e(a['provider'])}): "
            f"{len(times[a['id']])} tokens</figcaption>"
            + timeline_svg(
                utc(r["created_at"]),
                [utc(t) for t in times[a["id"]]],
                f"token timeline of attempt {a['attempt_no']}",
            )
            + "</figure>"
            for a in detail.attempts
            if times.get(a["id"])
        )
        or '<p class="empty">No tokens stored.</p>'
    )
    if original is not None:
        o = original.request
        reply = (
            '<div class="compare"><div><h3>Original: '
            f'<a href="{BASE}requests/{o["id"]}">{e(o["model"])}</a></h3>{_reply(original)}</div>'
            f"<div><h3>Replay: {e(r['model'])} on {e(r['provider'])}</h3>{reply}</div></div>"
        )
    replay = ""
    if (r["api"] or "chat") == "chat":
        replay = (
            f'<h2>Replay</h2><form method="post" action="{BASE}requests/{r["id"]}/replay" '
            f'class="filters replay"><input type="hidden" name="csrf" value="{e(csrf)}">'
            f"<label>to {_replay_select(r['model'], routes, targets)}</label>"
            '<label>API key (when keys are required) <input type="password" name="api_key" '
            'autocomplete="off"></label><button type="submit">Send again</button></form>'
        )
    body = (
        f'<dl class="facts">{dl}</dl>{raw}<h2>Prompt</h2>{messages}<h2>Reply</h2>{reply}'
        f"<h2>Attempts</h2>{attempts}<h2>Token timeline</h2>{charts}{replay}"
    )
    return page("Request", body, csrf)


def _replay_select(model: str, routes: list[str], targets: list[tuple[str, bool]]) -> str:
    """The routes (the original's model chosen), then the provider:model targets to pin."""

    def option(value: str, label: str) -> str:
        chosen = " selected" if value == model else ""
        return f'<option value="{e(value)}"{chosen}>{e(label)}</option>'

    routed = "".join(option(name, name) for name in routes)
    pinned = "".join(
        option(name, f"{name} (provider disabled)" if off else name) for name, off in targets
    )
    return (
        f'<select name="target" required><optgroup label="Routes">{routed}</optgroup>'
        f'<optgroup label="Pinned to a provider:model">{pinned}</optgroup></select>'
    )


def _reply(detail: RequestDetail) -> str:
    """The last attempt's text and tool calls, as stored."""
    last = detail.attempts[-1] if detail.attempts else None
    if last is None:
        return '<p class="empty">No attempt stored.</p>'
    calls = detail.tool_calls.get(last["id"], [])
    return f'<pre class="reply">{e(detail.texts.get(last["id"], ""))}</pre>' + (
        f'<h3>Tool calls</h3><pre class="tool-calls">{pretty(calls)}</pre>' if calls else ""
    )


def usage(rows: list[dict[str, Any]], by: str, since: str, per: str | None, csrf: str) -> str:
    """Requests, errors, tokens and cost per group (key, team, user, model, provider or day),
    split per UTC day or hour or not; split in time (or by day), charted above the table."""
    choices = "".join(
        f'<option value="{b}"{" selected" if b == by else ""}>{b}</option>' for b in SPEND_BY
    )
    buckets = "".join(
        f'<option value="{b}"{" selected" if b == (per or "") else ""}>{b or "whole"}</option>'
        for b in ("", *BUCKETS)
    )
    form = (
        f'<form method="get" action="{BASE}usage" class="filters">'
        f'<label>by <select name="by">{choices}</select></label>'
        f'<label>since <input name="since" value="{e(since)}" placeholder="24h, 7d or ISO">'
        f'</label><label>per <select name="per">{buckets}</select></label>'
        '<button type="submit">Show</button></form>'
    )
    split = per is not None and not (by == "day" and per == "day")
    body = [
        [
            *([e(r["day"])] if split else []),
            e(r["name"] or r["group"] or "(none)"),
            e(r["requests"]),
            e(r["errors"]),
            e(r["prompt_tokens"]),
            e(r["completion_tokens"]),
            e(cost(r["cost"])),
        ]
        for r in rows
    ]
    headings = [*([f"{per} (UTC)"] if split else []), by, "requests", "errors", "prompt tokens"]
    listing = table([*headings, "completion tokens", "cost"], body, "usage")
    charts = ""
    if not rows:
        listing = '<p class="empty">No requests in this time.</p>'
    elif (bucket := per or ("day" if by == "day" else None)) is not None:
        charts = f'<div class="charts">{usage_charts(rows, by, bucket)}</div>'
    else:
        charts = '<p class="empty">Choose per day or hour to chart usage over time.</p>'
    return page("Usage and spend", form + charts + listing, csrf)


def health(report: dict[str, Any], csrf: str) -> str:
    """Providers with their switches, the database, the WAL backlog and the jobs."""
    providers = [
        [
            e(p["name"]),
            "enabled" if p["enabled"] else '<span class="status failed">disabled</span>',
            e(p["circuit"]),
            button_form(
                f"{BASE}providers/{quote(p['name'])}/{'disable' if p['enabled'] else 'enable'}",
                "Disable" if p["enabled"] else "Enable",
                csrf,
            ),
        ]
        for p in report["providers"]
    ]
    db, wal = report["database"], report["wal"]
    database = [
        [e(k), e(db.get(k))] for k in ("connected", "last_flush", "last_check", "last_error")
    ]
    backlog = [
        [e(k), e(wal.get(k))]
        for k in ("backlog_records", "backlog_bytes", "backlog_seconds", "segments", "disk_full")
    ]
    jobs = [
        [e(name), e(job["schedule"]), e(job["last_run"]), e(job["last_status"]), e(job["next_run"])]
        for name, job in (report.get("scheduler") or {}).items()
    ]
    last = report.get("last_backup")
    backup = '<p class="empty">None in backup_dir.</p>'
    if last:
        made = f"{e(last['file'])}, {e(last['created'])}, {e(last['size'])} bytes"
        backup = f'<p class="backup">{made}</p>'
    body = (
        f'<p>Status: <span class="status {e(report["status"])}">{e(report["status"])}</span> '
        f"{e(report.get('reason', ''))}</p>"
        f"<h2>Providers</h2>"
        f"{table(['provider', 'state', 'circuit', ''], providers, 'providers')}"
        f"<h2>Database</h2>{table(['', ''], database, 'database')}"
        f"<h2>WAL</h2>{table(['', ''], backlog, 'wal')}"
        f"<h2>Jobs</h2>"
        f"{table(['job', 'schedule', 'last run', 'last status', 'next run'], jobs, 'jobs')}"
        f"<h2>Last backup</h2>{backup}"
    )
    return page("Health", body, csrf)
