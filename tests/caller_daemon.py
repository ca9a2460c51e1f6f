"""`llmsvc run` whose requests carry a test-chosen caller, for tests only, until keys land.

Authentication (`auth = "keys"`) is another branch's; until it resolves a request to a
`Caller`, this wrapper does: the header `x-test-caller: NAME` picks a caller from the JSON
file named by TEST_CALLERS (`{NAME: {"key_id": …, "team_id": …, "key_limits": {…},
"team_limits": {…}}}`). The daemon is otherwise `llmsvc run` unchanged, in its own process.

Usage:  TEST_CALLERS=/path/to/callers.json python tests/caller_daemon.py
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

CALLERS_ENV = "TEST_CALLERS"


def main() -> int:
    from llmsvc.callers import Caller, Limits
    from llmsvc.gateway import app

    def caller(spec: dict[str, Any]) -> Caller:
        team = spec.get("team_id")
        return Caller(
            key_id=uuid.UUID(spec["key_id"]),
            key_name=spec.get("key_name", "test"),
            team_id=uuid.UUID(team) if team else None,
            key_limits=Limits(**spec.get("key_limits", {})),
            team_limits=Limits(**spec.get("team_limits", {})),
        )

    specs = json.loads(Path(os.environ[CALLERS_ENV]).read_text())
    callers = {name.encode(): caller(spec) for name, spec in specs.items()}
    app.caller_of = lambda headers: callers.get(headers.get(b"x-test-caller", b""))  # type: ignore[assignment]
    from llmsvc.cli import main as llmsvc_main

    return llmsvc_main(["run"])


if __name__ == "__main__":
    sys.exit(main())
