"""Take the README's console screenshots (docs/console-*.png) from a throwaway daemon.

Run from the repository with the test venv: .venv/bin/python scripts/console_screenshots.py
It starts `llmsvc run` on a temporary SQLite store, sends it a few requests, logs in
with headless Chromium and saves the requests list, a request and the health page.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import TOKEN, chat, chromium, log_in  # noqa: E402
from daemon_process import DaemonProcess, daemon_env  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

DOCS = REPO / "docs"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        env = daemon_env(f"sqlite+aiosqlite:///{base / 'llmsvc.db'}", base / "wal",
                         admin_token=TOKEN)  # fmt: skip
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
            browser.close()
            daemon.stop()
    print("wrote docs/console-requests.png, docs/console-request.png, docs/console-health.png")


if __name__ == "__main__":
    main()
