"""A real PostgreSQL for the test suite.

Project rule: storage tests run against a real server over a real connection, never a
mock, and never skip silently. This module decides where that server comes from:

* ``LLMSVC_TEST_DATABASE_URL=postgresql://user@host:port/db``: use an existing server
  (the role needs CREATEDB; every test gets its own database there).
* ``LLMSVC_TEST_POSTGRES=skip``: the one explicit opt-out; PostgreSQL tests are reported
  as skipped with :data:`SKIP_REASON`.
* otherwise: start a throwaway cluster (:class:`PostgresCluster`) from the PostgreSQL
  server binaries on this machine, on a free port of 127.0.0.1, and delete it afterwards.
  It never touches a system cluster on 5432.

:class:`PostgresCluster` is also usable on its own, so outage tests can stop and start a
server of their own without disturbing the session's.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

URL_ENV = "LLMSVC_TEST_DATABASE_URL"
MODE_ENV = "LLMSVC_TEST_POSTGRES"

SKIP_REASON = (
    f"PostgreSQL tests skipped on request ({MODE_ENV}=skip); unset it to run them "
    "against a throwaway PostgreSQL cluster"
)

HOW_TO_PROVIDE = (
    "The tests need a real PostgreSQL server. Provide one of: "
    "(1) the PostgreSQL server binaries (initdb, pg_ctl), e.g. "
    "`sudo apt-get install postgresql` on Debian/Ubuntu (scripts/test does this itself "
    "when run as root), found in /usr/lib/postgresql/*/bin or on PATH, and a throwaway "
    "cluster is started on a free port of 127.0.0.1 and deleted afterwards; "
    f"(2) {URL_ENV}=postgresql://user@host:port/db pointing at a server you run, whose "
    "role may CREATE DATABASE (each test gets a fresh database there); "
    f"(3) {MODE_ENV}=skip to opt out explicitly: PostgreSQL tests are then reported as "
    "skipped."
)

StopMode = Literal["smart", "fast", "immediate"]

# The OS user that owns the cluster when we run as root (initdb/postgres refuse root).
_PG_OS_USER = "postgres"
_SUPERUSER = "postgres"
_START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL could be found or started; the message says how to provide one."""


def opted_out() -> bool:
    """Whether the developer explicitly opted out of PostgreSQL tests.

    Any other non-empty value is rejected, so a typo cannot silently turn tests off.
    """
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode in ("", "auto"):
        return False
    if mode == "skip":
        return True
    raise PostgresUnavailable(f"{MODE_ENV}={mode!r} is not understood; use 'skip' or unset it.")


def find_bindir() -> Path | None:
    """Directory holding initdb and pg_ctl: newest /usr/lib/postgresql/N/bin, else PATH."""
    candidates: list[tuple[int, Path]] = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        version = bindir.parent.name
        if version.isdigit() and _has_server_binaries(bindir):
            candidates.append((int(version), bindir))
    if candidates:
        return max(candidates)[1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        bindir = Path(pg_ctl).resolve().parent
        if _has_server_binaries(bindir):
            return bindir
    return None


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_dbname(prefix: str = "llmsvc_test") -> str:
    """A database name no other test (or concurrent run) will pick."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def with_dbname(url: str, dbname: str) -> str:
    """``url`` with its database (the path) replaced by ``dbname``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


def asyncpg_url(url: str) -> str:
    """Normalise ``postgres://`` / ``postgresql+asyncpg://`` to what asyncpg accepts."""
    return re.sub(r"^postgres(ql)?(\+asyncpg)?://", "postgresql://", url)


def sqlalchemy_url(url: str) -> str:
    """The SQLAlchemy spelling of a PostgreSQL URL, pinned to the asyncpg driver."""
    return re.sub(r"^postgresql://", "postgresql+asyncpg://", asyncpg_url(url))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresServer:
    """A server the tests may create and drop databases in; ``url`` gives asyncpg URLs."""

    admin_dbname = "postgres"

    def url(self, dbname: str = "postgres") -> str:
        """asyncpg URL (``postgresql://...``) of database ``dbname`` on this server."""
        raise NotImplementedError

    async def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its asyncpg URL."""
        conn = await asyncpg.connect(self.url(self.admin_dbname), timeout=10)
        try:
            await conn.execute(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0")
        finally:
            await conn.close()
        return self.url(name)

    async def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting stragglers (code under test may leak a pool)."""
        conn = await asyncpg.connect(self.url(self.admin_dbname), timeout=10)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
        finally:
            await conn.close()

    async def check(self) -> str:
        """Connect once and return ``server_version``, so a bad URL fails up front."""
        conn = await asyncpg.connect(self.url(self.admin_dbname), timeout=10)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    def describe(self) -> str:
        """One line for the pytest header saying which server the tests use."""
        raise NotImplementedError


class ExternalPostgres(PostgresServer):
    """A server the developer runs, named by ``LLMSVC_TEST_DATABASE_URL``."""

    def __init__(self, url: str) -> None:
        if not re.match(r"^postgres(ql)?(\+asyncpg)?://", url):
            raise PostgresUnavailable(
                f"{URL_ENV} must be a postgresql:// URL, got {url!r}. {HOW_TO_PROVIDE}"
            )
        self._base = asyncpg_url(url)
        self.admin_dbname = urlsplit(self._base).path.lstrip("/") or "postgres"

    def url(self, dbname: str = "postgres") -> str:
        return with_dbname(self._base, dbname)

    def describe(self) -> str:
        parts = urlsplit(self._base)
        return f"{URL_ENV} ({parts.hostname}:{parts.port or 5432})"


class PostgresCluster(PostgresServer):
    """A throwaway PostgreSQL cluster in its own temp dir, on its own port.

    Tuned for tests (fsync off, trust auth, TCP on 127.0.0.1 only, socket in the temp
    dir). synchronous_commit stays on: with it off, ``stop("immediate")`` loses commits,
    which would make crash/outage tests of the journal lie. Stopping and starting keeps the
    data and the port, so outage tests can take the server away and bring the same one
    back. ``cleanup()`` stops it and deletes everything; as a context manager it does
    start/cleanup.
    """

    def __init__(self, bindir: Path | None = None, port: int | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise PostgresUnavailable(
                "No PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin "
                f"or on PATH. {HOW_TO_PROVIDE}"
            )
        self.bindir = found
        self.port = port or free_port()
        self.base_dir: Path | None = None
        self._port_chosen = port is not None
        self._ever_started = False
        self.running = False
        self.startup_seconds: float | None = None  # initdb + first start, for reports

    # -- paths ---------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base()

    @property
    def log_file(self) -> Path:
        return self._base() / "postgres.log"

    def _base(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("cluster has no directory yet; call start() first")
        return self.base_dir

    # -- lifecycle -----------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def describe(self) -> str:
        took = f", started in {self.startup_seconds:.2f}s" if self.startup_seconds else ""
        return f"throwaway cluster from {self.bindir} on 127.0.0.1:{self.port}{took}"

    def start(self) -> None:
        """initdb on first use, then start the server and wait until it accepts clients.

        On the very first start a port taken in the meantime is retried with a new one;
        later starts keep the port so URLs handed out stay valid.
        """
        if self.running:
            return
        began = time.monotonic()
        if self.base_dir is None:
            self._init()
        attempts = 1 if (self._ever_started or self._port_chosen) else 3
        for attempt in range(attempts):
            try:
                self._pg_ctl_start()
                break
            except PostgresUnavailable:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
        if not self._ever_started:
            self.startup_seconds = time.monotonic() - began
        self._ever_started = True
        self.running = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``immediate`` = crash-like, no shutdown checkpoint)."""
        if not self.running:
            return
        self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"])
        self.running = False

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP every process of the server for the block: a stall, not a crash.

        Connections stay open and connecting still succeeds at the TCP level,
        but nothing answers, as with a storage freeze or a partition without a
        reset. SIGCONT comes whatever happens in the block.
        """
        pids = self.pids()  # the postmaster first: stopped, it forks no new backend
        try:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # a backend that ended since
                    os.kill(pid, signal.SIGSTOP)
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def pids(self) -> list[int]:
        """The postmaster (first line of postmaster.pid) and its children."""
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                # the fields after the command name, which may hold spaces: state, ppid, ...
                if int(stat.read_text().rpartition(")")[2].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def cleanup(self) -> None:
        """Stop immediately and delete the cluster's directory; safe to call twice."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- internals -----------------------------------------------------------------
    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _init(self) -> None:
        # Our own dir under /tmp, not pytest's tmp_path: the postgres OS user must be
        # able to reach it, and the socket path must stay under ~100 characters.
        base = Path(tempfile.mkdtemp(prefix="llmsvc-pg-"))
        self.base_dir = base
        try:
            if os.geteuid() == 0:
                try:
                    owner = pwd.getpwnam(_PG_OS_USER)
                except KeyError:
                    raise PostgresUnavailable(
                        f"Running as root, but there is no '{_PG_OS_USER}' OS user to run "
                        f"PostgreSQL as (initdb refuses root). {HOW_TO_PROVIDE}"
                    ) from None
                os.chown(base, owner.pw_uid, owner.pw_gid)
            self._run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    _SUPERUSER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ]
            )
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{self.socket_dir}'",
                "fsync": "off",
                "full_page_writes": "off",
                "max_connections": "200",
                "logging_collector": "off",
            }
            with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
                conf.write("\n# llmsvc tests\n")
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            self.base_dir = None
            raise

    def _pg_ctl_start(self) -> None:
        cmd = [
            self._bin("pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            f"-p {self.port}",
            "-w",
            "-t",
            str(_START_TIMEOUT_S),
            "start",
        ]
        try:
            self._run(cmd)
        except PostgresUnavailable as exc:
            # A half-started postmaster must not outlive us.
            with contextlib.suppress(PostgresUnavailable):
                self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", "i", "stop"])
            raise PostgresUnavailable(f"{exc}\n--- server log ---\n{self._log_tail()}") from None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _run(self, cmd: list[str]) -> None:
        """Run a PostgreSQL tool, as the postgres OS user when we are root."""
        if os.geteuid() == 0:
            if shutil.which("runuser"):
                cmd = ["runuser", "-u", _PG_OS_USER, "--", *cmd]
            else:
                cmd = ["su", _PG_OS_USER, "-s", "/bin/sh", "-c", shlex.join(cmd)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                cwd=self.base_dir or "/",
                timeout=_START_TIMEOUT_S + 30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{shlex.join(cmd)} failed: {exc}. {HOW_TO_PROVIDE}") from exc
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()
            raise PostgresUnavailable(
                f"{shlex.join(cmd)} exited {proc.returncode}: {output}\n{HOW_TO_PROVIDE}"
            )


def session_server() -> PostgresServer:
    """The server for the whole test session: external URL, or a started cluster.

    The caller must ``cleanup()`` a returned :class:`PostgresCluster`. Raises
    :class:`PostgresUnavailable` (with instructions) if neither works.
    """
    url = os.environ.get(URL_ENV, "").strip()
    if url:
        server: PostgresServer = ExternalPostgres(url)
        try:
            asyncio.run(server.check())
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise PostgresUnavailable(
                f"Cannot connect to {server.describe()}: {exc!r}. {HOW_TO_PROVIDE}"
            ) from exc
        return server
    cluster = PostgresCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.cleanup()
        raise
    atexit.register(cluster.cleanup)  # in case pytest dies before fixture teardown
    return cluster


def describe_source() -> str:
    """Where PostgreSQL will come from, decided from the environment without starting it."""
    try:
        if opted_out():
            return f"SKIPPED ({MODE_ENV}=skip)"
    except PostgresUnavailable as exc:
        return f"misconfigured: {exc}"
    if os.environ.get(URL_ENV, "").strip():
        return f"existing server from {URL_ENV}"
    bindir = find_bindir()
    if bindir is None:
        return "no server binaries found: PostgreSQL tests will error"
    return f"throwaway cluster from {bindir}"
