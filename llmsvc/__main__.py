"""`python -m llmsvc`: the `llmsvc` command, as the supervisor starts its workers."""

from llmsvc.cli import main

raise SystemExit(main())
