"""Download stage: ``python -m pipeline.download [--params params.yaml] [--out data/raw]``.

Fetches the four Fashion-MNIST IDX files from ``download.sources`` (local folders
and http(s) base URLs, tried in order per file), checks each file's *decompressed*
sha256 and size, and moves it into ``--out`` only once verified. A source that
fails is reported in one line and the next is tried; when every source fails for
a file, the stage exits non-zero listing why each one failed.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from pipeline.dataset import FILES
from pipeline.errors import DownloadError, cli
from pipeline.files import atomic_path, remove_partial
from pipeline.params import load_params

CHUNK = 1 << 16


class SourceError(Exception):
    """One source could not provide one file; the message says why, in a few words."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


@contextmanager
def open_source(source: str, name: str, timeout: float) -> Iterator[tuple[BinaryIO, bool, int | None, str]]:
    """Open ``name`` at ``source``: yields (stream, gzipped, size if known, location)."""
    if is_url(source):
        url = source.rstrip("/") + f"/{name}.gz"
        req = urllib.request.Request(url, headers={"User-Agent": "fashion-mnist-pipeline"})
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise SourceError(f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise SourceError(_reason(e.reason)) from None
        except TimeoutError:
            raise SourceError(f"timed out after {timeout:g}s") from None
        except (OSError, ValueError) as e:
            raise SourceError(_reason(e)) from None
        with resp:
            length = resp.headers.get("Content-Length")
            yield resp, True, int(length) if length and length.isdigit() else None, url
        return
    folder = Path(source.removeprefix("file://"))
    if not folder.is_dir():
        raise SourceError("directory not found")
    for candidate, gz in ((folder / f"{name}.gz", True), (folder / name, False)):
        if candidate.is_file():
            with candidate.open("rb") as f:
                yield f, gz, candidate.stat().st_size, str(candidate)
            return
    raise SourceError(f"neither {name}.gz nor {name} is there")


def _reason(err: object) -> str:
    if isinstance(err, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


def _chunks(stream: BinaryIO, progress: tqdm | None) -> Iterator[bytes]:
    """``stream``'s bytes, a chunk at a time; a read that fails or stalls is the source's fault."""
    while True:
        try:
            chunk = stream.read(CHUNK)
        except TimeoutError:
            raise SourceError("timed out while reading") from None
        except OSError as e:
            raise SourceError(f"read failed: {_reason(e)}") from None
        if not chunk:
            return
        if progress is not None:
            progress.update(len(chunk))
        yield chunk


def _gunzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The decompressed bytes of one whole gzip stream; corrupt, truncated or trailing data is an error."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for chunk in chunks:
        try:
            yield inflate.decompress(chunk)
        except zlib.error as e:
            raise SourceError(f"corrupt gzip ({e})") from None
        if inflate.eof and inflate.unused_data:
            raise SourceError("corrupt gzip (data after the end of the stream)")
    if not inflate.eof:
        raise SourceError("truncated gzip (stream ended early)")


def copy_verified(
    stream: BinaryIO, gzipped: bool, dest: BinaryIO, sha256: str, size: int, progress: tqdm | None = None
) -> None:
    """Decompress ``stream`` into ``dest`` while checking the decompressed sha256 and size.

    Raises:
        SourceError: corrupt or truncated gzip, wrong size, or checksum mismatch.
    """
    digest, written = hashlib.sha256(), 0
    chunks = _chunks(stream, progress)
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
    for source in sources:
        try:
            with open_source(source, name, timeout) as (stream, gzipped, length, where):
                quiet = None if is_url(source) else True  # a bar for network sources on a terminal only
                bar = tqdm(total=length, unit="B", unit_scale=True, desc=name, leave=False, disable=quiet)
                with bar, atomic_path(out_dir / name) as tmp, tmp.open("wb") as dest:
                    copy_verified(stream, gzipped, dest, sha256, size, bar)
        except SourceError as e:
            failures.append(f"{source}: {e}")
            print(f"download: {name} from {source} failed: {e}; trying the next source", file=sys.stderr, flush=True)
            continue
        print(f"download: {name} from {where}: {size} bytes, sha256 verified", flush=True)
        return
    raise DownloadError(f"no source provided {name}:\n" + "\n".join(f"  {f}" for f in failures))


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
