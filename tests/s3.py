"""A real S3-compatible server on loopback for the artifact-store tests: moto's server
mode (`python -m moto.server`) started as its own process on a free port, with one
bucket. Skipped, with the reason, when moto is not installed.

    pytest_plugins = ["tests.s3"]   # in the test module: one server for the whole session

    def test_x(s3_server):
        url = s3_server.url("some/prefix")            # s3://<bucket>/some/prefix
        FsspecBlobStore(url, s3_server.storage_options)
        subprocess.Popen([...], env={**os.environ, **s3_server.env})   # a server process
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "trainctl-test"
KEY = SECRET = "testing"  # moto accepts any credentials; botocore wants some


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    process: subprocess.Popen
    log: Path

    def url(self, prefix: str = "") -> str:
        """A fresh s3:// URL in the bucket (a random prefix unless given)."""
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:12]}"

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for an in-process FsspecBlobStore."""
        return {"key": KEY, "secret": SECRET, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": "us-east-1"}}

    @property
    def env(self) -> dict:
        """Environment that points a trainctl server process's s3fs at this server."""
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "FSSPEC_S3_ENDPOINT_URL": self.endpoint}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(tmp: Path, timeout: float = 60.0) -> S3Server:
    port = _free_port()
    log = tmp / "moto.log"
    fh = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET})
    fh.close()
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"moto server not up after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    # Create the bucket with a plain PUT (what the S3 API is): no boto3 needed.
    req = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
    urllib.request.urlopen(req, timeout=10).close()
    return S3Server(endpoint=endpoint, bucket=BUCKET, process=proc, log=log)


def stop_s3(server: S3Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    missing = [m for m in ("moto", "s3fs") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (pip install 'trainctl[s3]' 'moto[server]'): "
                    f"no S3-compatible server to test against")
    server = start_s3(tmp_path_factory.mktemp("s3"))
    yield server
    stop_s3(server)
