"""A token timeline as inline SVG: each token's arrival since the request began, the gaps
between tokens, and the time to first token marked. Drawn on the server: no script."""

from __future__ import annotations

from datetime import datetime
from html import escape
from itertools import pairwise

WIDTH, HEIGHT = 760, 150
LEFT, RIGHT = 50, 20
LANE_TOP, LANE_BOTTOM = 20, 50  # the tokens' ticks
GAPS_TOP, GAPS_BOTTOM = 62, 120  # inter-token gaps, as bars up from the bottom
AXIS_Y = 136


def timeline_svg(start: datetime, arrivals: list[datetime], label: str) -> str:
    """The chart for one attempt's tokens (`arrivals` in seq order), times from `start`."""
    offsets = [(at - start).total_seconds() * 1000 for at in arrivals]
    span = max([*offsets, 1.0])
    gaps = [b - a for a, b in pairwise(offsets)]
    biggest = max([*gaps, 1.0])

    def x(ms: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * ms / span

    parts = [
        f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(label)}">',
        f'<text x="4" y="{(LANE_TOP + LANE_BOTTOM) // 2 + 4}" class="lane">tokens</text>',
        f'<text x="4" y="{(GAPS_TOP + GAPS_BOTTOM) // 2 + 4}" class="lane">gaps</text>',
        f'<line class="axis" x1="{LEFT}" y1="{AXIS_Y - 8}" x2="{WIDTH - RIGHT}" '
        f'y2="{AXIS_Y - 8}"/>',
        f'<text x="{LEFT}" y="{AXIS_Y + 8}" class="tick">0 ms</text>',
        f'<text x="{WIDTH - RIGHT}" y="{AXIS_Y + 8}" class="tick end">{span:.0f} ms</text>',
    ]
    for seq, ms in enumerate(offsets):
        gap = ms - offsets[seq - 1] if seq else ms
        parts.append(
            f'<line class="token" x1="{x(ms):.1f}" y1="{LANE_TOP}" x2="{x(ms):.1f}" '
            f'y2="{LANE_BOTTOM}"><title>token {seq}: {ms:.1f} ms (+{gap:.1f} ms)</title></line>'
        )
    for seq, gap in enumerate(gaps, start=1):
        height = (GAPS_BOTTOM - GAPS_TOP) * gap / biggest
        parts.append(
            f'<rect class="gap" x="{x(offsets[seq]) - 1:.1f}" y="{GAPS_BOTTOM - height:.1f}" '
            f'width="2" height="{height:.1f}"><title>gap before token {seq}: {gap:.1f} ms'
            "</title></rect>"
        )
    if offsets:
        ttft = offsets[0]
        parts.append(
            f'<line class="ttft" x1="{x(ttft):.1f}" y1="{LANE_TOP - 12}" x2="{x(ttft):.1f}" '
            f'y2="{AXIS_Y - 8}"/><text class="ttft" x="{x(ttft) + 4:.1f}" y="{LANE_TOP - 4}">'
            f"TTFT {ttft:.0f} ms</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
