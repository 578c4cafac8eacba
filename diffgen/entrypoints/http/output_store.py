"""Where the server keeps its outputs (video MP4s, response_format=url images): a local folder (the
default) or an S3-compatible bucket (``--output-store s3://bucket/prefix``).

Both stores take whole finished files (``put`` from a local path written to completion first), so a
reader never sees half an object; keys are made by the server from random ids, never by a client.
The routes use only this interface and never branch on the backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from diffgen.errors import DiffgenError


class OutputStoreUnavailable(Exception):
    """The store cannot be reached or refused the operation (answered HTTP 503)."""


@dataclass
class StoredObject:
    size: int
    modified: float  # seconds since the epoch
    #: a local file the server may send itself (honouring Range); None: stream it with ``read``
    path: Path | None = None


class OutputStore:
    """The operations the routes need. ``key``: "videos/<id>.mp4", "images/<id>.png", ..."""

    def put(self, key: str, source: Path, media_type: str) -> None:
        """Store the finished file ``source`` under ``key`` (``source`` is consumed: moved or deleted)."""
        raise NotImplementedError

    def stat(self, key: str) -> StoredObject | None:
        raise NotImplementedError

    def read(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """``(key, modified)`` of every object whose key starts with ``prefix``."""
        raise NotImplementedError

    def url(self, key: str) -> str | None:
        """A URL clients may fetch the object from directly, or None: serve it through /content."""
        return None


class LocalOutputStore(OutputStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, source: Path, media_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, path)

    def stat(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return StoredObject(st.st_size, st.st_mtime, path)

    def read(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with open(self._path(key), "rb") as file:
            while chunk := file.read(chunk_size):
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        folder, _, stem = prefix.rpartition("/")
        for path in (self.root / folder).glob(f"{stem}*"):
            try:
                yield f"{folder}/{path.name}" if folder else path.name, path.stat().st_mtime
            except FileNotFoundError:  # deleted meanwhile
                continue


class S3OutputStore(OutputStore):
    """An S3-compatible bucket. Endpoint, region and credentials come from boto3's usual sources
    (AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
    ~/.aws) unless ``endpoint_url`` is given. ``url`` is presigned for ``url_ttl`` seconds, or, with
    ``public_base_url``, that base + the object key."""

    def __init__(self, uri: str, endpoint_url: str | None = None, url_ttl: float = 3600.0,
                 public_base_url: str | None = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ImportError("--output-store s3://... needs boto3: pip install boto3") from None
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"output store {uri!r}: give s3://bucket or s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url_ttl = int(url_ttl)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        # Few, short retries: a store that is down must fail a request within seconds, not minutes.
        config = Config(signature_version="s3v4", connect_timeout=5, read_timeout=30,
                        retries={"max_attempts": 2, "mode": "standard"}, s3={"addressing_style": "path"})
        self._client = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
        import botocore.exceptions

        self._errors = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unavailable(self, action: str, error: Exception) -> OutputStoreUnavailable:
        return OutputStoreUnavailable(f"the output store s3://{self.bucket}/{self.prefix} cannot {action}: {error}")

    def check(self) -> None:
        """Fail early (at server start) on a missing bucket or wrong credentials."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._errors as e:
            raise self._unavailable("be reached", e) from None

    def put(self, key: str, source: Path, media_type: str) -> None:
        try:
            # A single PUT (or a multipart upload completed only at its end): no half-written object.
            self._client.upload_file(str(source), self.bucket, self._key(key),
                                     ExtraArgs={"ContentType": media_type})
        except (*self._errors, OSError) as e:
            raise self._unavailable("store an output", e) from None
        finally:
            Path(source).unlink(missing_ok=True)

    def stat(self, key: str) -> StoredObject | None:
        import botocore.exceptions

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._unavailable("be read", e) from None
        except self._errors as e:
            raise self._unavailable("be read", e) from None
        return StoredObject(head["ContentLength"], head["LastModified"].timestamp())

    def read(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self._errors as e:
            raise self._unavailable("be read", e) from None
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors as e:
            raise self._unavailable("delete an output", e) from None

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        skip = len(self._key(""))
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=self._key(prefix))
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][skip:], item["LastModified"].timestamp()
        except self._errors as e:
            raise self._unavailable("list outputs", e) from None

    def url(self, key: str) -> str | None:
        if self.public_base_url:
            return f"{self.public_base_url}/{self._key(key)}"
        try:
            return self._client.generate_presigned_url("get_object", Params={"Bucket": self.bucket,
                                                                             "Key": self._key(key)},
                                                       ExpiresIn=self.url_ttl)
        except self._errors as e:
            raise self._unavailable("sign a URL", e) from None


def open_output_store(output_store: str | None, output_dir: str | os.PathLike, *, s3_endpoint_url: str | None = None,
                      url_ttl: float = 3600.0, public_base_url: str | None = None) -> OutputStore:
    """``output_store``: None or a folder -> LocalOutputStore; ``s3://bucket/prefix`` -> S3OutputStore."""
    if not output_store:
        return LocalOutputStore(output_dir)
    if "://" not in output_store:
        return LocalOutputStore(output_store)
    try:
        if not output_store.startswith("s3://"):
            raise ValueError(f"give a folder or s3://bucket/prefix, not {output_store!r}")
        store = S3OutputStore(output_store, endpoint_url=s3_endpoint_url, url_ttl=url_ttl,
                              public_base_url=public_base_url)
        store.check()
    except (ValueError, ImportError, OutputStoreUnavailable) as e:  # reported by `serve` without a traceback
        raise DiffgenError(f"--output-store: {e}") from None
    return store


def copy_to_temp(data: bytes, folder: Path, name: str) -> Path:
    """Write ``data`` whole to a temporary file in ``folder`` (for ``put``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{time.monotonic_ns()}.part"
    with open(path, "wb") as file:
        file.write(data)
    return path


__all__ = ["LocalOutputStore", "OutputStore", "OutputStoreUnavailable", "S3OutputStore", "StoredObject",
           "copy_to_temp", "open_output_store"]
