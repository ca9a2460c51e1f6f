"""`workers = N`: one supervisor process keeping N daemon workers behind one port.

Boot: WAL dir locked → workers a crashed supervisor left holding their WALs
stopped → WALs no worker owns replayed (bounded: with the database away, later)
→ port held → workers started → `READY=1` to systemd once every worker is
ready. The supervisor needs the database only for those WALs: each worker
migrates the store itself (serialized by a lock) while it already serves, as
any daemon does (`llmsvc.catchup`). Worker k is `llmsvc run` with its own WAL
under `wal_dir/worker-<k>` (so its own instance id) and metrics on
`metrics_port + k`; see `config.worker_environment` and `serving.start_metrics`.

Workers report READY / WATCHDOG / STOPPING to the supervisor over the
sd_notify protocol, each on a datagram socket of its own here (in the abstract
namespace, so a crash leaves no file behind; a message counts only if its
sender's credentials say it is that worker); only the supervisor speaks to
systemd. A worker that dies is started again after a backoff; its replacement
locks the same WAL and replays it. A worker that stops pinging its watchdog is
killed, and so replaced: it pings while its event loop and WAL work, whatever
the database does.

SIGTERM / SIGINT: forwarded to every worker; the supervisor waits for all to
drain and exits 0, or 1 if one did not exit cleanly (one the signal itself
killed was still booting, before its handlers: that is clean). A second signal is
forwarded too: the workers exit at once, as a single daemon does, and so
(exit 1) does the supervisor once they are gone.
A worker that fails before all were first ready is a boot failure: the others
are stopped and the supervisor exits 1, as a single daemon's boot would. Its
last log line, like a daemon's, says the exit code and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from llmsvc import private
from llmsvc.config import (
    WORKER_INDEX_VARIABLE,
    Settings,
    systemd_environment,
    worker_environment,
    worker_wal_dir,
)
from llmsvc.errors import LlmsvcError
from llmsvc.lifetime import die_with_parent
from llmsvc.logs import logger
from llmsvc.serving import shared_port_socket
from llmsvc.siblings import UCRED, sender
from llmsvc.status import why
from llmsvc.store.engine import create_engine, migrate
from llmsvc.store.replay import replay_wal
from llmsvc.systemd import Notifier
from llmsvc.wal import WalLock, lock_holder, read_instance_id

log = logger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
CYCLE_SECONDS = 0.2  # how often the loop looks at its workers
RESTART_BACKOFF = (0.5, 30.0)  # first and longest pause before starting a dead worker again
STABLE_SECONDS = 60.0  # a worker that served this long before dying restarts without delay
KILL_MARGIN_SECONDS = 5.0  # a worker still there this long past its shutdown's bound is killed
HURRY_SECONDS = 5.0  # after a second signal: how long workers get to exit before they are killed
REPLAY_SECONDS = 5.0  # one try at the WALs no worker owns, and the pause before the next
ORPHAN_SECONDS = 5.0  # how long a crashed supervisor's worker gets to exit, per signal


@dataclass
class Worker:
    """One worker slot: its index, its notify socket, and the process now in it."""

    index: int
    notify: socket.socket
    notify_name: str  # NOTIFY_SOCKET as the worker is given it: `@` and an abstract name
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
        self.unowned: list[Path] = []  # WALs no worker owns, not replayed yet
        self.replay_at = 0.0  # monotonic time of the next try at them
        self.replay_failed = False  # the last try failed (logged once until one succeeds)
        self.holder: socket.socket | None = None  # the shared port, held once the boot got it
        self.group = f"{os.getpid()}-{secrets.token_hex(8)}"  # in its workers' socket names

    def run(self) -> int:
        """Boot, keep the workers running until a signal, drain them; return the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            try:
                self._boot()
            except (LlmsvcError, OSError) as exc:  # the port in use, the WAL dir locked
                self.failed = f"boot failed: {exc}"
                log.error("%s", self.failed)
            while not self.signals and self.failed is None:
                self._cycle()
            return self._shutdown()
        finally:
            for worker in self.workers:
                worker.notify.close()
            if self.holder is not None:
                self.holder.close()
            self.notifier.close()
            self.lock.release()

    def _boot(self) -> None:
        """Lock, replay the WALs no worker owns, hold the port, start the workers."""
        self.lock.acquire()
        self.unowned = self._unowned_wal_dirs()
        if self.unowned:
            self.notifier.status("booting: replaying the WALs no worker owns")
            self._replay_unowned()
        self.holder = holder = self._hold_port()
        self.port: int = holder.getsockname()[1]
        log.info("boot: port held", host=self.settings.host, port=self.port)
        for index in range(self.settings.workers):
            self.workers.append(self._slot(index))
        for worker in self.workers:
            if not self.signals:  # a signal during the replay stops the boot here
                self._stop_orphan(worker)
                self._start(worker)

    def _replay_unowned(self) -> None:
        """Replay the WALs no worker owns (a change of `workers` left them), for a while.

        A try lasts REPLAY_SECONDS at most (the loop is not held up for long);
        what is left (a long WAL, the database away) is tried again after as
        long again, between turns of the loop, while the workers serve.
        """
        try:
            asyncio.run(asyncio.wait_for(self._replay(), REPLAY_SECONDS))
        except Exception as exc:
            if not self.replay_failed:
                log.warning(
                    "WALs no worker owns not replayed yet (%s); trying again every %.0f s: %s",
                    ", ".join(str(path) for path in self.unowned),
                    REPLAY_SECONDS,
                    "no answer in time" if isinstance(exc, TimeoutError) else why(exc),
                )
            self.replay_failed = True
            self.replay_at = time.monotonic() + REPLAY_SECONDS
            return
        self.replay_failed = False

    async def _replay(self) -> None:
        s = self.settings
        timeout = min(s.database_timeout_seconds, REPLAY_SECONDS)
        engine = create_engine(s.database_url, timeout=timeout, per_command=True)
        try:
            await migrate(engine, s.redacted_database_url())
            while self.unowned:
                wal_dir = self.unowned[0]
                # wal_dir itself is locked already; a former worker's WAL is locked here
                lock = WalLock(wal_dir) if wal_dir != s.wal_dir else None
                if lock is not None:
                    lock.acquire()
                try:
                    replayed = await replay_wal(
                        engine, wal_dir, "supervisor", s.wal_policy(), s.flush_policy()
                    )
                finally:
                    if lock is not None:
                        lock.release()
                log.info("wal no worker owns: stored", dir=wal_dir, records=replayed["replayed"])
                self.unowned.pop(0)
        finally:
            await asyncio.wait_for(engine.dispose(), timeout)

    def _stop_orphan(self, worker: Worker) -> None:
        """Stop a worker a crashed supervisor left holding this slot's WAL, so its own can start.

        The orphan got SIGTERM when its supervisor died (PR_SET_PDEATHSIG) and
        drains without grace; a second SIGTERM makes it exit at once, its WAL
        keeping what it journaled, which the new worker replays.
        """
        wal_dir = worker_wal_dir(self.settings.wal_dir, worker.index)
        pid = lock_holder(wal_dir)
        if not pid or not _is_worker_of(pid, wal_dir):
            return  # free, or someone else's: the worker's own start says so
        log.warning(
            "%s's WAL is held by pid=%d, a worker of a supervisor that died: stopping it",
            worker.name,
            pid,
        )
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            deadline = time.monotonic() + ORPHAN_SECONDS
            while lock_holder(wal_dir) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if lock_holder(wal_dir) is None:
                return

    def _hold_port(self) -> socket.socket:
        host, port = self.settings.host, self.settings.port
        try:
            return shared_port_socket(host, port, listen=False)
        except OSError as exc:
            raise LlmsvcError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}: in use, or not an "
                "address here)"
            ) from None

    def _unowned_wal_dirs(self) -> list[Path]:
        """wal_dir's own WAL (from workers = 1) and those of workers beyond `workers`."""
        wal_dir, workers = self.settings.wal_dir, self.settings.workers
        found = [wal_dir] if read_instance_id(wal_dir) is not None else []
        for path in sorted(wal_dir.glob("worker-*")):
            index = path.name.removeprefix("worker-")
            if index.isdigit() and int(index) >= workers and read_instance_id(path) is not None:
                found.append(path)
        return found

    def _slot(self, index: int) -> Worker:
        name = f"llmsvc-{os.getpid()}-{secrets.token_hex(8)}-worker-{index}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind("\0" + name)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        private.make_dirs(worker_wal_dir(self.settings.wal_dir, index))
        return Worker(index, sock, "@" + name)

    def _start(self, worker: Worker) -> None:
        env = worker_environment(
            self.settings,
            worker.index,
            self.group,
            self.port,
            worker.notify_name,
            self.watchdog_usec,
        )
        worker.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "llmsvc", "run"],  # -P: not the cwd's llmsvc
            env=env,
            stdin=subprocess.DEVNULL,
            process_group=0,  # a terminal's Ctrl-C reaches the supervisor only; it forwards
            preexec_fn=_die_with_parent,  # safe: the supervisor runs no threads
        )
        worker.started, worker.ready, worker.restart_at = time.monotonic(), False, None
        log.info("%s started", worker.name, pid=worker.proc.pid)

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
        if self.unowned and now >= self.replay_at:
            self._replay_unowned()
        if not self.announced and all(w.ready for w in self.workers):
            self.announced = True
            host, n = self.settings.host, len(self.workers)
            log.info("ready", host=host, port=self.port, workers=n)
            self.notifier.ready(f"serving on {host}:{self.port} with {n} workers")
        interval = self.notifier.watchdog_interval
        if self.announced and interval is not None and now - self.last_watchdog >= interval:
            self.notifier.watchdog()
            self.last_watchdog = now

    def _read_notifications(self, worker: Worker, now: float) -> None:
        """What the worker said; datagrams from any other process are dropped."""
        while True:
            try:
                data, ancillary, _, _ = worker.notify.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except BlockingIOError:
                return
            ids = sender(ancillary)
            if worker.proc is None or ids is None or ids[0] != worker.proc.pid:
                continue
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
        deadline = time.monotonic() + self.settings.shutdown_seconds() + KILL_MARGIN_SECONDS
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
                    # Killed by the signal itself: it came before the worker's handler did,
                    # so the worker was still booting and had nothing to drain.
                    clean = clean and code in (0, -self._signal)
                    log.info("shutdown: %s exited", worker.name, code=code)
        for worker in self.workers:
            if worker.proc is None and worker.ever_ready:
                log.warning("shutdown: %s was down; its next start replays its WAL", worker.name)
        code = EXIT_OK if clean else EXIT_FATAL
        if self.failed is not None:
            reason = self.failed
        elif clean:
            reason = f"{self._signal.name} received"
        elif self.signals > 1:
            reason = "second signal: workers told to exit now"
        else:
            reason = "a worker did not exit cleanly"
        log.log(
            logging.ERROR if code else logging.INFO, "shutdown: done", exit_code=code, reason=reason
        )
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


def _is_worker_of(pid: int, wal_dir: Path) -> bool:
    """Whether process `pid` is an llmsvc worker on `wal_dir` (its environment says so)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"LLMSVC_WAL_DIR={wal_dir}".encode() in environ and any(
        line.startswith(f"{WORKER_INDEX_VARIABLE}=".encode()) for line in environ
    )


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM it (a drain) if the supervisor dies unannounced."""
    die_with_parent(signal.SIGTERM)
