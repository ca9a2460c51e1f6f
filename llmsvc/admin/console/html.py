"""The console's page frame and the small formatting every page shares; everything shown
passes through `e` (prompts and replies are whatever a caller sent)."""

from __future__ import annotations

import json
from datetime import datetime
from html import escape
from typing import Any

from llmsvc.store.keys import utc

BASE = "/console/"


def e(value: Any) -> str:
    """Text for HTML, quotes included (safe in attributes too); None as an empty string."""
    return "" if value is None else escape(str(value), quote=True)


def when(value: datetime | None) -> str:
    return "" if value is None else utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def millis(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    return f"{(utc(end) - utc(start)).total_seconds() * 1000:.0f} ms"


def cost(value: float | None) -> str:
    return "" if value is None else f"${value:.6f}"


def pretty(value: Any) -> str:
    """A stored JSON value, indented, as escaped text for a <pre>."""
    return e(value if isinstance(value, str) else json.dumps(value, indent=2, default=str))


def page(title: str, body: str, csrf: str | None = None) -> str:
    """A whole page; with a session (`csrf`), the navigation and the logout button."""
    nav = ""
    if csrf is not None:
        nav = (
            f'<nav><a href="{BASE}requests">Requests</a> <a href="{BASE}usage">Usage</a> '
            f'<a href="{BASE}health">Health</a>'
            f'<form method="post" action="{BASE}logout" class="logout">'
            f'<input type="hidden" name="csrf" value="{e(csrf)}">'
            '<button type="submit">Log out</button></form></nav>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)} · llmsvc</title>"
        f'<link rel="stylesheet" href="{BASE}static/console.css"></head>'
        f"<body><header><strong>llmsvc</strong> console{nav}</header>"
        f"<main><h1>{e(title)}</h1>{body}</main></body></html>"
    )


def table(headings: list[str], rows: list[list[str]], css: str = "") -> str:
    """Cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def button_form(action: str, label: str, csrf: str) -> str:
    return (
        f'<form method="post" action="{e(action)}" class="inline">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<button type="submit">{e(label)}</button></form>'
    )
