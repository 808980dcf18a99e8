"""`glide_jax.download.fetch` against a local HTTP server on 127.0.0.1 (never the internet)."""

import hashlib
import os

import numpy as np
import pytest

from glide_jax import download
from glide_jax.download import DownloadError, fetch

from local_http import serving

DATA = np.random.default_rng(0).integers(0, 256, size=300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with serving({"/file.bin": DATA}) as srv:
        srv.url = f"{srv.base_url}/file.bin"
        yield srv


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("GLIDE_JAX_OFFLINE", raising=False)


def _fetch(server, dest, **kw):
    kw.setdefault("retry_wait", 0.0)
    kw.setdefault("progress", False)
    return fetch(server.url, dest, **kw)


def test_success_with_size_and_hash(server, tmp_path, capsys):
    dest = tmp_path / "sub" / "file.bin"
    out = _fetch(server, dest, expected_size=len(DATA), sha256=SHA, progress=True)
    assert out == dest and dest.read_bytes() == DATA
    assert not (tmp_path / "sub" / "file.bin.partial").exists()
    err = capsys.readouterr().err
    assert "file.bin" in err and "100.0%" in err and "/s" in err
    assert len(server.requests) == 1 and server.requests[0]["range"] is None


def test_existing_verified_file_is_not_downloaded(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(DATA)
    assert _fetch(server, dest, sha256=SHA) == dest
    assert server.requests == []


def test_corrupt_existing_file_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")
    _fetch(server, dest, sha256=SHA)
    assert dest.read_bytes() == DATA


def test_interrupted_download_resumes_with_range(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.cuts = [100_000]
    with pytest.raises(DownloadError) as info:
        _fetch(server, dest, sha256=SHA, retries=0)
    partial = tmp_path / "file.bin.partial"
    assert not dest.exists(), "a cut download must never appear under the final name"
    assert partial.stat().st_size == 100_000
    assert "will be resumed" in str(info.value) and server.url in str(info.value)

    _fetch(server, dest, sha256=SHA, expected_size=len(DATA))
    assert dest.read_bytes() == DATA and not partial.exists()
    assert server.requests[-1]["range"] == "bytes=100000-"


def test_interruption_is_retried_within_one_call(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.cuts = [70_000, 50_000]
    _fetch(server, dest, sha256=SHA, retries=2)
    assert dest.read_bytes() == DATA
    assert [r["range"] for r in server.requests] == [None, "bytes=70000-", "bytes=120000-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.support_range = False
    server.cuts = [100_000]
    _fetch(server, dest, sha256=SHA, expected_size=len(DATA), retries=1)
    assert dest.read_bytes() == DATA
    assert server.requests[1]["range"] == "bytes=100000-"  # asked to resume, got the whole file


def test_complete_partial_is_finished_without_download(server, tmp_path):
    (tmp_path / "file.bin.partial").write_bytes(DATA)
    dest = _fetch(server, tmp_path / "file.bin", sha256=SHA)
    assert dest.read_bytes() == DATA
    # Without expected_size the server is asked for the rest and answers 416.
    assert server.requests == [{"path": "/file.bin", "range": f"bytes={len(DATA)}-"}]


def test_wrong_size(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=f"expected {len(DATA) + 1}") as info:
        _fetch(server, dest, expected_size=len(DATA) + 1)
    assert server.url in str(info.value) and str(dest) in str(info.value)
    assert not dest.exists() and not (tmp_path / "file.bin.partial").exists()


def test_http_500_retried_then_reported(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.statuses = [500] * 10
    with pytest.raises(DownloadError, match="HTTP 500") as info:
        _fetch(server, dest, retries=2)
    assert len(server.requests) == 3
    message = str(info.value)
    assert "after 3 attempts" in message and "save it as" in message and str(dest) in message
    assert not dest.exists()


def test_transient_500_then_success(server, tmp_path):
    server.statuses = [503]
    dest = _fetch(server, tmp_path / "file.bin", sha256=SHA, retries=1)
    assert dest.read_bytes() == DATA and len(server.requests) == 2


def test_404_is_not_retried(server, tmp_path):
    server.files = {}
    with pytest.raises(DownloadError, match="HTTP 404"):
        _fetch(server, tmp_path / "file.bin", retries=3)
    assert len(server.requests) == 1


def test_hash_mismatch_deletes_download(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=f"sha256 is {SHA}, expected {'0' * 64}"):
        _fetch(server, dest, sha256="0" * 64)
    assert not dest.exists() and not (tmp_path / "file.bin.partial").exists()


def test_unreachable_server(tmp_path):
    # A port that was just free: connection refused, retried, then reported.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(DownloadError, match="cannot connect"):
        fetch(url, tmp_path / "x.bin", retries=1, retry_wait=0.0, progress=False)


def test_offline_mode_env(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GLIDE_JAX_OFFLINE", "1")
    dest = tmp_path / "weights" / "file.bin"
    with pytest.raises(DownloadError) as info:
        _fetch(server, dest, sha256=SHA)
    message = str(info.value)
    assert "offline" in message and str(dest) in message and server.url in message and SHA in message
    assert server.requests == []
    # A verified file already in place is fine offline.
    dest.parent.mkdir()
    dest.write_bytes(DATA)
    assert _fetch(server, dest, sha256=SHA) == dest


def test_offline_argument_overrides_env(server, tmp_path, monkeypatch):
    with pytest.raises(DownloadError, match="offline"):
        _fetch(server, tmp_path / "file.bin", offline=True)
    monkeypatch.setenv("GLIDE_JAX_OFFLINE", "1")
    assert _fetch(server, tmp_path / "file.bin", offline=False).read_bytes() == DATA


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GLIDE_JAX_CACHE", str(tmp_path / "c"))
    assert download.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GLIDE_JAX_CACHE")
    if os.name == "posix" and not download.sys.platform == "darwin":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert download.cache_dir() == tmp_path / "xdg" / "glide_jax"


# -- bounded retries ------------------------------------------------------------------------------


def test_server_that_always_cuts_is_tried_retries_plus_one_times(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.cuts = [1000] * 50
    with pytest.raises(DownloadError, match="after 4 attempts") as info:
        _fetch(server, dest, sha256=SHA, retries=3)
    assert len(server.requests) == 4
    assert not dest.exists()
    assert info.value.partial == tmp_path / "file.bin.partial"
    assert info.value.partial.read_bytes() == DATA[:4000]  # each attempt resumed the last


@pytest.mark.parametrize("retries", [0, 1, 5])
def test_failing_server_gets_exactly_retries_plus_one_requests(server, tmp_path, retries):
    server.statuses = [503] * 50
    with pytest.raises(DownloadError, match=f"after {retries + 1} attempts.*HTTP 503"):
        _fetch(server, tmp_path / "file.bin", retries=retries)
    assert len(server.requests) == retries + 1


def test_negative_retries_are_refused_before_any_request(server, tmp_path):
    with pytest.raises(ValueError, match="retries"):
        _fetch(server, tmp_path / "file.bin", retries=-1)
    assert server.requests == []


def test_hanging_server_times_out_a_bounded_number_of_times(server, tmp_path):
    server.stall = 1.0
    with pytest.raises(DownloadError, match="after 2 attempts") as info:
        _fetch(server, tmp_path / "file.bin", retries=1, timeout=0.2)
    assert len(server.requests) == 2
    assert "timed out" in str(info.value)
    assert not (tmp_path / "file.bin").exists()


def test_backoff_is_capped(server, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    server.statuses = [500] * 50
    with pytest.raises(DownloadError):
        fetch(server.url, tmp_path / "file.bin", retries=8, retry_wait=1.0, progress=False)
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]


# -- truncated or wrong-size files never reach the final name -----------------------------------


def test_body_without_content_length_is_resumed_to_the_expected_size(server, tmp_path):
    server.send_length = False
    server.cuts = [100_000]
    dest = _fetch(server, tmp_path / "file.bin", expected_size=len(DATA), retries=1)
    assert dest.read_bytes() == DATA
    assert [r["range"] for r in server.requests] == [None, "bytes=100000-"]


def test_cut_body_without_content_length_fails_its_hash_and_is_deleted(server, tmp_path):
    server.send_length = False
    server.cuts = [100_000]
    with pytest.raises(DownloadError, match="sha256 is") as info:
        _fetch(server, tmp_path / "file.bin", sha256=SHA, retries=0)
    assert info.value.partial is None
    assert list(tmp_path.iterdir()) == []


def test_partial_longer_than_the_file_is_not_renamed_into_place(server, tmp_path):
    # Nothing to check it against but the server's answer: 416 with the true size.
    (tmp_path / "file.bin.partial").write_bytes(DATA + b"junk")
    dest = _fetch(server, tmp_path / "file.bin", retries=1)
    assert dest.read_bytes() == DATA
    assert [r["range"] for r in server.requests] == [f"bytes={len(DATA) + 4}-", None]


def test_wrong_size_from_the_server_is_refused_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError, match=f"server's file is {len(DATA)} bytes, expected 10"):
        _fetch(server, tmp_path / "file.bin", expected_size=10, retries=3)
    assert len(server.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_check_file(tmp_path):
    path = tmp_path / "base.pt"
    with pytest.raises(DownloadError, match=r"base\.pt is missing"):
        download.check_file(path)
    path.write_bytes(DATA[:1000])
    with pytest.raises(DownloadError, match=rf"base\.pt: its size is 1000 bytes, expected {len(DATA)}"):
        download.check_file(path, expected_size=len(DATA))
    with pytest.raises(DownloadError, match=r"sha256 is"):
        download.check_file(path, expected_size=1000, sha256=SHA)
    path.write_bytes(DATA)
    assert download.check_file(path, len(DATA), SHA) == path
