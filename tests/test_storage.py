"""pipelines.platform.storage against local folders and a real S3 server (SeaweedFS on loopback)."""

import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.platform import storage
from pipelines.platform.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh, empty root URI: a local folder or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return storage.join(bucket, "root")


def _full(uri):
    """What list_files returns for uri: s3:// URIs as they are, absolute local paths."""
    return uri if uri.startswith("s3://") else os.path.abspath(uri)


def test_join():
    assert storage.join("s3://b/", "x/", "/y.mp4") == "s3://b/x/y.mp4"
    assert storage.join("/data", "a", "b") == "/data/a/b"
    assert storage.join("s3://b") == "s3://b"


def test_unsupported_scheme_is_a_readable_error():
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.exists("gs://bucket/x")


def test_bytes_and_text_round_trip(root):
    assert not storage.exists(storage.join(root, "a.bin"))
    storage.write_bytes(storage.join(root, "a.bin"), b"\x00\x01payload")
    storage.write_text(storage.join(root, "deep/er/b.txt"), "héllo")
    assert storage.exists(storage.join(root, "a.bin"))
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"\x00\x01payload"
    assert storage.read_text(storage.join(root, "deep/er/b.txt")) == "héllo"
    with storage.open(storage.join(root, "c.txt"), "w") as f:
        f.write("via open")
    with storage.open(storage.join(root, "c.txt"), "r") as f:
        assert f.read() == "via open"


def test_list_files_recursive_with_extensions(root):
    for rel in ["v1.mp4", "sub/v2.MP4", "sub/deeper/v3.avi", "sub/notes.txt", "w.webm"]:
        storage.write_bytes(storage.join(root, rel), b"x")
    all_files = storage.list_files(root)
    assert len(all_files) == 5
    assert all_files == sorted(all_files)
    videos = storage.list_files(root, extensions=[".mp4", "avi"])
    assert videos == [storage.join(_full(root), r) for r in ["sub/deeper/v3.avi", "sub/v2.MP4", "v1.mp4"]]
    top = storage.list_files(root, extensions=["mp4", "webm"], recursive=False)
    assert [os.path.basename(u) for u in top] == ["v1.mp4", "w.webm"]
    if root.startswith("s3://"):
        assert all(u.startswith("s3://") for u in all_files)
    assert storage.list_files(storage.join(root, "missing")) == []
    # a single file is listed as itself
    assert storage.list_files(storage.join(root, "v1.mp4")) == [storage.join(_full(root), "v1.mp4")]


def test_file_info_changes_after_overwrite(root):
    uri = storage.join(root, "clip.mp4")
    storage.write_bytes(uri, b"first")
    before = storage.file_info(uri)
    assert before["size"] == 5 and before["mtime"] is not None
    time.sleep(0.01)
    storage.write_bytes(uri, b"second")  # same second on S3: the ETag tells
    after = storage.file_info(uri)
    assert after["size"] == 6
    assert after != before
    if root.startswith("s3://"):
        assert before["etag"] and after["etag"] and before["etag"] != after["etag"]
    with pytest.raises(FileNotFoundError):
        storage.file_info(storage.join(root, "nope.mp4"))


def test_local_copy(root):
    uri = storage.join(root, "sub/video.mp4")
    storage.write_bytes(uri, b"not really a video")
    with storage.local_copy(uri) as path:
        assert os.path.isfile(path) and path.endswith("video.mp4")
        with open(path, "rb") as f:
            assert f.read() == b"not really a video"
    if root.startswith("s3://"):
        assert not os.path.exists(path)  # the temporary download is gone
    else:
        assert path == os.path.abspath(uri)


def test_upload_and_download_dir(root, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.json").write_text("{}")
    (src / "a" / "b" / "w.safetensors").write_bytes(b"\x01" * 1000)
    dest = storage.join(root, "ckpt")
    assert storage.upload_dir(str(src), dest) == 2
    assert storage.list_files(dest) == [
        storage.join(_full(dest), "a/b/w.safetensors"),
        storage.join(_full(dest), "top.json"),
    ]
    out = tmp_path / "out"
    assert storage.download_dir(dest, str(out)) == 2
    assert (out / "top.json").read_text() == "{}"
    assert (out / "a" / "b" / "w.safetensors").read_bytes() == b"\x01" * 1000


def test_makedirs_and_remove(root):
    storage.makedirs(storage.join(root, "made"))
    storage.write_bytes(storage.join(root, "made/x/y.bin"), b"1")
    storage.remove(storage.join(root, "made/x/y.bin"))
    assert not storage.exists(storage.join(root, "made/x/y.bin"))
    storage.write_bytes(storage.join(root, "made/x/z.bin"), b"1")
    storage.remove(storage.join(root, "made"), recursive=True)
    assert storage.list_files(storage.join(root, "made")) == []
    storage.remove(storage.join(root, "never-existed"))  # no error


def test_pyarrow_parquet_round_trip(root):
    table = pa.table({"video_id": ["a", "b"], "clip_index": [0, 1]})
    fs, path = storage.pyarrow_filesystem(storage.join(root, "shards"))
    fs.create_dir(path, recursive=True)
    pq.write_table(table, path + "/part-0.parquet", filesystem=fs)
    assert pq.read_table(path + "/part-0.parquet", filesystem=fs).equals(table)
    # and the file is visible through the fsspec side too
    assert storage.list_files(storage.join(root, "shards"), extensions=[".parquet"])
    assert "secret" not in repr(fs).lower()


def test_checks_pass_for_good_paths(root):
    storage.write_bytes(storage.join(root, "in/v.mp4"), b"x")
    storage.check_readable(storage.join(root, "in"))
    storage.check_readable(storage.join(root, "in/v.mp4"))
    storage.check_writable(storage.join(root, "out"))
    with pytest.raises(StorageError, match="input not found: .*missing"):
        storage.check_readable(storage.join(root, "missing"))


def test_local_check_writable_fails_readably(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot write output to"):
        storage.check_writable(str(blocker / "sub"))


def test_missing_bucket_is_reported(s3_env):
    with pytest.raises(StorageError, match="bucket not found: s3://no-such-bucket-"):
        storage.check_writable("s3://no-such-bucket-4242/out")
    with pytest.raises(StorageError, match="input not found: s3://no-such-bucket-4242/x"):
        storage.check_readable("s3://no-such-bucket-4242/x")


def test_wrong_credentials_fail_readably_without_secret(s3_bucket, s3_server, monkeypatch):
    storage.write_bytes(storage.join(s3_bucket, "x.bin"), b"x")
    wrong = "WrongSecret" + "9" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    for check in (storage.check_readable, storage.check_writable):
        with pytest.raises(StorageError) as info:
            check(storage.join(s3_bucket, "x.bin"))
        message = str(info.value)
        assert "access denied" in message and s3_bucket in message, message
        assert "\n" not in message
        for secret in (wrong, s3_server.secret_key):
            assert secret not in message and secret not in repr(info.value)
    # plain helpers raise the library's error; it must not carry the secret either
    with pytest.raises(PermissionError) as info:
        storage.read_bytes(storage.join(s3_bucket, "x.bin"))
    assert wrong not in str(info.value)


def test_configure_s3_overrides_environment(s3_server, monkeypatch, tmp_path):
    # Start from an environment pointing nowhere useful; configure_s3 (what CLI
    # flags call) must be enough. monkeypatch restores the variables afterwards.
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.setenv(name, "placeholder")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stale-token")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.configure_s3(
        endpoint_url=s3_server.endpoint_url,
        key=s3_server.access_key,
        secret=s3_server.secret_key,
        region=s3_server.region,
    )
    assert "AWS_SESSION_TOKEN" not in os.environ
    # The endpoint in AWS_ENDPOINT_URL_S3 wins over the generic AWS_ENDPOINT_URL.
    storage.makedirs("s3://configured-bucket")
    storage.write_text("s3://configured-bucket/hello.txt", "hi")
    assert storage.read_text("s3://configured-bucket/hello.txt") == "hi"
    env = storage.s3_env_vars()
    assert env["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint_url
    # Child processes (how Ray workers start) see the same settings.
    code = "from pipelines.platform import storage; print(storage.read_text('s3://configured-bucket/hello.txt'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=60,
    )
    assert out.stdout.strip() == "hi", out.stderr
    storage.remove("s3://configured-bucket", recursive=True)


def test_unreachable_endpoint_fails_fast(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "UnreachableSecret" + "7" * 16
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "somekey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for check in (storage.check_readable, storage.check_writable):
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            check("s3://bucket/videos/")
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert elapsed < 10, elapsed
        assert f"cannot reach S3 endpoint http://127.0.0.1:{port}" in message, message
        assert "s3://bucket" in message
        assert secret not in message and secret not in repr(info.value)


def test_silent_endpoint_fails_fast(monkeypatch):
    """A server that accepts connections but never answers must not hang a job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{s.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "somekey")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "somesecret")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        start = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach S3 endpoint .*s3://bucket/in"):
            storage.check_readable("s3://bucket/in")
        assert time.monotonic() - start < 10


def test_no_secret_in_reprs(s3_env):
    fs, _ = storage.get_filesystem("s3://bucket/x")
    pafs, _ = storage.pyarrow_filesystem("s3://bucket/x")
    settings = storage._settings()
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    for obj in (fs, pafs, settings):
        assert secret not in repr(obj) and secret not in str(obj)


def test_a_fetched_model_is_removed_when_its_process_exits(s3_bucket, tmp_path):
    """model_store.fetch_model downloads an s3:// model to a scratch folder that lives as long as the process."""
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"\x00" * 64)
    uri = storage.join(s3_bucket, "models", "m")
    storage.upload_dir(str(src), uri)
    code = (
        "import sys; from pipelines.platform.model_store import fetch_model, model_digest; "
        "d = fetch_model(sys.argv[1]); "
        "print(d); print(model_digest(d))"
    )
    out = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, check=True).stdout.split()
    from pipelines.platform.model_store import model_digest

    assert out[1] == model_digest(src)  # the same weights while the process ran
    assert not os.path.exists(out[0]), "the scratch copy outlived its process"
