"""The console in a real browser: headless Chromium against one daemon with requests in it.

Login (a wrong token refused), the request list and its filters, a request with its
token timeline, a provider switched off and on, CSRF and Origin refusals, a prompt
that is markup shown as text, usage, a replay pinned to a provider target, logout. A
failed test leaves a screenshot in test-artifacts/console/. The replay adds a request to the shared
daemon: its test comes after those that count the seeded three (each pytest-xdist
worker runs its share of a module in file order).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from browser import ARTIFACTS, TOKEN, XSS_PROMPT, chat, chromium, log_in
from daemon_process import DaemonProcess, admin_call, daemon_env
from playwright.sync_api import Browser, Page, expect, sync_playwright

from llmsvc.admin.console import pages
from llmsvc.store.search import Searched

pytestmark = pytest.mark.timeout(120)

PINNED = "mock:mock-large"  # a target of the route `large`, and no public name itself


class Seeded:
    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.plain = chat(daemon, "hello", 6, user="alice")
        self.markup = chat(daemon, XSS_PROMPT, 4, user="mallory")
        self.traced = chat(daemon, "traced", 3, extra_headers={"X-Correlation-ID": "trace-42"})


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    base = tmp_path_factory.mktemp("console")
    env = daemon_env(f"sqlite+aiosqlite:///{base / 'llmsvc.db'}", base / "wal", admin_token=TOKEN,
                     routes=json.dumps({"large": [PINNED]}))  # fmt: skip
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        yield Seeded(daemon)
        assert daemon.stop() == 0
    assert TOKEN not in daemon.log


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = chromium(playwright)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (no cookies) per test; a screenshot if the test failed."""
    context = browser.new_context()
    opened = context.new_page()
    yield opened
    outcome = getattr(request.node, "outcome_call", None)
    if outcome is not None and outcome.failed:
        shot = ARTIFACTS / "console" / f"{request.node.name}.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        opened.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the failure: {shot}")
    context.close()


def test_a_wrong_token_is_refused_the_right_one_opens_a_session_and_logout_ends_it(
    seeded: Seeded, page: Page
) -> None:
    base = seeded.daemon.base_url
    page.goto(f"{base}/console/requests")
    expect(page).to_have_url(f"{base}/console/login")
    log_in(page, seeded.daemon, TOKEN + "x")
    expect(page.locator("p.error")).to_have_text("That is not the admin token.")
    assert page.context.cookies() == []
    log_in(page, seeded.daemon)
    expect(page).to_have_url(f"{base}/console/requests")
    (cookie,) = page.context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/console/")
    assert TOKEN not in cookie["value"]
    page.click("nav button")  # log out
    expect(page).to_have_url(f"{base}/console/login")
    assert page.context.cookies() == []
    page.goto(f"{base}/console/health")
    expect(page).to_have_url(f"{base}/console/login")


def test_the_request_list_is_newest_first_and_filters(seeded: Seeded, page: Page) -> None:
    log_in(page, seeded.daemon)
    links = page.locator("table.requests tbody a")
    expect(links).to_have_count(3)
    hrefs = [links.nth(i).get_attribute("href") for i in range(3)]
    assert hrefs == [f"/console/requests/{r}" for r in (seeded.traced, seeded.markup, seeded.plain)]
    page.fill("input[name=user]", "alice")
    page.click("form.filters button")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == f"/console/requests/{seeded.plain}"
    assert page.input_value("input[name=user]") == "alice"  # the form keeps what was asked
    page.goto(f"{seeded.daemon.base_url}/console/requests?correlation_id=trace-42")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == f"/console/requests/{seeded.traced}"
    page.select_option("select[name=status]", "failed")
    page.click("form.filters button")
    expect(page.locator("p.empty")).to_have_text("No requests match.")
    page.goto(f"{seeded.daemon.base_url}/console/requests?since=yesterday")
    expect(page.locator("p.error")).to_contain_text("since: 'yesterday' is neither")
    # The next page starts after a row's (created_at, id), as the "older" link gives it.
    _, shown = admin_call(seeded.daemon, "GET", f"/api/admin/requests/{seeded.traced}", None, TOKEN)
    cursor = quote(f"{shown['request']['created_at']}_{seeded.traced}")
    page.goto(f"{seeded.daemon.base_url}/console/requests?before={cursor}")
    expect(links).to_have_count(2)
    assert links.first.get_attribute("href") == f"/console/requests/{seeded.markup}"
    page.goto(f"{seeded.daemon.base_url}/console/requests?before=nonsense")
    expect(page.locator("p.error")).to_contain_text("before: not a page's cursor")
    page.goto(f"{seeded.daemon.base_url}/console/requests")
    page.fill("input[name=text]", "FOX JUMPS")  # in the reply, across two tokens, any case
    page.click("form.filters button")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == f"/console/requests/{seeded.plain}"
    expect(page.locator("p.searched")).to_contain_text("Searched the replies of all 3 requests")
    expect(page.locator("a.older")).to_have_count(0)  # all read: nothing older to search


def test_a_search_that_read_its_bound_says_so_and_links_on_from_the_last_one_read() -> None:
    at = datetime(2026, 12, 5, 10, tzinfo=UTC)
    last = uuid.uuid4()
    searched = Searched(2000, at + timedelta(hours=1), at, (at, last))
    given = {"text": "50%", "model": "m"}
    shown = pages.requests([], given, f"{at.isoformat()}_{last}", searched, "csrf")
    assert (
        '<p class="searched">Searched the replies of 2,000 requests that the other filters let '
        "through (created 2026-12-05 11:00:00.000 down to 2026-12-05 10:00:00.000 UTC); older "
        "ones were not read.</p>"
    ) in shown
    link = f"text=50%25&amp;model=m&amp;before={quote(at.isoformat())}_{last}"
    assert f'href="/console/requests?{link}">Search older requests →</a>' in shown


def test_a_request_shows_its_reply_attempts_and_a_timeline_mark_per_token(
    seeded: Seeded, page: Page
) -> None:
    log_in(page, seeded.daemon)
    page.click(f"a[href='/console/requests/{seeded.plain}']")
    expect(page.locator("h1")).to_have_text("Request")
    expect(page.locator("table.attempts tbody tr")).to_have_count(1)
    expect(page.locator("table.attempts tbody td").nth(3)).to_have_text("completed")
    expect(page.locator("svg.timeline line.token")).to_have_count(6)
    expect(page.locator("svg.timeline rect.gap")).to_have_count(5)
    expect(page.locator("svg.timeline text.ttft")).to_contain_text("TTFT")
    reply = page.locator("pre.reply").inner_text()
    assert reply.startswith("The quick brown")
    page.click("text=raw JSON")
    shown = json.loads(page.locator("body").inner_text())
    assert shown["request"]["id"] == seeded.plain
    assert shown["attempts"][0]["tokens"]["stored"] == 6


def test_a_prompt_of_markup_is_shown_as_text(seeded: Seeded, page: Page) -> None:
    log_in(page, seeded.daemon)
    page.goto(f"{seeded.daemon.base_url}/console/requests/{seeded.markup}")
    expect(page.locator(".message pre")).to_have_text(XSS_PROMPT)
    assert page.locator("script").count() == 0
    assert page.locator("main img").count() == 0
    assert page.evaluate("window.pwned") is None


def test_usage_sums_requests_and_tokens_per_model_and_day_or_per_user(
    seeded: Seeded, page: Page
) -> None:
    log_in(page, seeded.daemon)
    page.click("nav >> text=Usage")
    rows = page.locator("table.usage tbody tr")
    expect(rows).to_have_count(1)  # one day, one model
    cells = rows.locator("td")
    assert [cells.nth(n).inner_text() for n in (1, 2, 5)] == ["mock", "3", str(6 + 4 + 3)]
    tokens = page.locator("svg.chart.tokens rect.bar")  # one day's bar, all the mock's
    expect(tokens).to_have_count(1)
    expect(tokens.locator("title")).to_contain_text(" · mock: ")
    expect(page.locator("svg.chart.requests rect.bar.done title")).to_contain_text(": 3")
    expect(page.locator("svg.chart text.legend").first).to_have_text("mock")
    page.select_option("select[name=by]", "user")
    page.select_option("select[name=per]", "")
    page.click("form.filters button")
    expect(rows).to_have_count(3)
    users = {rows.nth(n).locator("td").nth(0).inner_text() for n in range(3)}
    assert users == {"alice", "mallory", "(none)"}


def test_a_replay_pinned_to_a_provider_target_is_shown_beside_the_original(
    seeded: Seeded, page: Page
) -> None:
    base = seeded.daemon.base_url
    log_in(page, seeded.daemon)
    page.goto(f"{base}/console/requests/{seeded.plain}")
    action = f"{base}/console/requests/{seeded.plain}/replay"
    csrf = page.locator("form.replay input[name=csrf]").get_attribute("value")
    unknown = page.request.post(action, headers={"Origin": base},
                                form={"csrf": csrf or "", "target": "mock:nowhere"})  # fmt: skip
    assert unknown.status == 400
    assert "mock:nowhere&#x27; is neither a route nor a provider:model target" in unknown.text()
    assert page.input_value("form.replay select[name=target]") == "mock"  # the original's
    page.select_option("form.replay select[name=target]", PINNED)
    page.click("form.replay button")
    expect(page.locator(".compare h3").first).to_contain_text("Original: mock")
    expect(page.locator(".compare h3").last).to_have_text(f"Replay: {PINNED} on mock")
    replayed = page.url.rsplit("/", 1)[1]
    assert replayed != seeded.plain
    original, again = page.locator(".compare pre.reply").all_inner_texts()
    assert again == original
    code, shown = admin_call(seeded.daemon, "GET", f"/api/admin/requests/{replayed}", None, TOKEN)
    assert code == 200
    request, (attempt,) = shown["request"], shown["attempts"]
    assert request["metadata"] == {"replay_of": seeded.plain, "replay_target": PINNED}
    went = (request["provider"], attempt["provider"], attempt["model"])
    assert went == ("mock", "mock", "mock-large")
    assert (request["stream"], request["end_user"]) == (False, "alice")
    assert request["status"] == "completed"  # stored whole before the page showed
    page.goto(f"{base}/console/requests?metadata=replay_of:{seeded.plain}")
    expect(page.locator("table.requests tbody a")).to_have_attribute(
        "href", f"/console/requests/{replayed}"
    )


def _enabled(seeded: Seeded) -> bool:
    code, body = admin_call(seeded.daemon, "GET", "/api/admin/providers", None, TOKEN)
    assert code == 200
    (mock,) = body["providers"]
    return bool(mock["enabled"])


def test_a_provider_is_switched_off_and_on(seeded: Seeded, page: Page) -> None:
    log_in(page, seeded.daemon)
    page.click("nav >> text=Health")
    expect(page.locator("table.jobs")).to_contain_text("wal-housekeeping")
    expect(page.locator("table.wal")).to_contain_text("backlog_records")
    expect(page.locator("p.empty")).to_have_text("None in backup_dir.")  # no backup yet
    row = page.locator("table.providers tbody tr")
    row.locator("button", has_text="Disable").click()
    expect(row.locator("td").nth(1)).to_have_text("disabled")
    assert not _enabled(seeded)
    row.locator("button", has_text="Enable").click()
    expect(row.locator("td").nth(1)).to_have_text("enabled")
    assert _enabled(seeded)


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(
    seeded: Seeded, page: Page
) -> None:
    base = seeded.daemon.base_url
    action = f"{base}/console/providers/mock/disable"
    anonymous = page.request.post(action, headers={"Origin": base}, form={"csrf": "x"})
    log_in(page, seeded.daemon)
    page.click("nav >> text=Health")
    csrf = page.locator("table.providers input[name=csrf]").get_attribute("value")
    assert csrf
    answers = {
        "no token": page.request.post(action, headers={"Origin": base}, form={}),
        "wrong token": page.request.post(action, headers={"Origin": base}, form={"csrf": "0"}),
        "other origin": page.request.post(
            action, headers={"Origin": "http://evil.example"}, form={"csrf": csrf}
        ),
        "no origin": page.request.post(action, form={"csrf": csrf}),
    }
    assert anonymous.status == 401
    assert {name: a.status for name, a in answers.items()} == dict.fromkeys(answers, 403)
    assert "CSRF token" in answers["wrong token"].text()
    assert _enabled(seeded)
    done = page.request.post(action, headers={"Origin": base}, form={"csrf": csrf})
    assert done.ok  # the same POST with its token and origin is taken (and followed)
    assert not _enabled(seeded)
    page.request.post(f"{base}/console/providers/mock/enable", headers={"Origin": base},
                      form={"csrf": csrf})  # fmt: skip
    assert _enabled(seeded)
