"""Property-based fuzzing of every route from the daemon's own OpenAPI document.

schemathesis generates requests from `/openapi.json`, valid and invalid, and
sends them to a real daemon (SQLite, mock provider, the admin API on, with its
token). Whatever it sends, no route may answer 5xx: bad input is a 4xx.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from daemon_process import DaemonProcess, daemon_env
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from llmsvc.admin.app import ADMIN_BODIES
from llmsvc.admin.openapi import document

TOKEN = "fuzz-admin-token-0123456789"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("openapi")
    env = daemon_env(
        f"sqlite+aiosqlite:///{tmp / 'llmsvc.db'}",
        tmp / "wal",
        admin_token=TOKEN,
        backup_dir=tmp / "backups",
        max_body_bytes=65536,
    )
    with DaemonProcess(env) as running:
        running.wait_caught_up()  # its store migrated: before that, its routes answer 503
        yield running
        assert running.stop() == 0, running.log
    assert "Traceback" not in running.log, running.log


# The document the daemon serves is built from the same code; the last test checks they agree.
schema = schemathesis.openapi.from_dict(document(ADMIN_BODIES))
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_route_answers_5xx_to_any_input(daemon: DaemonProcess, case: schemathesis.Case) -> None:
    case.call_and_validate(
        base_url=daemon.base_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[not_a_server_error],
        timeout=30,
    )


def test_the_document_covers_every_route(daemon: DaemonProcess) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{daemon.base_url}/openapi.json", timeout=5) as response:
        doc = json.loads(response.read())
    assert set(doc["paths"]) >= {
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/models",
        "/v1/models/{model}",
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/responses/{response_id}/input_items",
        "/api/health",
        "/api/ready",
        "/api/metrics",
        "/api/admin/status",
        "/api/admin/restore",
        "/api/admin/keys",
        "/api/admin/teams/{team}",
    }
    assert doc == document(ADMIN_BODIES)
