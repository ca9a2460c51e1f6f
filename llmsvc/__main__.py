"""`python -m llmsvc`: the `llmsvc` command, as the supervisor starts its workers."""

from llmsvc.cli import main

if __name__ == "__main__":  # not when a spawned child process imports it
    raise SystemExit(main())
