"""Where the server keeps its video job records: SQLite (the default, ``<output-dir>/jobs.sqlite3``, one
machine) or PostgreSQL (``--job-store postgresql://user:pass@host:port/db``, shared by several replicas).

Each replica registers itself in a ``replicas`` table and renews its lease (a heartbeat) every
``lease / 3`` seconds; every job row names its owner, the replica that runs it. A replica fails the
unfinished jobs of another replica only when that owner is dead: its process is gone (seen from the same
machine and PID namespace: immediate, so a restarted server fails what its previous process left at once,
as before), or its lease expired (another machine: after ``lease`` seconds of silence). A live replica's
job is never touched. Dead owners' jobs are failed, not re-queued: a job's input images are not stored, so
it cannot be re-run as it was asked. A job ends once: every update of an outcome applies only to a job that
is still queued or running.

Both stores run the same SQL (``?`` placeholders, each statement autocommitted or in one transaction);
the routes use only this interface and never branch on the backend. A store that cannot be reached raises
JobStoreUnavailable (answered HTTP 503).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from diffgen.errors import DiffgenError

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "in_progress")


class JobStoreUnavailable(Exception):
    """The job database cannot be reached or refused the statement (answered HTTP 503)."""


@functools.lru_cache(maxsize=1)
def _process_space() -> str:
    """Where a PID means one process: this machine (boot) and PID namespace. Two replicas with the same
    value can check each other's PIDs; containers sharing a host name (host networking) cannot."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


@dataclass(frozen=True)
class Replica:
    """One ``serve`` process: a fresh id per start, and where its PID can be checked."""

    id: str
    process_space: str
    pid: int

    @classmethod
    def this_process(cls) -> Replica:
        return cls(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", _process_space(), os.getpid())

    def is_gone(self) -> bool:
        """True when this replica ran in our process space and its process no longer exists."""
        if self.process_space != _process_space():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by another user
            return False
        return False


class JobStore:
    """The video job table and the replicas' leases, over one database connection used under a lock
    (every statement is tiny). Subclasses give the connection, the SQL dialect's few differences and
    the mapping of the driver's errors to JobStoreUnavailable."""

    VIDEOS = "videos"
    REPLICAS = "replicas"
    NOW_SQL = ""  # the database's clock in seconds since the epoch: leases are compared on one clock

    def __init__(self, replica: Replica | None = None, lease: float = 30.0):
        self.replica = replica or Replica.this_process()
        self.lease = float(lease)
        self._lock = threading.RLock()

    # --- the backend's part ---
    def _run(self, sql: str, args: tuple = (), fetch: bool = False) -> tuple[list[dict[str, Any]], int]:
        """Run one statement (inside ``transaction`` when one is open); rows (if ``fetch``), rowcount."""
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """The store for messages (no password)."""
        raise NotImplementedError

    # --- replicas ---
    def register(self) -> None:
        """Take (or renew) this replica's lease. Done at start and by every heartbeat."""
        r = self.replica
        with self._lock:
            _, updated = self._run(f"UPDATE {self.REPLICAS} SET heartbeat_at={self.NOW_SQL} WHERE id=?", (r.id,))
            if updated == 0:
                self._run(f"INSERT INTO {self.REPLICAS} (id, process_space, pid, heartbeat_at) "
                          f"VALUES (?, ?, ?, {self.NOW_SQL}) ON CONFLICT (id) DO NOTHING",
                          (r.id, r.process_space, r.pid))

    def heartbeat(self) -> bool:
        """Renew the lease; False when another replica had declared this one dead (its jobs were failed)."""
        with self._lock:
            _, updated = self._run(f"UPDATE {self.REPLICAS} SET heartbeat_at={self.NOW_SQL} WHERE id=?",
                                   (self.replica.id,))
            if updated == 0:
                self.register()
        return updated == 1

    def recover(self, include_expired: bool = True) -> dict[str, list[str]]:
        """Fail the unfinished jobs of dead owners; returns {failed job id: ...} grouped by error code.

        Dead: a replica whose process is gone (same process space), with ``include_expired`` also one
        whose lease is older than ``lease`` seconds, and jobs whose owner is unknown (rows of an older
        version, or a replica row removed meanwhile). The caller passes ``include_expired`` only once it has
        itself renewed its lease for ``lease`` seconds in a row: after an outage of the database every
        replica first gets the time to renew its own."""
        failed: dict[str, list[str]] = {}
        now = int(time.time())
        with self._lock:
            rows, _ = self._run(f"SELECT id, process_space, pid, {self.NOW_SQL} - heartbeat_at AS age, heartbeat_at "
                                f"FROM {self.REPLICAS} WHERE id <> ?", (self.replica.id,), fetch=True)
            for row in rows:
                owner = Replica(row["id"], row["process_space"], row["pid"])
                if owner.is_gone():
                    code, message = "server_restarted", "the server restarted before this job finished"
                elif include_expired and row["age"] > self.lease:
                    code, message = "replica_lost", (f"the replica running this job stopped renewing its lease "
                                                      f"for over {self.lease:g} s before the job finished")
                else:
                    continue
                with self.transaction():
                    # Only if its lease was not renewed meanwhile (a paused process that came back).
                    _, deleted = self._run(f"DELETE FROM {self.REPLICAS} WHERE id=? AND heartbeat_at=?",
                                           (owner.id, row["heartbeat_at"]))
                    if deleted:
                        failed.setdefault(code, []).extend(self._fail_jobs("owner=?", (owner.id,), code, message, now))
            orphans = self._fail_jobs(f"(owner IS NULL OR owner NOT IN (SELECT id FROM {self.REPLICAS}))", (),
                                      "server_restarted", "the server restarted before this job finished", now)
            if orphans:
                failed.setdefault("server_restarted", []).extend(orphans)
        return failed

    def _fail_jobs(self, where: str, args: tuple, code: str, message: str, now: int) -> list[str]:
        error = json.dumps({"code": code, "message": message})
        rows, _ = self._run(f"UPDATE {self.VIDEOS} SET status='failed', error=?, completed_at=? "
                            f"WHERE status IN (?, ?) AND {where} RETURNING id", (error, now, *ACTIVE, *args),
                            fetch=True)
        return [row["id"] for row in rows]

    def release(self) -> list[str]:
        """On a graceful stop: fail what this replica still owns and give up its lease."""
        with self._lock, self.transaction():
            left = self._fail_jobs("owner=?", (self.replica.id,), "shutdown",
                                   "the server shut down before this job finished", int(time.time()))
            self._run(f"DELETE FROM {self.REPLICAS} WHERE id=?", (self.replica.id,))
        return left

    # --- jobs ---
    def create(self, record: dict[str, Any]) -> None:
        """Insert a queued job owned by this replica (its lease renewed in the same transaction, so that a
        job never has an owner without a lease)."""
        with self._lock, self.transaction():
            self.register()
            self._run(
                f"INSERT INTO {self.VIDEOS} (id, created_at, status, progress, model, prompt, seconds, size, params, "
                "owner) VALUES (?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (record["id"], record["created_at"], record["model"], record["prompt"], record["seconds"],
                 record["size"], json.dumps(record.get("params") or {}), self.replica.id))

    def get(self, video_id: str) -> dict[str, Any] | None:
        with self._lock:
            rows, _ = self._run(f"SELECT * FROM {self.VIDEOS} WHERE id=?", (video_id,), fetch=True)
        return rows[0] if rows else None

    def active(self, video_ids: list[str]) -> set[str]:
        """Those of ``video_ids`` that are still queued or running here (not deleted, not failed by another
        replica)."""
        if not video_ids:
            return set()
        marks = ", ".join("?" * len(video_ids))
        with self._lock:
            rows, _ = self._run(f"SELECT id FROM {self.VIDEOS} WHERE id IN ({marks}) AND status IN (?, ?) "
                                "AND owner=?", (*video_ids, *ACTIVE, self.replica.id), fetch=True)
        return {row["id"] for row in rows}

    def mark_running(self, video_id: str) -> None:
        with self._lock:
            self._run(f"UPDATE {self.VIDEOS} SET status='in_progress' WHERE id=? AND status='queued'", (video_id,))

    def set_progress(self, video_id: str, progress: int) -> None:
        with self._lock:
            self._run(f"UPDATE {self.VIDEOS} SET progress=? WHERE id=? AND status IN (?, ?)",
                      (progress, video_id, *ACTIVE))

    def finish(self, video_id: str, status: str, error: dict[str, Any] | None = None,
               file: str | None = None) -> bool:
        """Record the outcome of an active job; False when the job is gone (deleted meanwhile) or already
        ended (failed by another replica that found this one dead)."""
        progress_sql = ", progress=100" if status == "completed" else ""
        with self._lock:
            _, updated = self._run(
                f"UPDATE {self.VIDEOS} SET status=?, error=?, file=?, completed_at=?{progress_sql} "
                "WHERE id=? AND status IN (?, ?)",
                (status, json.dumps(error) if error else None, file, int(time.time()), video_id, *ACTIVE))
        return updated == 1

    def delete(self, video_id: str) -> dict[str, Any] | None:
        with self._lock:
            rows, _ = self._run(f"DELETE FROM {self.VIDEOS} WHERE id=? RETURNING *", (video_id,), fetch=True)
        return rows[0] if rows else None

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[dict[str, Any]], bool]:
        """A page of jobs by creation order; ``after``: the id of the last job of the previous page."""
        descending = order == "desc"
        sql, args = f"SELECT * FROM {self.VIDEOS}", []
        with self._lock:
            if after is not None:
                found, _ = self._run(f"SELECT seq FROM {self.VIDEOS} WHERE id=?", (after,), fetch=True)
                if not found:
                    raise KeyError(after)
                sql += " WHERE seq < ?" if descending else " WHERE seq > ?"
                args.append(found[0]["seq"])
            sql += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
            args.append(limit + 1)
            rows, _ = self._run(sql, tuple(args), fetch=True)
        return rows[:limit], len(rows) > limit


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    error TEXT,
    file TEXT,
    params TEXT,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    process_space TEXT NOT NULL,
    pid INTEGER NOT NULL,
    heartbeat_at REAL NOT NULL
);
"""


class SQLiteJobStore(JobStore):
    """A SQLite file (WAL mode: several processes on one machine may share it)."""

    NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: str | os.PathLike, replica: Replica | None = None, lease: float = 30.0):
        super().__init__(replica, lease)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit (isolation_level=None): each statement is durable at once; transactions are explicit
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SQLITE_SCHEMA)
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(videos)")}
        if "owner" not in columns:  # a database of a version without replicas: its jobs have no owner
            self._db.execute("ALTER TABLE videos ADD COLUMN owner TEXT")
        self._depth = 0
        self.register()

    def _run(self, sql: str, args: tuple = (), fetch: bool = False) -> tuple[list[dict[str, Any]], int]:
        try:
            cursor = self._db.execute(sql, args)
            rows = [dict(row) for row in cursor.fetchall()] if fetch else []
            return rows, cursor.rowcount
        except sqlite3.OperationalError as e:  # locked too long, disk I/O error, ...
            raise JobStoreUnavailable(f"the job store {self.describe()} cannot be used: {e}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._depth:  # nested: part of the outer one
                yield
                return
            self._run("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._depth = 0
            self._run("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def describe(self) -> str:
        return str(self.path)


def _postgres_schema(videos: str, replicas: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {videos} (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT UNIQUE NOT NULL,
            created_at BIGINT NOT NULL,
            completed_at BIGINT,
            status TEXT NOT NULL,
            progress INTEGER NOT NULL DEFAULT 0,
            model TEXT NOT NULL,
            prompt TEXT NOT NULL,
            seconds TEXT NOT NULL,
            size TEXT NOT NULL,
            error TEXT,
            file TEXT,
            params TEXT,
            owner TEXT)""",
        f"CREATE INDEX IF NOT EXISTS {videos}_active ON {videos} (owner) WHERE status IN ('queued', 'in_progress')",
        f"""CREATE TABLE IF NOT EXISTS {replicas} (
            id TEXT PRIMARY KEY,
            process_space TEXT NOT NULL,
            pid INTEGER NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL)""",
    ]


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


class PostgresJobStore(JobStore):
    """A PostgreSQL database shared by the replicas (its tables: diffgen_videos, diffgen_replicas).

    One connection, opened again after a failure; a statement that fails on a connection the server
    dropped (restart, failover) is retried once on a new one. Connecting waits CONNECT_TIMEOUT_S at most
    and a statement STATEMENT_TIMEOUT_S, so that a database that is down answers a request in seconds."""

    VIDEOS = "diffgen_videos"
    REPLICAS = "diffgen_replicas"
    NOW_SQL = "extract(epoch from clock_timestamp())::double precision"
    CONNECT_TIMEOUT_S = 5
    STATEMENT_TIMEOUT_S = 10

    def __init__(self, url: str, replica: Replica | None = None, lease: float = 30.0):
        try:
            import psycopg
        except ImportError:
            raise ImportError("--job-store postgresql://... needs psycopg 3: pip install 'psycopg[binary]'") from None
        super().__init__(replica, lease)
        self._psycopg = psycopg
        self.url = url
        self._conn = None
        self._in_transaction = False
        with self._lock, self.transaction():
            # Replicas starting together would race on CREATE TABLE IF NOT EXISTS: one at a time.
            self._run("SELECT pg_advisory_xact_lock(727274)")
            for statement in _postgres_schema(self.VIDEOS, self.REPLICAS):
                self._run(statement)
        self.register()

    def _connection(self):
        if self._conn is None or self._conn.closed:
            from psycopg.rows import dict_row

            try:
                self._conn = self._psycopg.connect(
                    self.url, autocommit=True, row_factory=dict_row, connect_timeout=self.CONNECT_TIMEOUT_S,
                    options=f"-c statement_timeout={self.STATEMENT_TIMEOUT_S * 1000}", application_name="diffgen")
            except self._psycopg.ProgrammingError as e:  # a URL libpq cannot parse: known at start
                raise ValueError(f"{self.describe()}: {e}") from None
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def _run(self, sql: str, args: tuple = (), fetch: bool = False) -> tuple[list[dict[str, Any]], int]:
        sql = sql.replace("?", "%s")
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None and not self._conn.closed
                try:
                    cursor = self._connection().execute(sql, args)
                    return (cursor.fetchall() if fetch else []), cursor.rowcount
                except self._psycopg.OperationalError as e:
                    self._drop_connection()
                    # A dropped connection is found on its next use: once, try a new one (outside a
                    # transaction only: the transaction's earlier statements were lost with it).
                    if attempt == 1 and reused and not self._in_transaction:
                        continue
                    raise JobStoreUnavailable(f"the job store {self.describe()} cannot be reached: "
                                              f"{str(e).strip().splitlines()[0] if str(e).strip() else e}") from None
                except self._psycopg.Error as e:
                    if self._in_transaction or self._conn is None or self._conn.broken:
                        self._drop_connection()
                    raise JobStoreUnavailable(f"the job store {self.describe()} refused a statement: "
                                              f"{type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._in_transaction:
                yield
                return
            self._run("BEGIN")
            self._in_transaction = True
            try:
                yield
            except BaseException:
                self._in_transaction = False
                if self._conn is not None and not self._conn.closed:
                    with contextlib.suppress(Exception):
                        self._conn.execute("ROLLBACK")
                raise
            self._in_transaction = False
            self._run("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def describe(self) -> str:
        return redact(self.url)


def open_job_store(job_store: str | None, output_dir: str | os.PathLike, lease: float = 30.0,
                   replica: Replica | None = None) -> JobStore:
    """``job_store``: None -> ``<output_dir>/jobs.sqlite3``; ``sqlite:///path`` -> that file;
    ``postgresql://user:pass@host:port/db`` (or ``postgres://``) -> PostgresJobStore. The database is
    reached (and its tables made) here: a bad URL or a database that is down is a DiffgenError that
    ``serve`` reports at start in one line. ``replica``: default, this process."""
    if not job_store:
        return SQLiteJobStore(Path(output_dir) / "jobs.sqlite3", replica, lease)
    scheme = urlsplit(job_store).scheme if "://" in job_store else ""
    try:
        if scheme == "sqlite":
            path = job_store.removeprefix("sqlite://")
            if not path.startswith("/") or path == "/":
                raise ValueError(f"give sqlite:///absolute/path/jobs.sqlite3, not {job_store!r}")
            return SQLiteJobStore(path, replica, lease)
        if scheme in ("postgresql", "postgres"):
            parts = urlsplit(job_store)
            if not parts.hostname and "host=" not in parts.query:
                raise ValueError(f"{redact(job_store)}: give the host, as in postgresql://user:pass@host:5432/db")
            return PostgresJobStore(job_store, replica, lease)
        raise ValueError(f"give postgresql://user:pass@host:port/db or sqlite:///path, not {redact(job_store)!r}")
    except (ValueError, ImportError, JobStoreUnavailable, sqlite3.Error, OSError) as e:
        raise DiffgenError(f"--job-store: {e}") from None


class LeaseKeeper:
    """The replica's heartbeat thread: every ``lease / 3`` seconds it renews the lease, runs ``on_beat``
    (VideoJobs: outcomes the database missed, jobs deleted or failed elsewhere) and fails the jobs of dead
    replicas; expired leases only once this replica has renewed its own for a whole lease."""

    def __init__(self, store: JobStore, on_beat=None):
        self.store = store
        self.on_beat = on_beat
        self.interval = store.lease / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-lease", daemon=True)
        self._healthy_since: float | None = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def beat(self) -> None:
        try:
            if not self.store.heartbeat():
                logger.warning("replica %s: another replica found this one's lease expired and failed its "
                               "unfinished jobs", self.store.replica.id)
            if self._healthy_since is None:
                logger.warning("the job store %s is reachable again", self.store.describe())
                self._healthy_since = time.monotonic()
            if self.on_beat is not None:
                self.on_beat()
            settled = time.monotonic() - self._healthy_since >= self.store.lease
            for code, ids in self.store.recover(include_expired=settled).items():
                logger.warning("marked %d video job(s) of dead replicas as failed (%s)", len(ids), code)
        except JobStoreUnavailable as e:
            if self._healthy_since is not None:  # once per outage
                logger.error("%s", e)
            self._healthy_since = None
        except Exception:  # the heartbeat must outlive any bug in one beat
            logger.exception("job lease heartbeat")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


__all__ = ["ACTIVE", "JobStore", "JobStoreUnavailable", "LeaseKeeper", "PostgresJobStore", "Replica",
           "SQLiteJobStore", "open_job_store", "redact"]
