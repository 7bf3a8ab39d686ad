import base64
import gzip
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import urllib.parse
from functools import partial
from pathlib import Path

import pytest

from pipeline.download import download_all, main
from pipeline.errors import DownloadError
from tests.conftest import FILE_MODES_BIND, REPO, full_params

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture
def payloads() -> dict[str, bytes]:
    """Decompressed content per file name (small, distinct)."""
    return {name: (name.encode() * 300)[: 1000 + 17 * i] for i, name in enumerate(NAMES)}


@pytest.fixture
def files(payloads) -> dict[str, tuple[str, int]]:
    return {name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in payloads.items()}


def make_mirror(root: Path, payloads: dict[str, bytes], damage: str | None = None) -> Path:
    """A folder of .gz files; ``damage`` = truncate | corrupt | wrong-content | missing."""
    root.mkdir(parents=True)
    for name, data in payloads.items():
        gz = gzip.compress(data, mtime=0)
        if damage == "truncate":
            gz = gz[: len(gz) // 2]
        elif damage == "corrupt":
            gz = gz[:20] + bytes(b ^ 0xFF for b in gz[20:40]) + gz[40:]
        elif damage == "wrong-content":
            gz = gzip.compress(data[:-1] + b"?", mtime=0)
        elif damage == "missing":
            continue
        (root / f"{name}.gz").write_bytes(gz)
    return root


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www
    server.shutdown()
    server.server_close()
    thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_local_folder_source_yields_verified_decompressed_files(tmp_path, payloads, files):
    src = make_mirror(tmp_path / "deb", payloads)
    out = tmp_path / "data" / "raw"
    download_all([str(src)], out, timeout=5, files=files)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == payloads


def test_http_falls_through_404_truncated_and_corrupt_mirrors_to_a_good_one(
    tmp_path, http_root, payloads, files, capsys
):
    base, www = http_root
    make_mirror(www / "truncated", payloads, "truncate")
    make_mirror(www / "corrupt", payloads, "corrupt")
    make_mirror(www / "wrong", payloads, "wrong-content")
    make_mirror(www / "good", payloads)
    sources = [
        str(tmp_path / "no-such-dir"),
        f"{base}/missing",
        f"{base}/truncated",
        f"{base}/corrupt",
        f"{base}/wrong/",
        f"{base}/good",
    ]
    out = tmp_path / "raw"
    download_all(sources, out, timeout=5, files=files)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == payloads
    err = capsys.readouterr().err
    assert "no-such-dir failed: directory not found" in err
    assert "/missing failed: HTTP 404" in err
    assert "/truncated failed: truncated gzip" in err
    assert "/corrupt failed: corrupt gzip" in err
    assert "/wrong/ failed: checksum mismatch" in err


def test_refused_connection_is_reported_and_skipped(tmp_path, payloads, files, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    good = make_mirror(tmp_path / "good", payloads)
    download_all([f"http://127.0.0.1:{port}/", str(good)], tmp_path / "raw", timeout=5, files=files)
    assert "connection refused" in capsys.readouterr().err


def test_stalled_server_times_out_and_falls_through(tmp_path, payloads, files, capsys):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        good = make_mirror(tmp_path / "good", payloads)
        port = listener.getsockname()[1]
        download_all([f"http://127.0.0.1:{port}/", str(good)], tmp_path / "raw", timeout=0.3, files=files)
    finally:
        listener.close()
    assert "timed out" in capsys.readouterr().err


def test_size_mismatch_is_rejected(tmp_path, payloads, files):
    src = make_mirror(tmp_path / "deb", {k: v + b"extra" for k, v in payloads.items()})
    with pytest.raises(DownloadError, match="size mismatch"):
        download_all([str(src)], tmp_path / "raw", timeout=5, files=files)


def test_all_sources_failing_lists_every_source_and_leaves_no_partial_file(tmp_path, http_root, payloads, files):
    base, www = http_root
    make_mirror(www / "truncated", payloads, "truncate")
    out = tmp_path / "data" / "raw"
    sources = [str(tmp_path / "absent"), f"{base}/truncated", f"{base}/missing"]
    with pytest.raises(DownloadError) as info:
        download_all(sources, out, timeout=5, files=files)
    msg = str(info.value)
    assert "no source provided train-images-idx3-ubyte:" in msg
    assert f"  {tmp_path / 'absent'}: directory not found" in msg
    assert f"  {base}/truncated: truncated gzip" in msg
    assert f"  {base}/missing: HTTP 404 File not found" in msg
    assert list(out.iterdir()) == []
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]


def test_verified_files_already_present_are_kept(tmp_path, payloads, files, capsys):
    src = make_mirror(tmp_path / "deb", payloads)
    out = tmp_path / "raw"
    download_all([str(src)], out, timeout=5, files=files)
    download_all([str(tmp_path / "gone")], out, timeout=5, files=files)  # no source needed now
    assert capsys.readouterr().out.count("already present and verified") == 4


def test_a_damaged_existing_file_is_replaced(tmp_path, payloads, files):
    src = make_mirror(tmp_path / "deb", payloads)
    out = tmp_path / "raw"
    download_all([str(src)], out, timeout=5, files=files)
    (out / NAMES[0]).write_bytes(b"garbage")
    download_all([str(src)], out, timeout=5, files=files)
    assert (out / NAMES[0]).read_bytes() == payloads[NAMES[0]]


def test_cli_failure_exits_2_with_one_line_per_source_and_no_traceback(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(full_params({"download": {"sources": [str(tmp_path / "nowhere")]}})))
    with pytest.raises(SystemExit) as info:
        main(["--params", str(params), "--out", str(tmp_path / "raw")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("error: no source provided") == 1
    assert err.count("nowhere failed: directory not found; trying the next source") == 4  # as it happens
    assert err.count("nowhere: directory not found\n") == 4  # the summary: one line per file and source


def _out_is_a_file(tmp_path):
    (tmp_path / "raw").write_text("kept")
    return tmp_path / "raw", f"{tmp_path / 'raw'} is a file where a folder must be; remove it or name another path"


def _out_in_a_read_only_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o555)
    return (
        data / "raw",
        f"{data}: permission denied for this user; make it writable (and readable), or name another path",
    )


@pytest.mark.parametrize("fault", [_out_is_a_file, _out_in_a_read_only_folder], ids=["a-file", "read-only-folder"])
def test_an_out_folder_that_cannot_be_made_is_one_line_and_nothing_is_written(tmp_path, fault):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(full_params({"download": {"sources": [str(tmp_path / "nowhere")]}})))
    out, said = fault(tmp_path)
    before = {p: p.is_file() and p.read_bytes() for p in tmp_path.rglob("*")}
    cmd = [*FILE_MODES_BIND, sys.executable, "-m", "pipeline.download", "--params", str(params), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        for folder in tmp_path.glob("data"):
            folder.chmod(0o755)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {said}"]
    assert {p: p.is_file() and p.read_bytes() for p in tmp_path.rglob("*")} == before


def test_real_debian_package_matches_the_pinned_digests(tmp_path):
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist to check the pinned digests against real data")
    download_all([str(debian)], tmp_path / "raw", timeout=5)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(NAMES)


def test_killed_download_leaves_nothing_partial_and_a_rerun_completes(tmp_path, payloads, files):
    import os
    import signal
    import subprocess
    import sys
    import time

    started = threading.Event()
    release = threading.Event()

    class StallingHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = gzip.compress(os.urandom(200_000), mtime=0)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:50_000])
            self.wfile.flush()
            started.set()
            release.wait(30)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StallingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "data" / "raw"
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(full_params({"download": {"sources": [f"http://127.0.0.1:{server.server_address[1]}/"]}}))
    )
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.download", "--params", str(params), "--out", str(out)])
    try:
        assert started.wait(30), "the download never started"
        deadline = time.monotonic() + 10
        while not any(p.stat().st_size for p in out.glob(".tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    left = [p.name for p in out.iterdir()]  # only the half-written file, under its temporary name
    assert len(left) == 1 and left[0].startswith(f".tmp-{proc.pid}-train-images-idx3-ubyte-")
    download_all([str(make_mirror(tmp_path / "deb", payloads))], out, timeout=5, files=files)
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)  # the next run removed it


class FaultyServer:
    """An HTTP server on 127.0.0.1 whose every GET runs ``respond(handler)``; counts its requests."""

    def __init__(self, respond):
        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                respond(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty():
    servers = []

    def start(respond):
        servers.append(FaultyServer(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _bad_chunk_size(h):
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.write(b"zz\r\nnot a chunk\r\n")


def _closed_mid_chunk(h):
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.write(b"400\r\n" + gzip.compress(b"x" * 10, mtime=0)[:15])  # 1024 bytes announced, 15 sent
    h.wfile.flush()
    h.close_connection = True


def _reset_before_the_status_line(h):
    h.close_connection = True  # closes without a byte: http.client's RemoteDisconnected


@pytest.mark.parametrize(
    ("respond", "said"),
    [(_bad_chunk_size, "read failed"), (_closed_mid_chunk, "read failed"), (_reset_before_the_status_line, "")],
    ids=["bad-chunk-size", "closed-mid-chunk", "no-status-line"],
)
def test_a_broken_http_response_falls_through_to_the_next_source(
    tmp_path, faulty, payloads, files, capsys, respond, said
):
    server = faulty(respond)
    good = make_mirror(tmp_path / "good", payloads)
    download_all([server.url, str(good)], tmp_path / "raw", timeout=5, files=files)
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == payloads
    err = capsys.readouterr().err
    assert f"from {server.url} failed: {said}" in err and "Traceback" not in err


def test_a_malformed_url_is_one_failed_source_not_a_traceback(tmp_path, payloads, files, capsys):
    good = make_mirror(tmp_path / "good", payloads)
    download_all(["http://[::1", str(good)], tmp_path / "raw", timeout=5, files=files)
    assert "from http://[::1 failed: " in capsys.readouterr().err


def test_a_redirect_to_another_scheme_is_refused_without_connecting(tmp_path, faulty, payloads, files, capsys):
    import socket

    ftp = socket.socket()
    ftp.bind(("127.0.0.1", 0))
    ftp.listen(1)
    ftp.settimeout(0.5)

    def to_ftp(h):
        h.send_response(302)
        h.send_header("Location", f"ftp://127.0.0.1:{ftp.getsockname()[1]}/x.gz")
        h.end_headers()

    server = faulty(to_ftp)
    good = make_mirror(tmp_path / "good", payloads)
    try:
        download_all([server.url, str(good)], tmp_path / "raw", timeout=5, files=files)
        with pytest.raises(TimeoutError):  # nobody came to the ftp listener
            ftp.accept()
    finally:
        ftp.close()
    assert "failed: redirected to ftp:, which is not http(s)" in capsys.readouterr().err


def test_a_redirect_to_http_is_followed_and_the_line_names_where_the_bytes_came_from(
    tmp_path, http_root, faulty, payloads, files, capsys
):
    base, www = http_root
    make_mirror(www / "moved", payloads)

    def moved(h):
        h.send_response(301)
        h.send_header("Location", f"{base}/moved{h.path}")
        h.end_headers()

    server = faulty(moved)
    download_all([server.url], tmp_path / "raw", timeout=5, files=files)
    assert f"from {base}/moved/train-images-idx3-ubyte.gz: " in capsys.readouterr().out


def test_a_source_that_drips_fails_once_past_its_whole_file_deadline(tmp_path, faulty, payloads, files, capsys):
    import time

    body = gzip.compress(bytes(range(256)) * 20, mtime=0)  # 5 KB that will not verify: it never gets that far

    def drip(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            for i in range(0, len(body), 8):  # 8 bytes every 50 ms: each read is prompt, the file is not
                h.wfile.write(body[i : i + 8])
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client gave up
            pass

    server = faulty(drip)
    good = make_mirror(tmp_path / "good", payloads)
    started = time.monotonic()
    download_all([server.url, str(good)], tmp_path / "raw", timeout=0.5, files=files)
    assert time.monotonic() - started < 30  # the drip alone would take len(body) / 160 seconds per file
    assert "failed: too slow: " in capsys.readouterr().err


def test_a_corrupt_gz_in_a_folder_falls_back_to_the_raw_file_beside_it(tmp_path, payloads, files, capsys):
    src = make_mirror(tmp_path / "deb", payloads, "corrupt")
    for name, data in payloads.items():
        (src / name).write_bytes(data)
    download_all([str(src)], tmp_path / "raw", timeout=5, files=files)
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == payloads
    assert f"from {src / NAMES[0]}.gz failed: corrupt gzip" in capsys.readouterr().err


def test_a_multi_member_gzip_is_read_whole(tmp_path, payloads, files):
    src = tmp_path / "deb"
    src.mkdir()
    for name, data in payloads.items():
        half = len(data) // 2
        (src / f"{name}.gz").write_bytes(gzip.compress(data[:half], mtime=0) + gzip.compress(data[half:], mtime=0))
    download_all([str(src)], tmp_path / "raw", timeout=5, files=files)
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == payloads


def download_in_a_process(sources: list[Path], out: Path, files: dict) -> subprocess.CompletedProcess:
    """``download_all(sources, out, files=files)`` in a child process that file modes bind, even under root."""
    script = "import json, sys; from pipeline.download import download_all; download_all(**json.loads(sys.argv[1]))"
    args = {"sources": [str(s) for s in sources], "out_dir": str(out), "timeout": 5, "files": files}
    cmd = [*FILE_MODES_BIND, sys.executable, "-c", script, json.dumps(args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _unreadable_folder(tmp_path, payloads):
    locked = make_mirror(tmp_path / "locked", payloads)
    return [locked, make_mirror(tmp_path / "good", payloads)], [locked], f"from {locked} failed"


def _unreadable_gz_beside_a_raw_file(tmp_path, payloads):
    src = make_mirror(tmp_path / "deb", payloads)
    for name, data in payloads.items():
        (src / name).write_bytes(data)
    return [src], [src / f"{name}.gz" for name in NAMES], f"from {src / NAMES[0]}.gz failed"


def _unreadable_file(tmp_path, payloads):
    src = make_mirror(tmp_path / "deb", payloads)
    return [src, make_mirror(tmp_path / "good", payloads)], [src / f"{name}.gz" for name in NAMES], f"from {src} failed"


@pytest.mark.parametrize(
    "unreadable",
    [_unreadable_folder, _unreadable_gz_beside_a_raw_file, _unreadable_file],
    ids=["folder", "gz-beside-raw-file", "file"],
)
def test_an_unreadable_source_is_one_line_and_the_next_is_tried(tmp_path, payloads, files, unreadable):
    sources, locked, said = unreadable(tmp_path, payloads)
    for path in locked:
        path.chmod(0)
    try:
        proc = download_in_a_process(sources, tmp_path / "raw", files)
    finally:
        for path in locked:
            path.chmod(0o700)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"download: {NAMES[0]} {said}: permission denied; trying the next source\n" in proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == payloads


USER, PASSWORD, WRONG = "reader", "s3cr:t@x", "hunter2-wrong"  # ':' and '@' travel percent-encoded in a URL


def with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("://", f"://{user}:{urllib.parse.quote(password, safe='')}@", 1)


def serve_gz(payloads: dict[str, bytes]):
    """A FaultyServer response that serves each file's .gz from ``payloads``."""

    def respond(h):
        body = gzip.compress(payloads[h.path.strip("/").removesuffix(".gz")], mtime=0)
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return respond


def basic_auth_first(then):
    """A FaultyServer response that answers 401 unless the request carries USER and PASSWORD, else ``then``."""
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def respond(h):
        if h.headers.get("Authorization") != expected:
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Basic realm="mirror"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        then(h)

    return respond


def test_a_basic_auth_mirror_serves_the_files_given_its_user_and_password(tmp_path, faulty, payloads, files):
    server = faulty(basic_auth_first(serve_gz(payloads)))
    download_all([with_credentials(server.url, USER, PASSWORD)], tmp_path / "raw", timeout=5, files=files)
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == payloads


def test_a_wrong_password_is_one_line_and_the_next_source_is_tried(tmp_path, faulty, payloads, files, capsys):
    server = faulty(basic_auth_first(serve_gz(payloads)))
    good = make_mirror(tmp_path / "good", payloads)
    download_all([with_credentials(server.url, USER, WRONG), str(good)], tmp_path / "raw", timeout=5, files=files)
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == payloads
    err = capsys.readouterr().err
    hint = "HTTP 401 Unauthorized (check the user and password in download.sources)"
    assert f"download: {NAMES[0]} from {server.url.replace('://', f'://{USER}:***@')} failed: {hint}; " in err
    assert err.count(" failed: ") == len(NAMES) and "Traceback" not in err


def test_the_password_is_not_sent_on_to_a_redirect_target(tmp_path, faulty, payloads, files):
    seen = []

    def record_and_serve(h):
        seen.append(h.headers.get("Authorization"))
        serve_gz(payloads)(h)

    target = faulty(record_and_serve)

    def moved(h):
        h.send_response(302)
        h.send_header("Location", f"{target.url}{h.path}")
        h.end_headers()

    server = faulty(basic_auth_first(moved))
    download_all([with_credentials(server.url, USER, PASSWORD)], tmp_path / "raw", timeout=5, files=files)
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == payloads
    assert seen == [None] * len(NAMES)


def _fails(tmp_path, server, files) -> None:
    params = tmp_path / "params.yaml"
    wrong = with_credentials(server.url, USER, WRONG)
    token = server.url.replace("://", "://token-only-user@")  # a user with no password may be a token
    params.write_text(json.dumps(full_params({"download": {"sources": [wrong, token]}})))
    with pytest.raises(SystemExit) as info:
        main(["--params", str(params), "--out", str(tmp_path / "raw")])
    assert info.value.code == 2


def _succeeds(tmp_path, server, files) -> None:
    sources = [with_credentials(server.url, USER, WRONG), with_credentials(server.url, USER, PASSWORD)]
    download_all(sources, tmp_path / "raw", timeout=5, files=files)
    assert len(list((tmp_path / "raw").iterdir())) == len(NAMES)


@pytest.mark.parametrize("download", [_fails, _succeeds], ids=["failing", "succeeding"])
def test_a_password_in_a_source_url_is_never_printed(tmp_path, faulty, payloads, files, capsys, download):
    server = faulty(basic_auth_first(serve_gz(payloads)))
    download(tmp_path, server, files)
    out, err = capsys.readouterr()
    for secret in (PASSWORD, WRONG, urllib.parse.quote(PASSWORD, safe=""), "token-only-user"):
        assert secret not in out + err
    assert f"{USER}:***@" in err
