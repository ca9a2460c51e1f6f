"""Take the README's console screenshots (docs/console-*.png) from a throwaway daemon.

Run from the repository with the test venv: .venv/bin/python scripts/console_screenshots.py
It starts `llmsvc run` on a temporary SQLite store, sends it a few requests, logs in
with headless Chromium and saves the requests list, a request, the health page, and the
usage page after more requests (a few failed while the provider was disabled), their times
spread over the past week in the throwaway store so its charts have days to show.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import TOKEN, chat, chromium, log_in  # noqa: E402
from daemon_process import DaemonProcess, admin_call, daemon_env  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

DOCS = REPO / "docs"
PRICES = {"mock": {"input_per_million": 2.5, "output_per_million": 10.0}}
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        env = daemon_env(f"sqlite+aiosqlite:///{base / 'llmsvc.db'}", base / "wal",
                         admin_token=TOKEN, prices=json.dumps(PRICES))  # fmt: skip
        with DaemonProcess(env) as daemon, sync_playwright() as playwright:
            daemon.wait_caught_up()
            chat(daemon, "Name three rivers of Europe.", 12, user="alice")
            chat(daemon, "Summarise the incident report.", 20, user="bob",
                 extra_headers={"X-Correlation-ID": "ticket-4711"})  # fmt: skip
            shown = chat(daemon, "Write a haiku about write-ahead logs.", 40, user="alice")
            browser = chromium(playwright)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            log_in(page, daemon)
            page.screenshot(path=str(DOCS / "console-requests.png"), full_page=True)
            page.goto(f"{daemon.base_url}/console/requests/{shown}")
            page.screenshot(path=str(DOCS / "console-request.png"), full_page=True)
            page.goto(f"{daemon.base_url}/console/health")
            page.screenshot(path=str(DOCS / "console-health.png"), full_page=True)
            week(daemon, base / "llmsvc.db")
            page.goto(f"{daemon.base_url}/console/usage?by=user&since=7d&per=day")
            page.screenshot(path=str(DOCS / "console-usage.png"), full_page=True)
            browser.close()
            daemon.stop()
    print("wrote docs/console-requests.png, docs/console-request.png, docs/console-health.png,"
          " docs/console-usage.png")  # fmt: skip


def week(daemon: DaemonProcess, database: Path) -> None:
    """Requests of several users, two failed (the provider disabled), spread over 7 days."""
    for n in range(28):
        chat(daemon, f"Question {n} of the week.", 5 + (n * 7) % 30, user=USERS[n % len(USERS)])
    admin_call(daemon, "POST", "/api/admin/providers/mock/disable", None, TOKEN)
    client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0)
    for user in ("bob", "erin"):
        try:
            client.chat.completions.create(
                model="mock", messages=[{"role": "user", "content": "hi"}], user=user
            )
        except openai.APIStatusError as refused:  # 503, and stored as failed: wait for it
            stored(daemon, refused.response.headers["x-request-id"])
    admin_call(daemon, "POST", "/api/admin/providers/mock/enable", None, TOKEN)
    with sqlite3.connect(database, timeout=10) as db:
        db.execute(
            "UPDATE llm_requests SET created_at = "
            "strftime('%Y-%m-%d %H:%M:%f', created_at, '-' || (rowid / 2 % 7) || ' days')"
        )


def stored(daemon: DaemonProcess, request_id: str) -> None:
    deadline = time.monotonic() + 10
    while admin_call(daemon, "GET", f"/api/admin/requests/{request_id}", None, TOKEN)[0] != 200:
        assert time.monotonic() < deadline, f"{request_id} never stored"
        time.sleep(0.05)


if __name__ == "__main__":
    main()
