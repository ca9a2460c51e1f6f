"""The `llmsvc` command: parse, call, print.

Exit codes: 0 success, 1 a runtime failure (database unreachable, WAL locked,
request not found), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import orjson
import sqlalchemy as sa
from pydantic import ValidationError

from llmsvc import __version__, logs
from llmsvc.config import Settings, load_settings, worker_index
from llmsvc.errors import BackupError, ClientError, ConfigError, LlmsvcError, NotFound
from llmsvc.maintenance import backup, consistency, retention
from llmsvc.maintenance.jobs import (
    INSTANCE_JOBS,
    JOB_NAMES,
    backup_job,
    job_table,
    prune_job,
    restore_job,
    schedules,
)
from llmsvc.maintenance.runs import Job, JobResult, history, last_runs, record_run, run_job
from llmsvc.maintenance.scheduler import next_run
from llmsvc.store import keys
from llmsvc.store.attribution import SPEND_BY, RequestFilter, parse_since, spend
from llmsvc.store.engine import (
    Access,
    create_engine,
    describe_error,
    schema_revision,
    sqlite_path,
    upgrade_to_head,
)
from llmsvc.store.keys import utc
from llmsvc.store.queries import (
    RequestDetail,
    acknowledge_dead_letters,
    find_requests,
    recent_requests,
    request_detail,
    stopped,
)
from llmsvc.store.search import SCAN, Searched
from llmsvc.tokens import DELTAS, ESTIMATE, TOKENIZER
from llmsvc.wal import (
    RecordType,
    WalReader,
    decode_json,
    decode_token,
    read_instance_id,
    verify_log,
)

EXIT_FAILURE, EXIT_USAGE = 1, 2
SINCE_HELP = "only requests since then: a duration back (30m, 24h, 7d, 2w) or an ISO date/time"


class UsageError(LlmsvcError):
    """A command-line argument is wrong."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        logs.configure(
            settings.log_level if args.command is cmd_run else logging.WARNING,
            json=settings.log_format == "json",
            secrets=settings.secrets(),
            process=_process_name(settings) if args.command is cmd_run else None,
        )
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # runs are logged by llmsvc
        if args.command is not cmd_run:  # a run by hand is printed whole: its log line
            logging.getLogger(run_job.__module__).setLevel(logging.CRITICAL)  # would say it twice
        logging.getLogger("alembic.runtime.migration").addFilter(_only_migrations)
        code: int = args.command(settings, args)
        sys.stdout.flush()  # here, so that a reader gone away is met below, not at exit
        return code
    except (ConfigError, UsageError) as exc:
        print(f"llmsvc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:  # the store refused what was asked: a name taken, no such team
        print(f"llmsvc: {exc}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(exc, NotFound) else EXIT_USAGE
    except LlmsvcError as exc:
        print(f"llmsvc: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:  # the reader went away (`llmsvc status | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_FAILURE


def _process_name(settings: Settings) -> str | None:
    """With workers > 1, which process a log line comes from: the supervisor or a worker."""
    if settings.workers == 1:
        return None
    index = worker_index()
    return "supervisor" if index is None else f"worker-{index}"


def _only_migrations(record: logging.LogRecord) -> bool:
    """Alembic's lines about migrations run, not the two it logs at every revision check."""
    return not record.getMessage().startswith(("Context impl", "Will assume"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmsvc",
        description="A durable LLM service layer. Settings come from LLMSVC_* variables "
        "and the TOML file named by LLMSVC_CONFIG.",
    )
    parser.add_argument("--version", action="version", version=f"llmsvc {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.set_defaults(command=cmd_run)

    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate.set_defaults(command=cmd_migrate)

    status = commands.add_parser("status", help="list recent requests")
    status.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    status.add_argument("--key", metavar="NAME_OR_ID", help="only this key's requests")
    status.add_argument("--team", metavar="NAME_OR_ID", help="only this team's requests")
    status.add_argument("--user", metavar="U", help="only this end user's (the OpenAI `user`)")
    status.add_argument(
        "--metadata",
        metavar="K=V",
        action="append",
        default=[],
        help="only requests whose metadata has K = V (repeatable: all must match)",
    )
    status.add_argument("--since", metavar="WHEN", help=SINCE_HELP)
    status.add_argument(
        "--correlation-id", metavar="ID", help="only requests sent with this X-Correlation-ID"
    )
    status.add_argument(
        "--text",
        metavar="WORDS",
        help=f"only requests whose reply holds WORDS, any case (reads at most {SCAN:,} replies)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(command=cmd_status)

    spend = commands.add_parser("spend", help="requests, tokens and cost per key, team, ...")
    spend.add_argument("--by", choices=SPEND_BY, default="key", help="the group (default key)")
    spend.add_argument("--since", metavar="WHEN", help=SINCE_HELP)
    spend.add_argument("--json", action="store_true", help="print JSON")
    spend.set_defaults(command=cmd_spend)

    show = commands.add_parser("show", help="show one request, its attempts and its reply")
    show.add_argument(
        "id",
        metavar="ID",
        help="the request id (the X-Request-ID response header), or the X-Correlation-ID "
        "it was sent with",
    )
    show.add_argument("--verbose", "-v", action="store_true", help="include the prompt")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(command=cmd_show)
    check = commands.add_parser(
        "check", help="check the store against the WAL: schema, backlog, token gaps"
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    check.add_argument("--history", action="store_true", help="list earlier check runs")
    check.add_argument("--limit", type=int, default=20, help="runs listed by --history")
    check.add_argument(
        "--acknowledge",
        action="store_true",
        help="mark the records the database refused as seen, then check",
    )
    check.set_defaults(command=cmd_check)

    jobs = commands.add_parser(
        "jobs", help="list the maintenance jobs with their schedules, next and last runs"
    )
    jobs.add_argument("--json", action="store_true", help="print JSON")
    jobs.set_defaults(command=cmd_jobs)
    job_commands = jobs.add_subparsers(metavar="JOBS_COMMAND")
    job_run = job_commands.add_parser("run", help="run one job now, as the scheduler would")
    job_run.add_argument("name", choices=JOB_NAMES, help="the job")
    job_run.add_argument("--json", action="store_true", help="print JSON")
    job_run.set_defaults(command=cmd_job_run)

    prune = commands.add_parser(
        "prune", help="create the coming token partitions; remove requests older than retention"
    )
    cutoff = prune.add_mutually_exclusive_group()
    cutoff.add_argument(
        "--older-than",
        type=int,
        metavar="DAYS",
        help="cut-off in days (default retention_days); 0: all that has ended",
    )
    cutoff.add_argument(
        "--before", metavar="TIME", help="cut-off: an ISO 8601 date or time (UTC if naive) or 7d"
    )
    prune.add_argument("--dry-run", action="store_true", help="count what would go; remove none")
    prune.add_argument("--json", action="store_true", help="print JSON")
    prune.set_defaults(command=cmd_prune)

    backup_cmd = commands.add_parser("backup", help="back up the store into backup_dir, verified")
    backup_cmd.add_argument("--json", action="store_true", help="print JSON")
    backup_cmd.set_defaults(command=cmd_backup)
    backups = commands.add_parser("backups", help="list the backups in backup_dir")
    backups.add_argument("--json", action="store_true", help="print JSON")
    backups.set_defaults(command=cmd_backups)
    restore = commands.add_parser(
        "restore", help="restore a backup into the database, then replay the WAL since"
    )
    restore.add_argument("file", help="a backup's file name in backup_dir (see `llmsvc backups`)")
    restore.add_argument(
        "--force", action="store_true", help="restore even while a daemon uses the database"
    )
    restore.add_argument("--json", action="store_true", help="print JSON")
    restore.set_defaults(command=cmd_restore)

    _keys_parser(commands)
    _teams_parser(commands)

    wal = commands.add_parser("wal", help="inspect the write-ahead log (read only)")
    wal_commands = wal.add_subparsers(required=True, metavar="WAL_COMMAND")
    verify = wal_commands.add_parser("verify", help="check every segment; exit 1 on damage")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(command=cmd_wal_verify)
    dump = wal_commands.add_parser("dump", help="print records in LSN order")
    dump.add_argument("--from", dest="start", type=int, default=1, help="first LSN (default 1)")
    dump.add_argument("--limit", type=int, default=100, help="how many records (default 100)")
    dump.add_argument("--json", action="store_true", help="print one JSON object per line")
    dump.set_defaults(command=cmd_wal_dump)
    return parser


def _keys_parser(commands: Any) -> None:
    keys_cmd = commands.add_parser("keys", help="callers' API keys: create, list, revoke, rotate")
    sub = keys_cmd.add_subparsers(required=True, metavar="KEYS_COMMAND")
    create = sub.add_parser("create", help="create a key and print its secret, once")
    create.add_argument("name", help="a name: letters, digits, _ . -")
    create.add_argument("--team", help="the team whose shared limits and budget also apply")
    _limit_options(create, clearable=False)
    create.add_argument("--models", help="the models it may use, comma-separated (default all)")
    create.add_argument("--expires", metavar="DATE", help="ISO 8601 date or time (UTC if naive)")
    create.set_defaults(command=cmd_keys_create)
    for name, help_text, command in (
        ("list", "list the keys (never their secrets)", cmd_keys_list),
        ("show", "show one key", cmd_keys_show),
        ("revoke", "revoke a key: refused by every instance within 2 s", cmd_keys_change),
        ("rotate", "give a key a new secret; the old one stops working", cmd_keys_change),
    ):
        one = sub.add_parser(name, help=help_text)
        if name != "list":
            one.add_argument("key", help="the key's name or id")
        one.set_defaults(command=command, action=name)
    for one in sub.choices.values():
        one.add_argument("--json", action="store_true", help="print JSON")


def _teams_parser(commands: Any) -> None:
    teams_cmd = commands.add_parser("teams", help="teams: limits and a budget shared by keys")
    sub = teams_cmd.add_subparsers(required=True, metavar="TEAMS_COMMAND")
    create = sub.add_parser("create", help="create a team")
    create.add_argument("name", help="a name: letters, digits, _ . -")
    _limit_options(create, clearable=False)
    create.set_defaults(command=cmd_teams_create)
    update = sub.add_parser("update", help="change a team's limits; `none` removes one")
    update.add_argument("team", help="the team's name or id")
    _limit_options(update, clearable=True)
    update.set_defaults(command=cmd_teams_update)
    listing = sub.add_parser("list", help="list the teams")
    listing.set_defaults(command=cmd_teams_list)
    show = sub.add_parser("show", help="show a team and its keys")
    show.add_argument("team", help="the team's name or id")
    show.set_defaults(command=cmd_teams_show)
    for one in sub.choices.values():
        one.add_argument("--json", action="store_true", help="print JSON")


def _limit_options(parser: argparse.ArgumentParser, clearable: bool) -> None:
    """--rpm/--tpm with bursts and --budget/--budget-period; with `clearable`, `none` unsets."""
    none = " (none: no limit)" if clearable else ""
    for option, kind, what in (
        ("--rpm", int, "requests per minute"),
        ("--rpm-burst", int, "requests at once (default the rpm)"),
        ("--tpm", int, "tokens (prompt + completion) per minute"),
        ("--tpm-burst", int, "tokens at once (default the tpm)"),
        ("--budget", float, "spend per period, in the price table's currency"),
    ):
        parser.add_argument(option, type=_value(kind, clearable), metavar="N", help=what + none)
    periods = ["day", "week", "month", *(["none"] if clearable else [])]
    parser.add_argument("--budget-period", choices=periods, help="the budget's period")


def _value(kind: type[int] | type[float], clearable: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if clearable and text == "none":
            return CLEAR
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


CLEAR = "none"  # an option given as `none`: remove that limit


def _given_limits(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, name) for name in keys.LIMITS}
    return {k: None if v == CLEAR else v for k, v in given.items() if v is not None}


def _validated(model: type[Any], values: dict[str, Any]) -> Any:
    """The options checked as the admin API checks its bodies; a problem is a usage error."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        where = OPTION_NAMES.get(field, "--" + field.replace("_", "-")) if field else "options"
        raise UsageError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


OPTION_NAMES = {"name": "NAME", "expires_at": "--expires"}


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    values = {"name": args.name, **_given_limits(args)}
    if args.team is not None:
        values["team"] = args.team
    if args.models is not None:
        values["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.expires is not None:
        values["expires_at"] = args.expires
    spec = _validated(keys.KeySpec, values)
    key, secret = _with_store(settings, lambda engine: keys.create_key(engine, spec), "write")
    _print_key(key, secret, args.json, "created")
    return 0


def cmd_keys_list(settings: Settings, args: argparse.Namespace) -> int:
    found = _with_store(settings, keys.list_keys)
    if args.json:
        sys.stdout.buffer.write(_json(found) + b"\n")
        return 0
    table = [("NAME", "PREFIX", "TEAM", "STATE", "RPM", "TPM", "BUDGET", "MODELS", "EXPIRES")]
    for key in found:
        table.append(
            (
                key["name"],
                key["prefix"] + "…",
                key["team"] or "-",
                key["state"],
                _rate(key["rpm"], key["rpm_burst"]),
                _rate(key["tpm"], key["tpm_burst"]),
                _budget(key),
                ",".join(key["models"]) if key["models"] is not None else "all",
                _time(key["expires_at"]),
            )
        )
    _print_table(table)
    if not found:
        print("(no keys yet: llmsvc keys create NAME)")
    return 0


def cmd_keys_show(settings: Settings, args: argparse.Namespace) -> int:
    key = _with_store(settings, lambda engine: keys.show_key(engine, args.key))
    _print_key(key, None, args.json, None)
    return 0


def cmd_keys_change(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "revoke":
        key = _with_store(settings, lambda engine: keys.revoke_key(engine, args.key), "write")
        secret = None
    else:
        key, secret = _with_store(
            settings, lambda engine: keys.rotate_key(engine, args.key), "write"
        )
    _print_key(key, secret, args.json, f"{args.action}d")
    return 0


def _print_key(key: dict[str, Any], secret: str | None, as_json: bool, done: str | None) -> None:
    if as_json:
        doc = {"key": key, **({"secret": secret} if secret is not None else {})}
        sys.stdout.buffer.write(_json(doc) + b"\n")
        return
    if done is not None:
        print(f"key {key['name']} {done}")
    if secret is not None:
        print(f"secret: {secret}")
        print("  (shown this once: llmsvc keeps only its hash; use it as the openai SDK's api_key)")
    for name in ("id", "name", "prefix", "team", "state", "models", "expires_at", "revoked_at"):
        value = key[name]
        if name == "models" and value is None:
            value = "all"
        print(f"{name + ':':12} {_plain(value)}")
    print(f"{'rpm:':12} {_rate(key['rpm'], key['rpm_burst'])}")
    print(f"{'tpm:':12} {_rate(key['tpm'], key['tpm_burst'])}")
    print(f"{'budget:':12} {_budget(key)}")


def cmd_teams_create(settings: Settings, args: argparse.Namespace) -> int:
    spec = _validated(keys.TeamSpec, {"name": args.name, **_given_limits(args)})
    team = _with_store(settings, lambda engine: keys.create_team(engine, spec), "write")
    _print_team(team, args.json, "created")
    return 0


def cmd_teams_update(settings: Settings, args: argparse.Namespace) -> int:
    given = _given_limits(args)
    if not given:
        raise UsageError("nothing to change: give --rpm, --tpm, --budget or another limit")
    update = _validated(keys.TeamUpdate, given)
    team = _with_store(
        settings, lambda engine: keys.update_team(engine, args.team, update), "write"
    )
    _print_team(team, args.json, "updated")
    return 0


def cmd_teams_list(settings: Settings, args: argparse.Namespace) -> int:
    found = _with_store(settings, keys.list_teams)
    if args.json:
        sys.stdout.buffer.write(_json(found) + b"\n")
        return 0
    table = [("NAME", "KEYS", "RPM", "TPM", "BUDGET")]
    for team in found:
        rpm, tpm = _rate(team["rpm"], team["rpm_burst"]), _rate(team["tpm"], team["tpm_burst"])
        table.append((team["name"], str(team["keys"]), rpm, tpm, _budget(team)))
    _print_table(table)
    if not found:
        print("(no teams yet: llmsvc teams create NAME)")
    return 0


def cmd_teams_show(settings: Settings, args: argparse.Namespace) -> int:
    _print_team(_with_store(settings, lambda e: keys.show_team(e, args.team)), args.json, None)
    return 0


def _print_team(team: dict[str, Any], as_json: bool, done: str | None) -> None:
    if as_json:
        sys.stdout.buffer.write(_json({"team": team}) + b"\n")
        return
    if done is not None:
        print(f"team {team['name']} {done}")
    print(f"{'id:':12} {team['id']}")
    print(f"{'name:':12} {team['name']}")
    print(f"{'rpm:':12} {_rate(team['rpm'], team['rpm_burst'])}")
    print(f"{'tpm:':12} {_rate(team['tpm'], team['tpm_burst'])}")
    print(f"{'budget:':12} {_budget(team)}")
    if "keys" in team and isinstance(team["keys"], list):
        print(f"{'keys:':12} {', '.join(team['keys']) or '-'}")


def _rate(rate: int | None, burst: int | None) -> str:
    if rate is None:
        return "-"
    return f"{rate} (burst {burst})" if burst is not None else str(rate)


def _budget(row: dict[str, Any]) -> str:
    return "-" if row["budget"] is None else f"{row['budget']:g}/{row['budget_period']}"


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from llmsvc.daemon import Daemon  # the daemon's imports are only needed here
    from llmsvc.supervisor import Supervisor

    refusal = settings.open_relay()
    if refusal is not None:
        raise ConfigError(refusal)
    index = worker_index()
    if settings.workers > 1 and index is None:
        return Supervisor(settings).run()
    daemon = Daemon(settings, worker=index)
    code: int = anyio.run(daemon.run, backend_options={"use_uvloop": True})
    return code


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    async def migrate(engine: Any) -> tuple[str | None, str]:
        await upgrade_to_head(engine)
        return await schema_revision(engine)

    current, _head = _with_store(settings, migrate, "create")
    print(f"schema at revision {current} ({settings.redacted_database_url()})")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    pairs = []
    for pair in args.metadata:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--metadata {pair!r}: give it as KEY=VALUE")
        pairs.append((name, value))
    since = None if args.since is None else _since(args.since)
    given = (args.key, args.team, args.user, tuple(pairs), since, args.correlation_id)
    only = RequestFilter(*given, text=args.text or None)
    listing = _with_store(settings, lambda engine: recent_requests(engine, args.limit, only))
    rows = listing.rows
    if args.json:
        sys.stdout.buffer.write(_json(rows) + b"\n")
        _how_far(listing.searched)
        return 0
    head = ("CREATED (UTC)", "REQUEST ID", "MODEL", "PROVIDER", "KEY", "TEAM", "STATUS")
    table = [(*head, "TOKENS", "COST", "SECONDS")]
    for row in rows:
        tokens = f"{_count(row, 'prompt_tokens')}/{_count(row, 'completion_tokens')}"
        table.append(
            (
                _time(row["created_at"]),
                str(row["id"]),
                row["model"],
                row["provider"] or "-",
                _named(row["key_name"], row["key_id"]),
                _named(row["team_name"], row["team_id"]),
                row["status"],
                tokens,
                "-" if row["cost"] is None else f"{row['cost']:.6f}",
                _seconds(row["created_at"], row["ended_at"]),
            )
        )
    _print_table(table)
    if not rows:
        print("(no requests yet)")
    marks = "".join(_count(row, "prompt_tokens") + _count(row, "completion_tokens") for row in rows)
    for mark, meaning in MARKS.items():
        if mark in marks:
            print(f"{mark} {meaning}")
    if rows and any(row["cost"] is not None for row in rows):  # only with a price table
        total = sum(row["cost"] or 0 for row in rows)
        print(f"cost of these {len(rows)} requests: {total:.6f}")
    _how_far(listing.searched)
    return 0


def _how_far(searched: Searched | None) -> None:
    """After a search of replies, how far it read; on stderr, so --json prints rows alone."""
    if searched is None:
        return
    read = f"{searched.requests} requests"
    if searched.requests:
        read += f" created {_time(searched.oldest)} to {_time(searched.newest)} UTC"
    older = "older ones were not read" if searched.resume else "none older"
    print(f"searched the replies of {read}; {older}", file=sys.stderr)


def cmd_spend(settings: Settings, args: argparse.Namespace) -> int:
    since = None if args.since is None else _since(args.since)
    rows = _with_store(settings, lambda engine: spend(engine, args.by, since))
    if args.json:
        sys.stdout.buffer.write(_json(rows) + b"\n")
        return 0
    table = [(args.by.upper(), "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "COST")]
    for row in rows:
        group = row["group"]
        table.append(
            (
                _named(row["name"], group) if args.by in ("key", "team") else _plain(group),
                str(row["requests"]),
                str(row["prompt_tokens"]),
                str(row["completion_tokens"]),
                "-" if row["cost"] is None else f"{row['cost']:.6f}",
            )
        )
    _print_table(table)
    if not rows:
        print("(no requests)")
    return 0


def _since(text: str) -> datetime:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None


def _named(name: str | None, row_id: uuid.UUID | None) -> str:
    """A key or team as its name, or its id when it has no row (or `-` for none)."""
    return name or ("-" if row_id is None else str(row_id))


COUNTED, ESTIMATED, UNKNOWN = "*", "~", "?"
MARKS = {
    COUNTED: "counted by llmsvc with the model's tokenizer: the provider sent no usage",
    ESTIMATED: "estimated by llmsvc: a prompt with another model's vocabulary, or a reply "
    "as one token per delta stored",
    UNKNOWN: "not known: counted when the request ends, never when nothing was received",
}
SOURCE_MARKS = {TOKENIZER: COUNTED, ESTIMATE: ESTIMATED, DELTAS: ESTIMATED}


def _count(row: dict[str, Any], field: str) -> str:
    """A token count as `status` prints it, marked by how it was obtained. A reply not
    counted (yet) shows the deltas stored of it: never 0 for tokens the store holds."""
    if row[field] is None:
        stored = row["deltas_stored"] if field == "completion_tokens" else None
        return f"{stored}{ESTIMATED}" if stored else UNKNOWN
    return f"{row[field]}{SOURCE_MARKS.get(row[field + '_source'], '')}"


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    async def find(engine: Any) -> tuple[list[uuid.UUID], RequestDetail | None]:
        found = await find_requests(engine, args.id)
        return found, await request_detail(engine, found[0]) if len(found) == 1 else None

    found, detail = _with_store(settings, find)
    if not found:
        raise LlmsvcError(f"no request with the id or correlation id {args.id!r} in the store")
    if detail is None:
        raise UsageError(
            f"several requests were sent with the correlation id {args.id!r}: list them with "
            f"`llmsvc status --correlation-id {shlex.quote(args.id)}` and show one by its "
            "request id"
        )
    request = detail.request
    if not args.verbose:
        request = {k: v for k, v in request.items() if k not in ("messages", "params")}
    if args.json:
        doc = {
            "request": request,
            "attempts": [
                {**a, "text": detail.texts[a["id"]], "tool_calls": detail.tool_calls[a["id"]]}
                for a in detail.attempts
            ],
            "refused": detail.refused,
        }
        sys.stdout.buffer.write(_json(doc) + b"\n")
        return 0
    for key, value in request.items():
        if key in ("messages", "params"):
            continue
        print(f"{key + ':':18} {_plain(value)}")
    if args.verbose:
        print("params:            " + orjson.dumps(detail.request["params"]).decode())
        print("messages:")
        for message in detail.request["messages"]:
            print(f"  [{message.get('role')}] {_plain(message.get('content'))}")
    for attempt in detail.attempts:
        print(
            f"\nattempt {attempt['attempt_no']}: {attempt['provider']}/{attempt['model']} "
            f"{attempt['status']} tokens={attempt['token_count']} "
            f"http={attempt['http_status'] or '-'} stop={stopped(attempt) or '-'}"
        )
        if attempt["error_message"]:
            print(f"  error: {attempt['error_code']}: {attempt['error_message']}")
        print("  reply:")
        print("    " + detail.texts[attempt["id"]].replace("\n", "\n    "))
        for call in detail.tool_calls[attempt["id"]]:
            print(f"  tool call: {call['name']}({call['arguments']}) id={call['id']}")
    for letter in detail.refused:
        print(
            f"\nrefused by the database: WAL record {letter['lsn']} ({letter['record_type']}), "
            f"{letter['outcome'].replace('_', ' ')}: {letter['reason']}"
        )
    return 0


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when consistent, 1 when a problem remains; every run is stored."""
    if args.history:
        runs = _with_store(
            settings, lambda engine: history(engine, ("check", "gap-scan"), args.limit)
        )
        if args.json:
            sys.stdout.buffer.write(_json(runs) + b"\n")
            return 0
        for run in runs:
            problems = run["found"].get("problems", [])
            refilled = (run["repaired"] or {}).get("refilled", [])
            print(
                f"{_time(run['started_at'])}  {run['job']:9} {run['status']:8}  "
                f"problems={len(problems)}  refilled={len(refilled)}"
            )
            for problem in problems:
                print(f"    {problem}")
        if not runs:
            print("(no check runs yet)")
        return 0

    async def check(engine: Any) -> tuple[consistency.Report, dict[str, Any]]:
        started = datetime.now(UTC)
        if args.acknowledge:
            acknowledged = await acknowledge_dead_letters(engine)
        report, repaired = await consistency.check_and_repair(engine, settings.wal_dir)
        await record_run(engine, "check", None, started, consistency.as_result(report, repaired))
        if args.acknowledge:
            repaired["acknowledged"] = acknowledged
        return report, repaired

    report, repaired = _with_store(settings, check, "write")
    if args.json:
        sys.stdout.buffer.write(_json({**report.as_dict(), "repaired": repaired}) + b"\n")
    else:
        if args.acknowledge:
            print(f"acknowledged:    {repaired['acknowledged']} refused records")
        current, head = report.schema
        print(f"schema:          {current} (code expects {head})")
        if report.wal is not None:
            wal = report.wal
            running = "running" if wal.daemon_running else "not running"
            print(f"wal:             {wal.segments} segments, last LSN {wal.last_lsn}")
            damaged, kept = len(wal.damage), len(wal.quarantined)
            print(f"wal damage:      {damaged} segments damaged, {kept} files in quarantine")
            print(f"checkpoint:      {wal.checkpoint} (backlog {wal.backlog}; daemon {running})")
        print(f"open requests:   {report.open_requests}")
        print(f"token gaps:      {len(report.gaps)} attempts")
        print(f"count mismatch:  {len(report.mismatches)} attempts")
        print(f"refused records: {len(report.refused)} not acknowledged")
        for r in repaired.get("refilled", []):
            seqs = consistency.format_ranges(r["seqs"])
            print(f"refilled:        attempt {r['attempt_id']} seqs {seqs} ({r['rows']} rows)")
        print("consistent" if report.ok else "PROBLEMS:")
        for problem in report.problems:
            print(f"  - {problem}")
    return 0 if report.ok else EXIT_FAILURE


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    runs = _with_store(settings, last_runs)
    now = datetime.now().astimezone()
    jobs = []
    for name, schedule in schedules(settings).items():
        last = runs.get(name, {}).get("last")
        last_ok = runs.get(name, {}).get("last_ok")
        jobs.append(
            {
                "job": name,
                "schedule": schedule,
                "next_run": next_run(schedule, now),
                "last_run": last and last["started_at"],
                "last_status": last and last["status"],
                "last_error": last and last["error"],
                "last_ok": last_ok and last_ok["started_at"],
            }
        )
    if args.json:
        sys.stdout.buffer.write(_json(jobs) + b"\n")
        return 0
    table = [("JOB", "SCHEDULE", "NEXT RUN (UTC)", "LAST RUN (UTC)", "STATUS", "LAST OK (UTC)")]
    for job in jobs:
        table.append(
            (
                job["job"],
                job["schedule"] or "(by hand only)",
                _time(job["next_run"]),
                _time(job["last_run"]),
                job["last_status"] or "-",
                _time(job["last_ok"]),
            )
        )
    _print_table(table)
    return 0


def cmd_job_run(settings: Settings, args: argparse.Namespace) -> int:
    instance = _local_instance(settings)
    own = args.name in INSTANCE_JOBS and instance is not None  # locked as the daemon's runs are
    return _run_by_hand(
        settings,
        args,
        args.name,
        lambda engine: job_table(settings, engine, instance)[args.name],
        instance=instance if own else None,
    )


def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    cutoff = None
    if args.older_than is not None:
        if not 0 <= args.older_than <= retention.MAX_DAYS:
            raise UsageError(
                f"--older-than must be 0..{retention.MAX_DAYS} (days; 0: all that has ended)"
            )
        cutoff = datetime.now(UTC) - timedelta(days=args.older_than)
    elif args.before is not None:
        try:
            cutoff = retention.parse_before(args.before)
        except ValueError as exc:
            raise UsageError(f"--before: {exc}") from None
    return _run_by_hand(
        settings, args, "prune", lambda engine: prune_job(settings, engine, cutoff, args.dry_run)
    )


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    return _run_by_hand(settings, args, "backup", lambda engine: backup_job(settings, engine))


def cmd_backups(settings: Settings, args: argparse.Namespace) -> int:
    found = backup.list_backups(settings.backup_dir) if settings.backup_dir.is_dir() else []
    if args.json:
        sys.stdout.buffer.write(_json([asdict(b) for b in found]) + b"\n")
        return 0
    table = [("FILE", "CREATED (UTC)", "SIZE", "VERIFIED")]
    for b in found:
        created = _time(datetime.fromisoformat(b.created))
        table.append((b.name, created, f"{b.size:,}", "yes" if b.verified else f"NO {b.error}"))
    _print_table(table)
    if not found:
        print(f"(no backups in {settings.backup_dir})")
    return 0


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    """A refusal (a daemon uses the database) is a usage error, not a run: nothing was tried."""
    try:
        backup.backup_path(settings.backup_dir, args.file)
    except BackupError as exc:
        raise UsageError(str(exc)) from None

    async def restore(engine: Any) -> JobResult | None:
        async with backup.exclusive(engine, settings.wal_dir, args.force) as replay:
            job = restore_job(settings, engine, args.file, replay)
            return await run_job(engine, "restore", job, None)

    try:
        result = _with_store(settings, restore, "create")
    except backup.RestoreRefused as exc:
        raise UsageError(str(exc)) from None
    return _print_run(args, "restore", result)


def _run_by_hand(
    settings: Settings,
    args: argparse.Namespace,
    name: str,
    make: Callable[[Any], Job],
    access: Access = "write",
    instance: uuid.UUID | None = None,
) -> int:
    """Run a job now, stored like a scheduled run; exit 1 unless it ended ok.

    With `instance`, the job is that instance's own (its WAL) and takes its lock.
    """
    result = _with_store(
        settings,
        lambda engine: run_job(
            engine, name, make(engine), instance, own_instance=instance is not None
        ),
        access,
    )
    return _print_run(args, name, result)


def _print_run(args: argparse.Namespace, name: str, result: JobResult | None) -> int:
    """A run by hand as the operator reads it; exit 1 unless it ended ok."""
    assert result is not None  # only a scheduled run can find its slot taken
    if args.json:
        sys.stdout.buffer.write(_json(asdict(result)) + b"\n")
    else:
        figures = "".join(
            f"  {label}={value:,}"
            for label, value in (("rows", result.rows), ("bytes", result.bytes))
            if value is not None
        )
        print(f"{name}: {result.status}{figures}")
        for key, value in {**result.found, **result.repaired}.items():
            print(f"  {key}: {_plain(value)}")
        if result.error:
            print(f"  error: {result.error}")
    return 0 if result.status == "ok" else EXIT_FAILURE


def _local_instance(settings: Settings) -> uuid.UUID | None:
    """This host's WAL instance id, if it has a WAL (read, never created)."""
    return read_instance_id(settings.wal_dir)


def _print_table(table: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def cmd_wal_verify(settings: Settings, args: argparse.Namespace) -> int:
    checks = verify_log(settings.wal_dir)
    if args.json:
        sys.stdout.buffer.write(_json([asdict(c) for c in checks]) + b"\n")
    else:
        for c in checks:
            state = c.problem or "ok"
            print(
                f"{c.name}  first LSN {c.first_lsn}  {c.records} records  {c.bytes} bytes  {state}"
            )
        if not checks:
            print(f"(no segments in {settings.wal_dir})")
    return EXIT_FAILURE if any(c.problem for c in checks) else 0


def cmd_wal_dump(settings: Settings, args: argparse.Namespace) -> int:
    if args.start < 1 or args.limit < 1:
        raise UsageError("--from and --limit must be at least 1")
    instance = read_instance_id(settings.wal_dir)
    if instance is None:
        raise LlmsvcError(f"no WAL in {settings.wal_dir}")

    async def read() -> list[tuple[int, bytes]]:
        reader = WalReader(settings.wal_dir, instance)
        try:
            await reader.seek(args.start)
            return await reader.read(None, args.limit)
        finally:
            await reader.close()

    for lsn, (rtype, payload) in enumerate(asyncio.run(read()), start=args.start):
        kind = RecordType(rtype).name.lower()
        if rtype == RecordType.TOKEN:
            attempt, seq, text, ts_us = decode_token(payload)
            body: dict[str, Any] = {
                "attempt_id": str(uuid.UUID(bytes=attempt)),
                "seq": seq,
                "ts": ts_us,
                "text": text,
            }
        else:
            body = decode_json(payload)
        if args.json:
            sys.stdout.buffer.write(orjson.dumps({"lsn": lsn, "type": kind, **body}) + b"\n")
        else:
            print(f"{lsn:>10}  {kind:<13}  {orjson.dumps(body).decode()}")
    return 0


def _with_store(
    settings: Settings, work: Callable[[Any], Awaitable[Any]], access: Access = "read"
) -> Any:
    """Run one store operation; database failures become one readable line.

    Only `create` (migrate, restore) may make a store: any other command needs one
    holding llmsvc's schema, and one that reads opens it read-only.
    """
    path = sqlite_path(settings.database_url)
    if access != "create" and path is not None and not path.is_file():
        raise _no_llmsvc_data(settings, "no such file")

    async def go() -> Any:
        engine = create_engine(settings.database_url, access=access)
        try:
            if access != "create" and (await schema_revision(engine))[0] is None:
                raise _no_llmsvc_data(settings, "no llmsvc schema in it")
            return await work(engine)
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            raise LlmsvcError(
                f"database {settings.redacted_database_url()} failed: {describe_error(exc)}"
            ) from None
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _no_llmsvc_data(settings: Settings, why: str) -> ConfigError:
    """A store without llmsvc's tables: most likely not the daemon's, so say where it looked."""
    config = os.environ.get("LLMSVC_CONFIG")
    given = f"here {config}" if config else "here not set"
    return ConfigError(
        f"the store {settings.redacted_database_url()} holds no llmsvc data ({why}). "
        "The llmsvc command reads the same settings as the daemon: LLMSVC_* variables such "
        f"as LLMSVC_DATABASE_URL, and the file LLMSVC_CONFIG names ({given}); run it with "
        "the daemon's. If this is the store you mean, `llmsvc migrate` or starting the "
        "daemon creates it."
    )


def _json(value: Any) -> bytes:
    """JSON for rows: SQLAlchemy's key type and asyncpg's UUID type need telling apart;
    SQLite's times come back naive, in UTC."""
    return orjson.dumps(
        value,
        option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_NAIVE_UTC,
        default=_json_default,
    )


def _json_default(value: Any) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot print {type(value).__name__} as JSON")


def _time(value: datetime | None) -> str:
    """A time in a table, whose header says (UTC)."""
    return utc(value).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _seconds(start: datetime | None, end: datetime | None) -> str:
    if not start or not end:
        return "-"
    return f"{(utc(end) - utc(start)).total_seconds():.2f}"


def _plain(value: Any) -> str:
    if isinstance(value, datetime):
        return utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    if isinstance(value, list | dict):
        return orjson.dumps(value).decode()
    return "-" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
