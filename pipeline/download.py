"""Download stage: ``python -m pipeline.download [--params params.yaml] [--out data/raw]``.

Fetches the four Fashion-MNIST IDX files from ``download.sources`` (local folders
and http(s) base URLs, tried in order per file), checks each file's *decompressed*
sha256 and size, and moves it into ``--out`` only once verified. A source that
fails is reported in one line and the next is tried; when every source fails for
a file, the stage exits non-zero listing why each one failed.

A URL may carry ``user:password@``: it is sent as HTTP basic auth (never on to a
redirect target), and every line that names the source shows the password as ``***``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from pipeline.dataset import FILES
from pipeline.errors import DownloadError, cli, redact
from pipeline.files import atomic_path, remove_partial
from pipeline.params import load_params

CHUNK = 1 << 16
MIN_RATE = 16 * 1024  # bytes/s: a source slower than this on average fails (beyond download.timeout)


class SourceError(Exception):
    """One source could not provide one file; the message says why, in a few words."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _userinfo(url: str) -> tuple[str, str | None, str]:
    """``url`` as (everything before its ``user:password@``, that userinfo or None, everything after it)."""
    scheme, sep, rest = url.partition("://")
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    if not (sep and at):
        return url, None, ""
    return f"{scheme}://", userinfo, host + rest[end:]


def _basic_auth(url: str) -> tuple[str, str | None]:
    """``url`` without its userinfo, and the ``Authorization`` value that userinfo makes (None if it has none)."""
    head, userinfo, tail = _userinfo(url)
    if userinfo is None:
        return url, None
    user, _, password = (urllib.parse.unquote(part) for part in userinfo.partition(":"))
    return head + tail, "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


@dataclass(frozen=True)
class Attempt:
    """One place a file may come from: a URL, or a file in a local folder."""

    where: str
    gzipped: bool


def attempts(source: str, name: str) -> list[Attempt]:
    """Where ``source`` may hold ``name``: its ``.gz`` at a URL; in a folder, ``name.gz`` then ``name``, if there."""
    if is_url(source):
        return [Attempt(source.rstrip("/") + f"/{name}.gz", True)]
    folder = Path(source.removeprefix("file://"))
    try:
        if not folder.is_dir():
            raise SourceError("directory not found")
        candidates = ((folder / f"{name}.gz", True), (folder / name, False))
        found = [Attempt(str(p), gz) for p, gz in candidates if p.is_file()]
    except OSError as e:  # a folder (or one above it) that this user may not search
        raise SourceError(_reason(e)) from None
    if not found:
        raise SourceError(f"neither {name}.gz nor {name} is there")
    return found


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another http(s) URL (urllib's default would follow one to ftp: or file:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not is_url(newurl):
            raise SourceError(f"redirected to {newurl.partition(':')[0]}:, which is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@contextmanager
def open_attempt(attempt: Attempt, timeout: float) -> Iterator[tuple[BinaryIO, int | None, str]]:
    """Open ``attempt``: yields (stream, size if known, where the bytes come from, after any redirects)."""
    if not is_url(attempt.where):
        with _open_local(attempt.where) as f:
            yield f, os.fstat(f.fileno()).st_size, attempt.where
        return
    url, auth = _basic_auth(attempt.where)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "fashion-mnist-pipeline"})
        if auth is not None:
            req.add_unredirected_header("Authorization", auth)  # for this host only, not a redirect target
        resp = urllib.request.build_opener(_HttpOnlyRedirects).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        hint = " (check the user and password in download.sources)" if e.code == 401 else ""
        raise SourceError(f"HTTP {e.code} {e.reason}{hint}") from None
    except urllib.error.URLError as e:
        raise SourceError(_reason(e.reason)) from None
    except TimeoutError:
        raise SourceError(f"timed out after {timeout:g}s") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # a malformed URL, a dropped connection
        raise SourceError(_reason(e)) from None
    with resp:
        length = resp.headers.get("Content-Length")
        yield resp, int(length) if length and length.isdigit() else None, resp.geturl()


def _open_local(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:  # no read permission, or gone since the folder was searched
        raise SourceError(_reason(e)) from None


def _reason(err: object) -> str:
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


def _chunks(stream: BinaryIO, progress: tqdm | None, deadline: float) -> Iterator[bytes]:
    """``stream``'s bytes as they arrive; a read that fails or stalls, or a source past ``deadline``, fails it."""
    read = getattr(stream, "read1", stream.read)  # whatever has arrived, so a dripping source meets the deadline
    got, start = 0, time.monotonic()
    while True:
        try:
            chunk = read(CHUNK)
        except TimeoutError:
            raise SourceError("timed out while reading") from None
        except (OSError, http.client.HTTPException) as e:  # a reset, a broken chunked response, a TLS error
            raise SourceError(f"read failed: {_reason(e)}") from None
        if not chunk:
            return
        got += len(chunk)
        if time.monotonic() > deadline:
            raise SourceError(
                f"too slow: {got} bytes in {time.monotonic() - start:.0f}s (under {MIN_RATE // 1024} KiB/s)"
            )
        if progress is not None:
            progress.update(len(chunk))
        yield chunk


def _gunzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The decompressed bytes of a gzip file (one member or several); corrupt or truncated data is an error."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for chunk in chunks:
        while chunk:
            try:
                yield inflate.decompress(chunk)
            except zlib.error as e:
                raise SourceError(f"corrupt gzip ({e})") from None
            chunk = inflate.unused_data if inflate.eof else b""
            if chunk:  # the next member of a multi-member file
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    if not inflate.eof:
        raise SourceError("truncated gzip (stream ended early)")


def copy_verified(
    stream: BinaryIO,
    gzipped: bool,
    dest: BinaryIO,
    sha256: str,
    size: int,
    progress: tqdm | None = None,
    timeout: float = 30.0,
) -> None:
    """Decompress ``stream`` into ``dest`` while checking the decompressed sha256 and size.

    The whole file must arrive within ``timeout`` plus its size at :data:`MIN_RATE`.

    Raises:
        SourceError: corrupt or truncated gzip, wrong size, checksum mismatch, or too slow.
    """
    digest, written = hashlib.sha256(), 0
    chunks = _chunks(stream, progress, time.monotonic() + timeout + size / MIN_RATE)
    for block in _gunzip(chunks) if gzipped else chunks:
        written += len(block)
        if written > size:
            raise SourceError(f"size mismatch: more than the expected {size} bytes")
        digest.update(block)
        dest.write(block)
    if written != size:
        raise SourceError(f"size mismatch: {written} bytes, expected {size}")
    if digest.hexdigest() != sha256:
        raise SourceError(f"checksum mismatch: sha256 {digest.hexdigest()[:12]}…, expected {sha256[:12]}…")


def file_is_verified(path: Path, sha256: str, size: int) -> bool:
    """True when ``path`` exists with exactly the expected size and sha256."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() == sha256


def fetch_file(name: str, sha256: str, size: int, sources: Iterable[str], out_dir: Path, timeout: float) -> None:
    """Put a verified ``out_dir/name`` in place from the first source that works.

    Raises DownloadError with one line per source when none works.
    """
    failures: list[str] = []

    def failed(where: str, e: SourceError) -> None:
        shown = redact(where)
        failures.append(f"{shown}: {e}")
        print(f"download: {name} from {shown} failed: {e}; trying the next source", file=sys.stderr, flush=True)

    for source in sources:
        try:
            tries = attempts(source, name)
        except SourceError as e:
            failed(source, e)
            continue
        for attempt in tries:
            try:
                where = _copy(attempt, out_dir / name, sha256, size, timeout)
            except SourceError as e:
                failed(source if len(tries) == 1 else attempt.where, e)
                continue
            print(f"download: {name} from {redact(where)}: {size} bytes, sha256 verified", flush=True)
            return
    raise DownloadError(f"no source provided {name}:\n" + "\n".join(f"  {f}" for f in failures))


def _copy(attempt: Attempt, dest: Path, sha256: str, size: int, timeout: float) -> str:
    """Fetch ``attempt`` into ``dest`` if it verifies; returns where the bytes came from."""
    with open_attempt(attempt, timeout) as (stream, length, where):
        quiet = None if is_url(attempt.where) else True  # a bar for network sources on a terminal only
        bar = tqdm(total=length, unit="B", unit_scale=True, desc=dest.name, leave=False, disable=quiet)
        with bar, atomic_path(dest) as tmp, tmp.open("wb") as out:
            copy_verified(stream, attempt.gzipped, out, sha256, size, bar, timeout)
    return where


def download_all(
    sources: Iterable[str], out_dir: str | Path, timeout: float, files: Mapping[str, tuple[str, int]] = FILES
) -> None:
    """Fetch every missing or unverified Fashion-MNIST file into ``out_dir``.

    ``files`` maps each file name to its decompressed (sha256, size). Verified files
    already there are kept. Nothing unverified ever appears under a file's own name: each
    is written under a temporary one and renamed once checked (pipeline/files.py).
    """
    out_dir, sources = Path(out_dir), list(sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(out_dir)  # left by a run that was killed
    errors = []
    for name, (sha256, size) in files.items():
        if file_is_verified(out_dir / name, sha256, size):
            print(f"download: {name} already present and verified", flush=True)
            continue
        (out_dir / name).unlink(missing_ok=True)
        try:
            fetch_file(name, sha256, size, sources, out_dir, timeout)
        except DownloadError as e:
            errors.append(str(e))
    if errors:
        raise DownloadError("\n".join(errors) + "\nadd a working source to download.sources in params.yaml")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fetch and verify the Fashion-MNIST IDX files.")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--out", default="data/raw", help="folder for the verified IDX files (default: %(default)s)")
    return p.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_params(args.params)
    download_all(params.download.sources, args.out, params.download.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
