"""The usage page's charts as inline SVG bars per UTC day or hour: tokens stacked by group
(the biggest groups, the rest as "other"), requests with their errors, and cost. Drawn on
the server like the token timeline: no script, colours from the stylesheet's classes.

Buckets without requests are not drawn (the store has no row for them): the x axis is
the buckets that have some, in time order, each labelled by its time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import Any

WIDTH = 760
LEFT, RIGHT, TOP = 84, 16, 14  # the plot's margins: y-axis labels left
AXIS_Y = 170  # the x axis; bars grow up from it
LEGEND_Y = AXIS_Y + 40  # the first legend row's baseline
LEGEND_ROW = 18
TOP_GROUPS = 5  # groups drawn by name in the tokens chart; the rest are "other"
MAX_LABELS = 8  # bucket labels on an x axis at most (every n-th bucket labelled)
LABEL_CHARS = 28  # a legend entry's name is cut to this


@dataclass(frozen=True, slots=True)
class Series:
    """One colour of stacked bars: its legend name, its class, a value per bucket."""

    name: str
    css: str
    values: list[float]


def usage_charts(rows: list[dict[str, Any]], by: str, per: str) -> str:
    """The three charts of `spend` rows split per `per` ("day" or "hour"); by day, the rows
    are the buckets themselves and the tokens are one series."""
    buckets = list(dict.fromkeys(_bucket(row) for row in rows))
    at = {bucket: n for n, bucket in enumerate(buckets)}
    totals: dict[str, int] = {}
    for row in rows:
        name = "all requests" if by == "day" else _group(row)
        totals[name] = totals.get(name, 0) + row["prompt_tokens"] + row["completion_tokens"]
    biggest = sorted(totals, key=lambda name: -totals[name])[:TOP_GROUPS]
    named = {name: Series(name, f"s{n}", [0.0] * len(buckets)) for n, name in enumerate(biggest)}
    other = Series("other", "other", [0.0] * len(buckets))
    done, errors, cost = ([0.0] * len(buckets) for _ in range(3))
    for row in rows:
        n = at[_bucket(row)]
        series = named.get("all requests" if by == "day" else _group(row), other)
        series.values[n] += row["prompt_tokens"] + row["completion_tokens"]
        done[n] += row["requests"] - row["errors"]
        errors[n] += row["errors"]
        cost[n] += row["cost"] or 0.0
    stacked = [*named.values(), *([other] if any(other.values) else [])]
    grouping = "" if by == "day" else f", by {by}"
    requests = [Series("completed", "done", done), Series("errors", "errors", errors)]
    tokens = _figure(f"Tokens per {per}{grouping}", "tokens", buckets, per, stacked, _count)
    asked = _figure(f"Requests per {per}, errors on top", "requests", buckets, per, requests,
                    _count)  # fmt: skip
    spent = _figure(f"Cost per {per}", "cost", buckets, per, [Series("cost", "cost", cost)],
                    _dollars)  # fmt: skip
    return tokens + asked + spent


def _bucket(row: dict[str, Any]) -> str:
    return str(row["day"] if "day" in row else row["group"])  # by day per day: the group


def _group(row: dict[str, Any]) -> str:
    return str(row["name"] or row["group"] or "(none)")  # as the table names it


def _count(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"  # a half-way tick


def _dollars(value: float) -> str:
    return f"${value:.2g}" if value < 1 else f"${value:,.2f}"  # cents of a cent, readable


def _figure(
    caption: str,
    unit: str,
    buckets: list[str],
    per: str,
    stacked: list[Series],
    shown: Callable[[float], str],
) -> str:
    """One chart: bars per bucket stacked in `stacked`'s order from the axis up, the y axis
    from 0 to the tallest bucket's total, every n-th bucket labelled, and a legend."""
    peak = max([sum(s.values[n] for s in stacked) for n in range(len(buckets))] + [0.0])
    plot = AXIS_Y - TOP
    slot = (WIDTH - LEFT - RIGHT) / max(len(buckets), 1)
    bar = max(slot * 0.8, 1.0)
    legend, legend_rows = _legend(stacked)
    height = LEGEND_Y + LEGEND_ROW * (legend_rows - 1) + 10
    parts = [
        f'<figure><figcaption>{escape(caption)}</figcaption><svg class="chart {unit}" '
        f'xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(caption)}">',
        f'<text class="unit" x="12" y="{(TOP + AXIS_Y) / 2:.0f}" '
        f'transform="rotate(-90 12 {(TOP + AXIS_Y) / 2:.0f})">{escape(unit)}</text>',
    ]
    for fraction in (0.0, 0.5, 1.0):  # gridlines with their values
        y = AXIS_Y - plot * fraction
        parts.append(
            f'<line class="{"axis" if fraction == 0 else "grid"}" x1="{LEFT}" y1="{y:.1f}" '
            f'x2="{WIDTH - RIGHT}" y2="{y:.1f}"/><text class="tick end" x="{LEFT - 6}" '
            f'y="{y + 4:.1f}">{escape(shown(peak * fraction))}</text>'
        )
    every = math.ceil(len(buckets) / MAX_LABELS)
    for n, bucket in enumerate(buckets):
        x = LEFT + slot * n + (slot - bar) / 2
        base = float(AXIS_Y)
        for series in stacked:
            value = series.values[n]
            if value <= 0 or peak <= 0:
                continue
            tall = plot * value / peak
            base -= tall
            parts.append(
                f'<rect class="bar {series.css}" x="{x:.2f}" y="{base:.2f}" width="{bar:.2f}" '
                f'height="{tall:.2f}"><title>{escape(bucket)} · {escape(series.name)}: '
                f"{escape(shown(value))}</title></rect>"
            )
        if n % every == 0:
            label = bucket[5:] if per == "hour" else bucket  # an hour without its year
            parts.append(
                f'<text class="tick middle" x="{x + bar / 2:.1f}" y="{AXIS_Y + 16}">'
                f"{escape(label)}</text>"
            )
    parts.append(
        f'<text class="tick end" x="{WIDTH - RIGHT}" y="{AXIS_Y + 30}">UTC {escape(per)}</text>'
    )
    parts += [legend, "</svg></figure>"]
    return "".join(parts)


def _legend(stacked: list[Series]) -> tuple[str, int]:
    """A swatch and name per series, in rows under the axis; and how many rows."""
    parts, x, row = [], LEFT, 0
    for series in stacked:
        name = series.name if len(series.name) <= LABEL_CHARS else series.name[:LABEL_CHARS] + "…"
        wide = 24 + 7 * len(name)
        if x + wide > WIDTH - RIGHT and x > LEFT:
            x, row = LEFT, row + 1
        y = LEGEND_Y + LEGEND_ROW * row
        parts.append(
            f'<rect class="swatch {series.css}" x="{x}" y="{y - 10}" width="10" height="10"/>'
            f'<text class="legend" x="{x + 14}" y="{y}">{escape(name)}</text>'
        )
        x += wide
    return "".join(parts), row + 1
