"""The video job store on SQLite and on a real PostgreSQL (started once for the module): restart
recovery, leases scoped per replica (a live replica's jobs are never touched, an expired lease fails its
jobs), a graceful release, pages, a database that goes down and comes back, and bad --job-store URLs."""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3
import subprocess
import sys

import pytest
from server_utils import free_port
from services import PostgresServer, postgres_server, unique_name

from diffgen.engine import JobError, Metrics
from diffgen.entrypoints.http.job_store import (
    JobStore,
    JobStoreUnavailable,
    Replica,
    SQLiteJobStore,
    _process_space,
    open_job_store,
)
from diffgen.entrypoints.http.jobs import VideoJobs, video_object
from diffgen.entrypoints.http.output_store import LocalOutputStore
from diffgen.errors import DiffgenError

LEASE = 30.0


def _record(video_id: str) -> dict:
    return {"id": video_id, "created_at": 1, "model": "m", "prompt": "p", "seconds": "4", "size": "32x32"}


def _id(i: int) -> str:
    return f"video_{i:032x}"


def _dead_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _elsewhere(name: str) -> Replica:
    """A replica on another machine: only its lease tells whether it is alive."""
    return Replica(name, "another-machine/boot/pid:[1]", 1)


def _age_lease(store: JobStore, replica_id: str, seconds: float) -> None:
    """Make ``replica_id``'s last heartbeat ``seconds`` older, as if it had been silent that long."""
    store._run(f"UPDATE {store.REPLICAS} SET heartbeat_at = heartbeat_at - ? WHERE id=?", (seconds, replica_id))


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """A function (replica, lease) -> a JobStore on one fresh database of the parametrized backend (None:
    this process's own replica)."""
    if request.param == "sqlite":
        location = f"sqlite://{tmp_path / 'jobs.sqlite3'}"
    else:
        location = request.getfixturevalue("postgres").create_database(unique_name("jobs"))
    stores: list[JobStore] = []

    def open_(replica: Replica | None = None, lease: float = LEASE) -> JobStore:
        store = open_job_store(location, tmp_path, lease=lease, replica=replica)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()


def test_a_restart_fails_what_the_previous_process_left_and_keeps_finished_jobs(open_store, tmp_path):
    old = open_store(Replica("old", _process_space(), _dead_pid()))  # a server process that was killed
    for i in range(4):
        old.create(_record(_id(i)))
    old.mark_running(_id(1))
    old.set_progress(_id(1), 40)
    assert old.finish(_id(2), "completed", file=f"{_id(2)}.mp4")
    assert old.finish(_id(3), "failed", error={"code": "generation_error", "message": "boom"})
    live = open_store(Replica("live", _process_space(), os.getpid()))
    live.create(_record(_id(5)))  # a replica of this machine that is alive: its job is left alone

    store = open_store()  # what a restarted server opens
    videos = VideoJobs(store, LocalOutputStore(tmp_path), engine=None, metrics=Metrics(), staging_dir=tmp_path)
    (videos.videos_dir / f"{_id(1)}.part.mp4").write_bytes(b"half")
    (videos.videos_dir / f"{_id(5)}.part.mp4").write_bytes(b"being written")
    assert {code: sorted(ids) for code, ids in videos.recover().items()} == {"server_restarted": [_id(0), _id(1)]}
    for i in (0, 1):
        video = video_object(store.get(_id(i)))
        assert video["status"] == "failed" and video["error"]["code"] == "server_restarted"
        assert "restarted" in video["error"]["message"] and video["completed_at"] is not None
    completed = video_object(store.get(_id(2)))
    assert completed["status"] == "completed" and completed["progress"] == 100
    assert video_object(store.get(_id(3)))["error"]["message"] == "boom"
    assert store.get(_id(5))["status"] == "queued"
    assert [p.name for p in videos.videos_dir.glob("*.part.mp4")] == [f"{_id(5)}.part.mp4"]
    # A finished job cannot be finished again (a late message after a restart changes nothing).
    assert not store.finish(_id(2), "failed", error={"code": "x", "message": "y"})
    assert not old.finish(_id(1), "completed", file="x.mp4")
    videos.close()


def test_a_live_replica_keeps_its_jobs_and_an_expired_lease_fails_them(open_store):
    a = open_store(_elsewhere("replica-a"), lease=5)
    b = open_store(_elsewhere("replica-b"), lease=5)
    a.create(_record(_id(1)))
    a.mark_running(_id(1))
    assert b.recover(include_expired=True) == {}  # A renews its lease: its job is its own

    _age_lease(b, "replica-a", 4)  # silent for less than a lease
    assert b.recover(include_expired=True) == {}
    _age_lease(b, "replica-a", 2)  # now more than a lease...
    assert b.recover(include_expired=False) == {}  # ...but B has not renewed its own long enough to judge
    a.heartbeat()  # A came back in time (a pause, a slow disk): nothing is lost
    assert b.recover(include_expired=True) == {} and a.get(_id(1))["status"] == "in_progress"

    _age_lease(b, "replica-a", 6)
    assert b.recover(include_expired=True) == {"replica_lost": [_id(1)]}
    video = video_object(b.get(_id(1)))
    assert video["status"] == "failed" and video["error"]["code"] == "replica_lost"
    assert "lease" in video["error"]["message"]
    # A was only paused: its late outcome changes nothing, and it learns that it lost its lease.
    assert not a.finish(_id(1), "completed", file="x.mp4")
    assert a.heartbeat() is False
    a.create(_record(_id(2)))  # A serves on under a new lease
    assert b.recover(include_expired=True) == {} and a.get(_id(2))["status"] == "queued"
    assert a.active([_id(1), _id(2)]) == {_id(2)} and b.active([_id(2)]) == set()


def test_a_graceful_stop_releases_the_lease_and_fails_what_is_left(open_store):
    a = open_store(_elsewhere("replica-a"))
    b = open_store(_elsewhere("replica-b"))
    a.create(_record(_id(1)))
    b.create(_record(_id(2)))
    assert a.release() == [_id(1)]
    assert video_object(b.get(_id(1)))["error"]["code"] == "shutdown"
    assert b.get(_id(2))["status"] == "queued"
    assert [row["id"] for row in b._run(f"SELECT id FROM {b.REPLICAS}", fetch=True)[0]] == ["replica-b"]


def test_list_pages_in_both_orders_and_delete(open_store):
    store = open_store()
    ids = [_id(i) for i in range(5)]
    for video_id in ids:
        store.create(_record(video_id))
    page, more = store.list(None, 2, "asc")
    assert [r["id"] for r in page] == ids[:2] and more
    page, more = store.list(ids[1], 2, "asc")
    assert [r["id"] for r in page] == ids[2:4] and more
    page, more = store.list(ids[3], 2, "asc")
    assert [r["id"] for r in page] == ids[4:] and not more
    page, more = store.list(None, 10, "desc")
    assert [r["id"] for r in page] == ids[::-1] and not more
    assert store.delete(ids[0])["id"] == ids[0] and store.get(ids[0]) is None and store.delete(ids[0]) is None
    with pytest.raises(KeyError):
        store.list(ids[0], 2, "asc")


def test_a_sqlite_file_of_the_previous_version_is_upgraded_and_recovered(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE videos (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
                "created_at INTEGER NOT NULL, completed_at INTEGER, status TEXT NOT NULL, progress INTEGER NOT NULL "
                "DEFAULT 0, model TEXT NOT NULL, prompt TEXT NOT NULL, seconds TEXT NOT NULL, size TEXT NOT NULL, "
                "error TEXT, file TEXT, params TEXT)")
    for i, status in enumerate(("in_progress", "completed")):
        old.execute("INSERT INTO videos (id, created_at, status, model, prompt, seconds, size) "
                    "VALUES (?, 1, ?, 'm', 'p', '4', '32x32')", (_id(i), status))
    old.commit()
    old.close()
    store = SQLiteJobStore(path)
    assert store.recover(include_expired=False) == {"server_restarted": [_id(0)]}
    assert store.get(_id(1))["status"] == "completed"
    store.close()


def test_a_database_that_goes_down_fails_fast_and_is_used_again_when_it_is_back(tmp_path):
    server = PostgresServer().start()
    try:
        store = open_job_store(server.url(), tmp_path)
        videos = VideoJobs(store, LocalOutputStore(tmp_path), engine=None, metrics=Metrics(), staging_dir=tmp_path)
        store.create(_record(_id(1)))
        store.create(_record(_id(2)))
        server.stop()
        with pytest.raises(JobStoreUnavailable, match="cannot be reached") as caught:
            store.get(_id(1))
        assert "unused-password" not in str(caught.value) and "diffgen:***@127.0.0.1" in str(caught.value)
        with pytest.raises(JobStoreUnavailable):
            store.create(_record(_id(3)))
        # A job that ends while the database is down keeps its outcome until the database is back.
        failed: concurrent.futures.Future = concurrent.futures.Future()
        failed.set_exception(JobError("generation_error", "boom"))
        videos._finalize(_id(1), failed)
        videos.on_beat()  # still down: kept
        assert _id(1) in videos._unrecorded

        server.start()
        videos.on_beat()
        assert not videos._unrecorded
        assert video_object(store.get(_id(1)))["error"] == {"code": "generation_error", "message": "boom"}
        assert store.get(_id(2))["status"] == "queued" and store.get(_id(3)) is None  # nothing half-written
        videos.close()
        store.close()
    finally:
        server.remove()


def test_bad_job_store_urls_are_one_clear_error(tmp_path, postgres):
    for url, message in [
        ("mysql://u:secret@db/x", "give postgresql://user:pass@host:port/db or sqlite:///path"),
        ("postgresql:///db", "give the host"),
        ("sqlite://relative.db", "sqlite:///absolute/path"),
        (f"postgresql://u:secret@127.0.0.1:{free_port()}/db", "cannot be reached"),
        ("postgresql://u:secret@127.0.0.1:notaport/db", "port"),
        (postgres.url("no_such_database"), 'database "no_such_database" does not exist'),
    ]:
        with pytest.raises(DiffgenError, match="--job-store") as caught:
            open_job_store(url, tmp_path)
        assert message in str(caught.value) and "secret" not in str(caught.value), (url, caught.value)
