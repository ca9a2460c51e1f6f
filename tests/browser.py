"""Headless Chromium for the console's tests and screenshots, and a daemon with requests in it.

The browser is Debian's `chromium` driven by Playwright (never a downloaded one):
scripts/test installs it as root. Missing, the tests fail and say how to get it,
unless LLMSVC_TEST_BROWSER=skip opts out explicitly (they are then reported as skipped).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import REPO, DaemonProcess, admin_call
from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
OPT_OUT = "LLMSVC_TEST_BROWSER"
ARTIFACTS = REPO / "test-artifacts"  # screenshots of failed browser tests (ignored by git)
TOKEN = "console-" + uuid.uuid4().hex
XSS_PROMPT = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> hi'


def chromium(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless; the opt-out skips, a missing browser fails."""
    if os.environ.get(OPT_OUT, "").lower() == "skip":
        pytest.skip(f"browser tests skipped on request ({OPT_OUT}=skip)")
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is not installed, so the console cannot be tested in a browser: "
            "install it (Debian/Ubuntu: apt-get install chromium; scripts/test does as root), "
            f"or set {OPT_OUT}=skip to skip these tests explicitly.",
            pytrace=False,
        )
    root = os.geteuid() == 0  # Chromium's sandbox refuses to run as root
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=["--no-sandbox"] if root else []
    )


def log_in(page: Page, daemon: DaemonProcess, token: str = TOKEN) -> None:
    page.goto(f"{daemon.base_url}/console/")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")


def chat(daemon: DaemonProcess, content: str, tokens: int, **extra: Any) -> str:
    """A streamed chat request to the mock (`mock_delay_ms` spaces its tokens); its id once
    the store holds it ended."""
    client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="mock",
        messages=[{"role": "user", "content": content}],
        max_tokens=tokens,
        stream=True,
        extra_body={"mock_delay_ms": 3},
        **extra,
    )
    for _chunk in raw.parse():
        pass
    request_id = str(raw.headers["x-request-id"])
    deadline = time.monotonic() + 10
    while True:
        code, shown = admin_call(daemon, "GET", f"/api/admin/requests/{request_id}", None, TOKEN)
        if code == 200 and all(a["status"] != "streaming" for a in shown["attempts"]):
            return request_id
        assert time.monotonic() < deadline, ("never stored whole", code, shown)
        time.sleep(0.05)
