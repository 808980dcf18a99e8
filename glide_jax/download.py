"""Downloading files into the local cache: vocab files now, released model weights later.

`fetch` writes to `<dest>.partial` and renames into place only once the file is complete and
verified, so a file under its final name is always whole: its size must match the server's
Content-Length (or Content-Range total) and any `expected_size`/`sha256` the caller knows. An
interrupted download is resumed with an HTTP Range request on the next attempt (or restarted if the
server ignores Range); a failing server is tried `retries + 1` times in all, never more. Offline mode
(`GLIDE_JAX_OFFLINE=1` or `offline=True`) never touches the network and says exactly which file is
missing and where to put it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

__all__ = ["DownloadError", "cache_dir", "check_file", "fetch", "is_offline", "sha256_file"]

_CHUNK = 1 << 16
# Status codes worth another try: the server may recover; any other 4xx will not.
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
# Backoff doubles per attempt; a caller asking for many retries should not wait hours on one.
_MAX_WAIT = 30.0


class DownloadError(RuntimeError):
    """A file could not be downloaded or verified (the message says how to provide it by hand).

    `dest` is the final path; `partial` the `.partial` file kept for the next call to resume, or
    None when nothing usable was kept. `dest` itself is never a file that failed verification
    by this call: a complete download that fails its check is deleted before this is raised.
    """

    def __init__(self, message: str, *, dest: Path | None = None, partial: Path | None = None):
        super().__init__(message)
        self.dest, self.partial = dest, partial


def cache_dir() -> Path:
    """Directory for downloaded files: `$GLIDE_JAX_CACHE`, else the platform's user cache dir.

    Linux: `$XDG_CACHE_HOME/glide_jax` (default `~/.cache/glide_jax`); macOS:
    `~/Library/Caches/glide_jax`; Windows: `%LOCALAPPDATA%\\glide_jax\\Cache`. Not created here.
    """
    override = os.environ.get("GLIDE_JAX_CACHE")
    if override:
        return Path(override).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "glide_jax"
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "glide_jax" / "Cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glide_jax"


def is_offline(offline: bool | None = None) -> bool:
    """The explicit argument wins; otherwise `GLIDE_JAX_OFFLINE` set to 1/true/yes/on."""
    if offline is not None:
        return offline
    return os.environ.get("GLIDE_JAX_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_hint(url: str, dest: Path, sha256: str | None) -> str:
    hint = f"To provide the file by hand, download {url} and save it as {dest}"
    if sha256:
        hint += f" (sha256 {sha256})"
    return hint + "."


def check_file(path: str | os.PathLike, expected_size: int | None = None,
               sha256: str | None = None) -> Path:
    """`path`, once it is a file of `expected_size` bytes with `sha256` (those that are given).

    For files that did not come through `fetch` (a directory the user filled by hand): checked
    before anything reads them, so a cut file is reported as cut, not as a corrupt checkpoint.
    Raises `DownloadError` naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DownloadError(f"{path} is missing (or not a file)", dest=path)
    problem = _verify(path, expected_size, sha256)
    if problem is not None:
        raise DownloadError(f"{path}: its {problem}; it is truncated, from another release or "
                            f"corrupted", dest=path)
    return path


def _verify(path: Path, expected_size: int | None, sha256: str | None) -> str | None:
    """None when `path` matches the expected size/hash, else what is wrong."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"size is {size} bytes, expected {expected_size}"
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            return f"sha256 is {actual}, expected {sha256.lower()}"
    return None


class _Progress:
    """Plain-text progress on stderr, redrawn at most every `interval` seconds."""

    def __init__(self, name: str, total: int | None, start: int, enabled: bool):
        self.name, self.total, self.start = name, total, start
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        # Without a terminal each update is a new line, so update rarely.
        self.interval = 0.25 if self.tty else 10.0
        self.t0 = self.last = time.monotonic()

    @staticmethod
    def _size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        raise AssertionError("unreachable")

    def update(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        speed = (done - self.start) / max(now - self.t0, 1e-6)
        text = f"{self.name}: {self._size(done)}"
        if self.total:
            text += f" / {self._size(self.total)} ({100.0 * done / self.total:5.1f}%)"
        text += f" {self._size(speed)}/s"
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


class _Transient(Exception):
    """An attempt failed in a way that another attempt (resuming the partial file) may fix."""


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-999/1000" -> 100
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def _content_range_total(value: str | None) -> int | None:
    # "bytes 100-999/1000" or "bytes */1000" -> 1000; "bytes 100-999/*" -> None
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _attempt(
    url: str,
    partial: Path,
    expected_size: int | None,
    progress: bool,
    timeout: float,
    name: str,
) -> None:
    """One HTTP request that appends to `partial` until the server's body is complete."""
    have = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and have > expected_size:
        partial.unlink()  # longer than the real file: garbage, start over
        have = 0
    if expected_size is not None and have == expected_size:
        return
    request = urllib.request.Request(url, headers={"User-Agent": "glide-jax"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Range not satisfiable: our partial is at least as long as the file. Only a partial
            # of exactly the file's size can be the file; anything else (or a server that does
            # not say the size) is discarded and the next attempt starts from zero.
            total = _content_range_total(e.headers.get("Content-Range") if e.headers else None)
            if total is not None and total == have:
                return
            partial.unlink()
            raise _Transient(f"the partial file has {have} bytes and the server answered 416 with "
                             f"Content-Range {e.headers.get('Content-Range') if e.headers else None!r}; "
                             f"restarting from zero") from e
        if e.code in _TRANSIENT_HTTP:
            raise _Transient(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise _Transient(f"cannot connect: {getattr(e, 'reason', e)}") from e

    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if have and status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                partial.unlink()  # the next attempt starts from zero instead of guessing
                raise _Transient(
                    f"server answered the range request for bytes {have}- with "
                    f"Content-Range {response.headers.get('Content-Range')!r}"
                )
            mode = "ab"
            announced = _content_range_total(response.headers.get("Content-Range"))
        else:
            # A 200 to a Range request means the server ignores ranges: restart from zero.
            have, mode = 0, "wb"
            announced = None
        total = have + length if length is not None else announced
        if announced is not None and total != announced:
            partial.unlink()
            raise _Transient(f"the server's Content-Range total {announced} disagrees with "
                             f"{have} bytes held plus Content-Length {length}")
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"the server's file is {total} bytes, expected {expected_size}")
        if total is None:
            total = expected_size
        bar = _Progress(name, total, have, progress)
        with open(partial, mode) as out:
            done = _copy(response, out, have, expected_size, bar)
        bar.update(done, final=True)
        if length is not None and done - have != length:
            raise _Transient(f"connection closed after {done} of {total} bytes")
        if length is None and expected_size is not None and done < expected_size:
            # No Content-Length: the body ends when the server closes, so a short one only
            # shows against the size the caller knows. Keep it and resume.
            raise _Transient(f"connection closed after {done} of {expected_size} bytes")


def _copy(response: BinaryIO, out: BinaryIO, done: int, limit: int | None, bar: _Progress) -> int:
    """Append the response body to `out`; network failures are transient, disk failures not."""
    while True:
        try:
            block = response.read(_CHUNK)
        except (http.client.HTTPException, OSError) as e:
            bar.update(done, final=True)
            raise _Transient(f"connection lost after {done} bytes: {e!r}") from e
        if not block:
            return done
        out.write(block)
        done += len(block)
        if limit is not None and done > limit:
            raise DownloadError(f"received more than the expected {limit} bytes")
        bar.update(done)


def _download_with_retries(url: str, dest: Path, partial: Path, expected_size, progress, timeout,
                           retries: int, retry_wait: float, hint: str) -> None:
    """Attempts into `partial` until one completes; transient failures wait and try again."""
    failures: list[str] = []
    for attempt in range(retries + 1):
        try:
            _attempt(url, partial, expected_size, progress, timeout, dest.name)
        except _Transient as e:
            failures.append(str(e))
            if attempt < retries:
                time.sleep(min(retry_wait * 2**attempt, _MAX_WAIT))
                continue
            tried = "; ".join(f"attempt {i + 1}: {msg}" for i, msg in enumerate(failures))
            kept = partial if partial.exists() else None
            resume = (f"The partial file {partial} is kept and will be resumed." if kept
                      else "Nothing was kept.")
            raise DownloadError(
                f"downloading {url} to {dest} failed after {attempt + 1} attempts ({tried}). "
                f"{resume} {hint}", dest=dest, partial=kept) from e
        except DownloadError as e:
            partial.unlink(missing_ok=True)
            raise DownloadError(f"downloading {url} to {dest} failed: {e}. {hint}",
                                dest=dest) from e
        except OSError as e:  # writing the partial file: disk full, permissions
            kept = partial if partial.exists() else None
            raise DownloadError(f"downloading {url} to {dest} failed: {e}. {hint}", dest=dest,
                                partial=kept) from e
        break


def fetch(
    url: str,
    dest_path: str | os.PathLike,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    offline: bool | None = None,
    retries: int = 3,
    retry_wait: float = 1.0,
    timeout: float = 60.0,
) -> Path:
    """Make sure `dest_path` holds the file at `url`; download it if needed; return the path.

    An existing `dest_path` that matches `expected_size`/`sha256` is used as is (one that does not
    is downloaded again). The download goes to `<dest_path>.partial`, which a later call resumes.
    Transient failures (connection errors, timeouts, HTTP 5xx/408/429, cut transfers) are retried
    `retries` times (so at most `retries + 1` requests), waiting `retry_wait`·2^k seconds, at most
    30 s each. A body shorter than the server's Content-Length is a cut transfer, and a file whose
    size or hash differs from `expected_size`/`sha256` is deleted, never renamed into place.
    `offline` (default: `$GLIDE_JAX_OFFLINE`) forbids any network access. Raises `DownloadError`
    naming the URL, the destination, what went wrong and how to provide the file by hand; its
    `partial` attribute is the file kept for resuming, if any.
    """
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative int, got {retries!r}")
    dest = Path(dest_path)
    partial = dest.with_name(dest.name + ".partial")
    hint = _manual_hint(url, dest, sha256)

    if dest.exists():
        problem = _verify(dest, expected_size, sha256)
        if problem is None:
            return dest
        if is_offline(offline):
            raise DownloadError(
                f"{dest} exists but its {problem}, and offline mode is on "
                f"(GLIDE_JAX_OFFLINE) so it cannot be downloaded again from {url}. {hint}",
                dest=dest)
        print(f"{dest}: {problem}; downloading it again", file=sys.stderr)
    elif is_offline(offline):
        raise DownloadError(
            f"{dest} is missing and offline mode is on (GLIDE_JAX_OFFLINE), so it was not "
            f"downloaded from {url}. {hint}", dest=dest)

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the directory for {dest}: {e}. {hint}",
                            dest=dest) from e

    _download_with_retries(url, dest, partial, expected_size, progress, timeout, retries, retry_wait, hint)
    if not partial.exists():
        raise DownloadError(f"downloading {url} to {dest} produced no file. {hint}", dest=dest)
    problem = _verify(partial, expected_size, sha256)
    if problem is not None:
        # A complete download that fails verification cannot be repaired by resuming.
        partial.unlink()
        raise DownloadError(f"downloaded {url} but the file's {problem}; deleted it. {hint}",
                            dest=dest)
    os.replace(partial, dest)
    return dest
