"""An S3-compatible server on loopback for tests: moto, in a child process.

    with s3_server() as s3:
        s3.put("corpus/a.txt", b"hello")
        os.environ.update(s3.env)           # or pass s3.subprocess_env() to a child
        pyarrow.fs.FileSystem.from_uri(s3.uri("corpus/a.txt"))
        ray.data.read_binary_files(s3.uri("corpus/"))

The server is a separate process (``python tests/integration/s3_server.py``) bound to 127.0.0.1 on a
port the OS picks, so any process on this machine can reach it: this one, a
``subprocess.run`` child, Ray workers. It exits when its stdin closes, so it never
outlives the process that started it.

What reaches it, measured with pyarrow 25.0.1, boto3 1.43, Ray 2.60, moto 5.2.1:

* ``pyarrow.fs.FileSystem.from_uri("s3://...")`` (so every Ray Data reader) honours
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (the ``_S3`` one wins) and resolves the
  scheme from the URL. The endpoint is baked into the filesystem it returns, so it
  travels to Ray workers with the pickled filesystem; the credentials do NOT: they are
  read in each process from its own environment.
* ``pyarrow.fs.S3FileSystem()`` built directly ignores both endpoint variables (it goes
  to real AWS): use ``S3Server.filesystem()`` or pass ``endpoint_override`` yourself.
* Without any environment: ``s3://bucket/key?endpoint_override=127.0.0.1:PORT&scheme=http``
  (``S3Server.uri_with_endpoint``), credentials still from the environment.
* boto3 honours the same variables.

moto answers CompleteMultipartUpload with a ``<CompleteMultipartUploadResponse>`` root
where S3 sends ``<CompleteMultipartUploadResult>``; the AWS C++ SDK in pyarrow takes that
for an error embedded in a 200 and every pyarrow write (``open_output_stream``,
``pq.write_table``, Ray Data ``write_*``) fails on close. The child process below renames
the element on the way out so that pyarrow writes work too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

HOST = "127.0.0.1"
REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"

# Variables that would mix real credentials / profiles into the fake ones.
UNSET_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


class S3Server:
    """A running server with one bucket; ``env`` points pyarrow and boto3 at it."""

    def __init__(self, port: int, bucket: str, proc: subprocess.Popen | None = None):
        self.port = port
        self.bucket = bucket
        self.host_port = f"{HOST}:{port}"
        self.endpoint_url = f"http://{HOST}:{port}"
        self.proc = proc
        self.env: dict[str, str] = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            # S3 only: other AWS services a test might touch are not redirected.
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            # No instance-metadata probing (seconds of timeouts off EC2).
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._client: Any = None

    # -- addresses -------------------------------------------------------------------
    def uri(self, key: str = "") -> str:
        """``s3://bucket/key``: reaches this server where ``env`` is set."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def uri_with_endpoint(self, key: str = "") -> str:
        """``s3://bucket/key?endpoint_override=...&scheme=http``: needs only credentials."""
        query = urllib.parse.urlencode({"endpoint_override": self.host_port, "scheme": "http"})
        return f"{self.uri(key)}?{query}"

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for a child process: ``base`` (default os.environ) + ``env``."""
        out = dict(os.environ if base is None else base)
        for name in UNSET_ENV:
            out.pop(name, None)
        out.update(self.env)
        return out

    # -- clients ---------------------------------------------------------------------
    def filesystem(self):
        """A pyarrow S3FileSystem with endpoint and credentials explicit (no env needed,
        and they travel with it when pickled to Ray workers)."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            endpoint_override=self.host_port,
            scheme="http",
        )

    @property
    def client(self):
        """A boto3 S3 client for this server (explicit endpoint, no env needed)."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
            )
        return self._client

    def put(self, key: str, data: bytes | str, bucket: str | None = None) -> str:
        """Upload ``data`` to ``key``; returns its ``s3://`` URI."""
        if isinstance(data, str):
            data = data.encode()
        self.client.put_object(Bucket=bucket or self.bucket, Key=key.lstrip("/"), Body=data)
        return f"s3://{bucket or self.bucket}/{key.lstrip('/')}"

    def create_bucket(self, name: str) -> None:
        self.client.create_bucket(Bucket=name)

    def __repr__(self) -> str:
        return f"S3Server({self.endpoint_url}, bucket={self.bucket!r})"


@contextlib.contextmanager
def s3_server(bucket: str = "mlm-test", start_timeout: float = 30.0) -> Iterator[S3Server]:
    """Start the server in a child process, create ``bucket``, yield, stop it."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # The server itself must not pick up an endpoint/credential setup.
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    try:
        port = _read_port(proc, start_timeout)
        server = S3Server(port, bucket, proc)
        server.create_bucket(bucket)
        yield server
    finally:
        _stop(proc)


def _read_port(proc: subprocess.Popen, timeout: float) -> int:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            if line.strip().isdigit():
                return int(line)
            raise RuntimeError(f"S3 test server did not start (said {line!r}, rc={proc.poll()})")
        if proc.poll() is not None:
            raise RuntimeError(f"S3 test server exited with {proc.returncode} before starting")
    raise RuntimeError(f"S3 test server did not start within {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.stdin and not proc.stdin.closed:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stdout:
        proc.stdout.close()


# -- the child process ---------------------------------------------------------------
def _fix_complete_multipart(app):
    """WSGI middleware: moto's CompleteMultipartUpload root element -> S3's."""

    def wrapped(environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or "uploadId" not in environ.get("QUERY_STRING", ""):
            return app(environ, start_response)
        captured: dict[str, Any] = {}
        chunks: list[bytes] = []

        def capture(status, headers, exc_info=None):
            captured.update(status=status, headers=headers, exc_info=exc_info)
            return chunks.append

        result = app(environ, capture)
        try:
            chunks.extend(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        body = b"".join(chunks).replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(captured["status"], headers, captured["exc_info"])
        return [body]

    return wrapped


def _serve() -> None:
    import logging
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request lines
    app = _fix_complete_multipart(DomainDispatcherApplication(create_backend_app))
    server = make_server(HOST, 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # until the parent closes stdin or dies
    server.shutdown()


if __name__ == "__main__":
    _serve()
