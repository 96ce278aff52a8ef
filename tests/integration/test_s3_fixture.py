"""The loopback S3 server answers pyarrow here, in a plain child process with nothing but
the environment, and in Ray Data tasks of a cluster started in another process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _run(code: str, env: dict[str, str], *args: str, timeout: float = 120) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_in_process_read_list_write(s3_server):
    s3_server.put("fixture/local/a.txt", b"alpha\n")
    s3_server.put("fixture/local/sub/b.txt", b"beta\n")

    fs, path = pafs.FileSystem.from_uri(s3_server.uri("fixture/local/a.txt"))
    assert path == f"{s3_server.bucket}/fixture/local/a.txt"
    assert fs.open_input_file(path).read() == b"alpha\n"

    fs, prefix = pafs.FileSystem.from_uri(s3_server.uri("fixture/local"))
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    assert files == [f"{prefix}/a.txt", f"{prefix}/sub/b.txt"]

    # S3FileSystem() itself ignores AWS_ENDPOINT_URL*: the explicit one, and pyarrow writes.
    explicit = s3_server.filesystem()
    with explicit.open_output_stream(f"{s3_server.bucket}/fixture/local/written.txt") as out:
        out.write(b"gamma\n")
    assert fs.open_input_file(f"{prefix}/written.txt").read() == b"gamma\n"
    # No bucket creation needed (and none allowed) for reads and writes in the bucket.
    with pytest.raises(OSError, match="allow_bucket_creation"):
        explicit.create_dir("no-such-bucket")


def test_separate_process_with_only_the_env(s3_server):
    uri = s3_server.put("fixture/proc/c.txt", b"from another process")
    env = {"PATH": os.environ.get("PATH", ""), **s3_server.env}
    no_endpoint = {k: v for k, v in env.items() if not k.startswith("AWS_ENDPOINT_URL")}
    code = """
        import json, sys, pyarrow.fs as pafs
        out = {}
        for uri in sys.argv[1:]:
            fs, path = pafs.FileSystem.from_uri(uri)
            out[uri] = fs.open_input_file(path).read().decode()
        print(json.dumps(out))
    """
    assert _run(code, env, uri) == {uri: "from another process"}

    # Without the endpoint variables, the URI can carry the endpoint itself.
    uri_q = s3_server.uri_with_endpoint("fixture/proc/c.txt")
    assert _run(code, no_endpoint, uri_q) == {uri_q: "from another process"}


def test_ray_data_reads_s3_in_its_own_cluster(s3_server):
    s3_server.put("fixture/ray/docs/1.txt", b"one")
    s3_server.put("fixture/ray/docs/nested/2.txt", b"two")
    s3_server.put("fixture/ray/table/part-0.parquet", _parquet_bytes(pa.table({"x": [1, 2, 3]})))
    env = s3_server.subprocess_env()
    env.pop("RAY_ADDRESS", None)
    code = f"""
        import json, ray
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = ray.data.read_binary_files({s3_server.uri("fixture/ray/docs")!r}, include_paths=True).take_all()
        xs = ray.data.read_parquet({s3_server.uri("fixture/ray/table/")!r}).take_all()
        ray.shutdown()
        print(json.dumps({{
            "binary": sorted([r["path"], r["bytes"].decode()] for r in rows),
            "parquet": sorted(r["x"] for r in xs),
        }}))
    """
    got = _run(code, env)
    b = s3_server.bucket
    assert got["binary"] == [[f"{b}/fixture/ray/docs/1.txt", "one"], [f"{b}/fixture/ray/docs/nested/2.txt", "two"]]
    assert got["parquet"] == [1, 2, 3]
