"""`workers = N`: one supervisor process keeping N daemon workers behind one port.

Boot: WAL dir locked → store migrated once (workers never race on DDL) → WALs
no worker owns replayed → port held → workers started → `READY=1` to systemd
once every worker is ready. Worker k is `llmsvc run` with its own WAL under
`wal_dir/worker-<k>` (so its own instance id) and metrics on
`metrics_port + k`; see `config.worker_environment` and `Daemon._start_metrics`.

Workers report READY / WATCHDOG / STOPPING to the supervisor over the
sd_notify protocol, each on a datagram socket of its own here; only the
supervisor speaks to systemd. A worker that dies is started again after a
backoff; its replacement locks the same WAL and replays it. A worker that
stops pinging its watchdog is killed, and so replaced.

SIGTERM / SIGINT: forwarded to every worker; the supervisor waits for all to
drain and exits 0, or 1 if one did not exit cleanly. A second signal is
forwarded too: the workers exit at once, as a single daemon does, and so
(exit 1) does the supervisor once they are gone.
A worker that fails before all were first ready is a boot failure: the others
are stopped and the supervisor exits 1, as a single daemon's boot would.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from llmsvc.config import Settings, systemd_environment, worker_environment, worker_wal_dir
from llmsvc.errors import LlmsvcError
from llmsvc.maintenance.backup import replay_wal
from llmsvc.maintenance.retention import ensure_partitions
from llmsvc.store.engine import create_engine, migrate
from llmsvc.systemd import Notifier
from llmsvc.wal.segment import INSTANCE_FILE, WalLock

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
CYCLE_SECONDS = 0.2  # how often the loop looks at its workers
RESTART_BACKOFF = (0.5, 30.0)  # first and longest pause before starting a dead worker again
STABLE_SECONDS = 60.0  # a worker that served this long before dying restarts without delay
# A worker's own drain is bounded by shutdown_grace_seconds, then the HTTP server (10 s),
# the WAL drain (30 s) and running jobs (5 s): past all of these it is killed.
DRAIN_MARGIN_SECONDS = 60.0
HURRY_SECONDS = 5.0  # after a second signal: how long workers get to exit before they are killed
PR_SET_PDEATHSIG = 1


def shared_port_socket(host: str, port: int, listen: bool) -> socket.socket:
    """A SO_REUSEPORT TCP socket on host:port: the kernel spreads connections across workers.

    Each worker listens on its own (one accept queue each, no thundering herd);
    the supervisor only binds one, to hold the port and learn it when it is 0.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(2048)
            sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Worker:
    """One worker slot: its index, its notify socket, and the process now in it."""

    index: int
    notify: socket.socket
    notify_path: str
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready: bool = False
    ever_ready: bool = False
    last_ping: float = 0.0
    restart_at: float | None = None
    backoff: float = RESTART_BACKOFF[0]

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        notify_socket, self.watchdog_usec = systemd_environment()
        self.notifier = Notifier(notify_socket, self.watchdog_usec)
        self.lock = WalLock(settings.wal_dir)
        self.workers: list[Worker] = []
        self.signals = 0
        self.announced = False
        self.failed: str | None = None  # why the boot failed
        self.last_watchdog = 0.0
        self._signal = signal.SIGTERM  # the first signal received, forwarded to the workers

    def run(self) -> int:
        """Boot, keep the workers running until a signal, drain them; return the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.lock.acquire()
        runtime = tempfile.mkdtemp(prefix="llmsvc-")
        try:
            self._prepare_store()
            self.holder = self._hold_port()
            self.port: int = self.holder.getsockname()[1]
            log.info("boot: port held host=%s port=%d", self.settings.host, self.port)
            for index in range(self.settings.workers):
                self.workers.append(self._slot(index, runtime))
            for worker in self.workers:
                if not self.signals:  # a signal during the migration stops the boot here
                    self._start(worker)
            while not self.signals and self.failed is None:
                self._cycle()
            return self._shutdown()
        finally:
            for worker in self.workers:
                worker.notify.close()
            if hasattr(self, "holder"):
                self.holder.close()
            shutil.rmtree(runtime, ignore_errors=True)
            self.notifier.close()
            self.lock.release()

    def _prepare_store(self) -> None:
        """Migrate once, and replay WALs no worker owns (a change of `workers` left them)."""
        self.notifier.status("booting: migrating the database")

        async def prepare() -> None:
            engine = create_engine(self.settings.database_url)
            try:
                await migrate(engine, self.settings.redacted_database_url())
                await ensure_partitions(engine, self.settings.token_partition_ahead_days)
                for wal_dir in self._orphaned_wal_dirs():
                    # wal_dir itself is locked already; a former worker's WAL is locked here
                    lock = WalLock(wal_dir) if wal_dir != self.settings.wal_dir else None
                    if lock is not None:
                        lock.acquire()
                    try:
                        replayed = await replay_wal(engine, wal_dir)
                    finally:
                        if lock is not None:
                            lock.release()
                    log.info("boot: wal no worker owns replayed dir=%s %s", wal_dir, replayed)
            finally:
                await engine.dispose()

        asyncio.run(prepare())

    def _hold_port(self) -> socket.socket:
        host, port = self.settings.host, self.settings.port
        try:
            return shared_port_socket(host, port, listen=False)
        except OSError as exc:
            raise LlmsvcError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}: in use, or not an "
                "address here)"
            ) from None

    def _orphaned_wal_dirs(self) -> list[Path]:
        """wal_dir's own WAL (from workers = 1) and those of workers beyond `workers`."""
        wal_dir, workers = self.settings.wal_dir, self.settings.workers
        found = [wal_dir] if (wal_dir / INSTANCE_FILE).exists() else []
        for path in sorted(wal_dir.glob("worker-*")):
            index = path.name.removeprefix("worker-")
            if index.isdigit() and int(index) >= workers and (path / INSTANCE_FILE).exists():
                found.append(path)
        return found

    def _slot(self, index: int, runtime: str) -> Worker:
        path = os.path.join(runtime, f"worker-{index}.notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        sock.setblocking(False)
        worker_wal_dir(self.settings.wal_dir, index).mkdir(mode=0o700, exist_ok=True)
        return Worker(index, sock, path)

    def _start(self, worker: Worker) -> None:
        env = worker_environment(
            self.settings, worker.index, self.port, worker.notify_path, self.watchdog_usec
        )
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "llmsvc", "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            process_group=0,  # a terminal's Ctrl-C reaches the supervisor only; it forwards
            preexec_fn=_die_with_parent,  # safe: the supervisor runs no threads
        )
        worker.started, worker.ready, worker.restart_at = time.monotonic(), False, None
        log.info("%s started pid=%d", worker.name, worker.proc.pid)

    def _cycle(self) -> None:
        """One turn: read the workers' notifications, reap and restart, tell systemd."""
        readable, _, _ = select.select([w.notify for w in self.workers], [], [], CYCLE_SECONDS)
        now = time.monotonic()
        for worker in self.workers:
            if worker.notify in readable:
                self._read_notifications(worker, now)
            if worker.proc is not None and (code := worker.proc.poll()) is not None:
                self._exited(worker, code, now)
            elif worker.proc is None and worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)
            elif worker.ready and self.watchdog_usec:
                self._check_watchdog(worker, now)
        if not self.announced and all(w.ready for w in self.workers):
            self.announced = True
            host, n = self.settings.host, len(self.workers)
            log.info("ready host=%s port=%d workers=%d", host, self.port, n)
            self.notifier.ready(f"serving on {host}:{self.port} with {n} workers")
        interval = self.notifier.watchdog_interval
        if self.announced and interval is not None and now - self.last_watchdog >= interval:
            self.notifier.watchdog()
            self.last_watchdog = now

    def _read_notifications(self, worker: Worker, now: float) -> None:
        while True:
            try:
                data = worker.notify.recv(4096)
            except BlockingIOError:
                return
            lines = data.decode(errors="replace").splitlines()
            if "READY=1" in lines:
                worker.ready = worker.ever_ready = True
                worker.last_ping = now
                log.info("%s ready%s", worker.name, " again" if self.announced else "")
            if "WATCHDOG=1" in lines:
                worker.last_ping = now
            if "STOPPING=1" in lines:
                worker.ready = False

    def _exited(self, worker: Worker, code: int, now: float) -> None:
        """A worker died: fail the boot if it never served, else start it again after a pause."""
        worker.proc, worker.ready = None, False
        how = f"signal={-code}" if code < 0 else f"code={code}"
        if not self.announced and not worker.ever_ready:
            log.error("boot: %s exited before it was ready %s; stopping", worker.name, how)
            self.failed = f"{worker.name} failed to boot"
            return
        if now - worker.started >= STABLE_SECONDS:
            worker.backoff = RESTART_BACKOFF[0]
        worker.restart_at = now + worker.backoff
        log.warning("%s exited %s; starting it again in %.1f s", worker.name, how, worker.backoff)
        worker.backoff = min(worker.backoff * 2, RESTART_BACKOFF[1])

    def _check_watchdog(self, worker: Worker, now: float) -> None:
        """Kill a worker silent for a whole watchdog period, as systemd would kill a daemon."""
        assert self.watchdog_usec is not None
        assert worker.proc is not None
        if now - worker.last_ping > self.watchdog_usec / 1e6:
            log.error("%s stopped pinging its watchdog; killing it", worker.name)
            worker.proc.kill()
            worker.ready = False

    def _shutdown(self) -> int:
        """Forward the stop to every worker and wait for each to drain (bounded).

        After a second signal (forwarded by `_on_signal`) the workers exit at
        once; they get HURRY_SECONDS to, so the next start finds their WALs unlocked.
        """
        self.notifier.stopping("stopping: workers finishing open requests")
        running = [w for w in self.workers if w.proc is not None]
        for worker in running:
            assert worker.proc is not None
            worker.proc.send_signal(signal.SIGTERM if self.failed else self._signal)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + DRAIN_MARGIN_SECONDS
        clean = self.failed is None
        while running:
            time.sleep(CYCLE_SECONDS / 2)
            if self.signals > 1:
                deadline = min(deadline, time.monotonic() + HURRY_SECONDS)
                clean = False
            for worker in list(running):
                assert worker.proc is not None
                if time.monotonic() > deadline and worker.proc.poll() is None:
                    log.error("shutdown: %s did not exit in time; killing it", worker.name)
                    worker.proc.kill()
                    worker.proc.wait()
                if (code := worker.proc.poll()) is not None:
                    running.remove(worker)
                    clean = clean and code == 0
                    log.info("shutdown: %s exited code=%d", worker.name, code)
        for worker in self.workers:
            if worker.proc is None and worker.ever_ready:
                log.warning("shutdown: %s was down; its next start replays its WAL", worker.name)
        code = EXIT_OK if clean else EXIT_FATAL
        log.info("shutdown: done exit_code=%d", code)
        return code

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """First signal: stop (the loop sees the flag). Second: pass it on, so all exit now."""
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            self._signal = signal.Signals(signum)
            log.info("%s received: stopping the workers", name)
            return
        log.warning("second %s: workers exit now; their WALs keep what was journaled", name)
        for worker in self.workers:
            if worker.proc is not None:
                worker.proc.send_signal(signum)


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM it (a drain) if the supervisor dies unannounced."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
