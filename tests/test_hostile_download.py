"""The download stage against a hostile loopback server (issue 17): http(s) only, every redirect checked, private
hosts refused by default, bounded body / time / pixels per sample, and img2dataset workers that die with their
parent. Every case runs through the real img2dataset (multiprocessing distributor) and ends as a per-row reason
in the catalog."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from curate.catalog import Catalog
from curate.download import DownloadConfig, load_selection, run_download
from curate.fetch import FetchPolicy, Refused, fetch
from curate.urlpolicy import address_reason
from httpserver import PhotoServer, make_build

REPO = Path(__file__).resolve().parent.parent

HUGE = 64 << 20  # what the server would send
CAP = 1 << 20  # max_bytes in the test
DEADLINE = 1.5
DRIP_S = 0.2
# small caps so that every case is fast; loopback needs the opt-in
CFG = {"processes_count": 1, "thread_count": 16, "timeout": 3, "deadline": DEADLINE, "max_bytes": CAP,
       "max_pixels": 10_000_000, "min_image_size": 10, "number_sample_per_shard": 100, "image_size": 64,
       "allow_private_hosts": True}


def _photos(d: Path, n: int = 3) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.effect_noise((120 + i, 90), 60 + i).convert("RGB")
        im.save(d / f"p{i}.jpg", quality=90)
    return d


def _build(root: Path, rows: list[dict]) -> Path:
    rows = [{"caption": r["uid"], "source": "web", "concept_ids": ["n1"], **r} for r in rows]
    build = root / "build"
    make_build(build, rows)
    return build


def _download(build: Path, cfg: dict) -> dict[str, tuple]:
    with Catalog(build / "catalog.duckdb") as cat:
        load_selection(cat, build / "selection.parquet")
        run_download(cat, DownloadConfig(**cfg), build, progress=False)
        out = {u: (s, e) for u, s, e in cat.execute("SELECT uid, status, error FROM downloads").fetchall()}
        why = dict(cat.execute("SELECT uid, reason FROM decisions WHERE stage = 'download'").fetchall())
    assert set(why) == set(out)  # every row: one outcome and one decision
    for uid, (status, err) in out.items():
        assert why[uid] == (status if status == "success" else f"{status}: {err or ''}")
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One img2dataset run over every hostile route (plus good photos), shared by the per-case tests."""
    root = tmp_path_factory.mktemp("hostile")
    photos = _photos(root / "photos")
    ftp = socket.socket()  # a listening "ftp server": a followed redirect would connect here
    ftp.bind(("127.0.0.1", 0))
    ftp.listen(4)
    ftp.setblocking(False)
    secret = root / "secret.txt"
    secret.write_text("tether-secret-contents\n")
    with PhotoServer(photos, truncate_from="p0.jpg", huge_bytes=HUGE, drip_s=DRIP_S) as srv:
        b = srv.base
        rows = [
            {"uid": "ok", "url": srv.url("p0.jpg")},
            {"uid": "redirect-ok", "url": srv.redirect(srv.url("p1.jpg"))},
            {"uid": "html", "url": b + "/html.jpg"},
            {"uid": "truncated", "url": b + "/truncated.jpg"},
            {"uid": "zero", "url": b + "/zero.jpg"},
            {"uid": "bomb", "url": b + "/bomb.png"},
            {"uid": "huge", "url": b + "/huge.jpg"},
            {"uid": "huge-declared", "url": b + "/huge-declared.jpg"},
            {"uid": "drip", "url": b + "/drip.jpg"},
            {"uid": "redirect-file", "url": srv.redirect(secret.as_uri())},
            {"uid": "redirect-ftp", "url": srv.redirect(f"ftp://127.0.0.1:{ftp.getsockname()[1]}/x.jpg")},
            {"uid": "file", "url": secret.as_uri()},
            {"uid": "data", "url": "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ=="},
        ]
        build = _build(root, rows)
        out = _download(build, CFG)
        sent = dict(srv.sent)
    try:
        ftp.accept()
        ftp_connected = True
    except BlockingIOError:
        ftp_connected = False
    ftp.close()
    blobs = b"".join(p.read_bytes() for p in (build / "media").rglob("*") if p.is_file())
    yield {"out": out, "sent": sent, "ftp_connected": ftp_connected, "blobs": blobs}


def test_good_urls_and_allowed_redirects_still_download(hostile):
    assert hostile["out"]["ok"] == ("success", None)
    assert hostile["out"]["redirect-ok"] == ("success", None)


@pytest.mark.parametrize("uid, expected", [
    ("html", ("failed_to_resize", "Image decoding error")),
    ("truncated", ("failed_to_resize", "Image decoding error")),
    ("zero", ("failed_to_download", "empty response body")),
    ("bomb", ("failed_to_resize", "image refused before decoding: more than 178956970 pixels "
                                  "(decompression bomb; max_pixels 10000000)")),
    ("huge", ("failed_to_download", f"response body larger than max_bytes ({CAP} bytes)")),
    ("huge-declared", ("failed_to_download", f"response body larger than max_bytes ({CAP} bytes)")),
    ("drip", ("failed_to_download", f"download took longer than its deadline ({DEADLINE:g} s)")),
    ("redirect-file", ("failed_to_download",
                       "redirect refused: url scheme 'file' not allowed (only http and https)")),
    ("redirect-ftp", ("failed_to_download", "redirect refused: url scheme 'ftp' not allowed (only http and https)")),
    ("file", ("failed_to_download", "url scheme 'file' not allowed (only http and https)")),
    ("data", ("failed_to_download", "url scheme 'data' not allowed (only http and https)")),
])
def test_hostile_case_gets_its_reason(hostile, uid, expected):
    assert hostile["out"][uid] == expected


def test_huge_body_stops_reading(hostile):
    # the server could only push what the socket buffers took before the client hung up
    assert hostile["sent"]["/huge.jpg"] < HUGE // 2
    assert hostile["sent"]["/huge-declared.jpg"] < HUGE // 2


def test_drip_feed_bounded_by_the_deadline(hostile):
    # one byte per DRIP_S: the download stopped at the deadline (the server would have sent 200 bytes)
    assert hostile["sent"]["/drip.jpg"] <= DEADLINE / DRIP_S + 2


def test_refused_schemes_read_nothing(hostile):
    assert not hostile["ftp_connected"]  # the ftp redirect was never followed
    assert b"tether-secret-contents" not in hostile["blobs"]  # no local file reached the build folder


def test_error_texts_are_deterministic(hostile):
    assert not any("0x" in (e or "") or "object at" in (e or "") for _, e in hostile["out"].values())


def test_private_hosts_refused_by_default(tmp_path):
    """Default config: loopback and the cloud metadata address are refused before any request is sent."""
    photos = _photos(tmp_path / "photos", 1)
    with PhotoServer(photos) as srv:
        rows = [{"uid": "loopback", "url": srv.url("p0.jpg")},
                {"uid": "localhost", "url": srv.url("p0.jpg").replace("127.0.0.1", "localhost") + "?name"},
                {"uid": "metadata", "url": "http://169.254.169.254/latest/meta-data/"}]
        out = _download(_build(tmp_path, rows), {k: v for k, v in CFG.items() if k != "allow_private_hosts"})
        assert not srv.hits  # nothing reached the server
    hint = "set media.download.allow_private_hosts: true to allow it"
    assert out["loopback"] == ("failed_to_download",
                               f"host 127.0.0.1 resolves to a loopback address (127.0.0.1); {hint}")
    assert out["localhost"][0] == "failed_to_download" and out["localhost"][1].startswith(
        "host localhost resolves to a loopback address (")
    assert out["metadata"] == ("failed_to_download",
                               f"host 169.254.169.254 resolves to a link-local address (169.254.169.254); {hint}")


def test_private_hosts_allowed_with_the_opt_in(tmp_path):
    photos = _photos(tmp_path / "photos", 1)
    with PhotoServer(photos) as srv:
        out = _download(_build(tmp_path, [{"uid": "loopback", "url": srv.url("p0.jpg")}]), CFG)
        assert srv.hits == {"/img/p0.jpg": 1}
    assert out["loopback"] == ("success", None)


def test_address_rule():
    cases = {"127.0.0.1": "loopback", "::1": "loopback", "::ffff:127.0.0.1": "loopback",
             "169.254.169.254": "link-local", "fe80::1%eth0": "link-local", "10.1.2.3": "private",
             "192.168.0.1": "private", "172.16.0.1": "private", "0.0.0.0": "unspecified", "224.0.0.1": "multicast",
             "100.64.0.1": "non-public", "8.8.8.8": None, "2606:4700:4700::1111": None}
    assert {ip: address_reason(ip) for ip in cases} == cases


def test_pixel_cap_from_the_header(tmp_path):
    """An ordinary photo over a small max_pixels is refused from its header, before any decode."""
    from curate.i2d import pixel_reason

    buf = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buf, format="PNG")
    assert pixel_reason(buf, 120_000) is None
    assert pixel_reason(buf, 119_999) == "image refused before decoding: 400x300 = 120000 pixels > max_pixels (119999)"
    assert pixel_reason(io.BytesIO(b"<html></html>"), 10) is None  # not an image: left to the decoder


def test_redirect_hops_are_checked_for_hosts_too(tmp_path, monkeypatch):
    """A first hop that is allowed cannot bounce into a private address: every connection checks its host.
    (Here the rule is relaxed for 127.0.0.1 only, so that the loopback server can play the public first hop.)"""
    import curate.fetch

    real = curate.fetch.address_reason
    monkeypatch.setattr(curate.fetch, "address_reason", lambda ip: None if ip == "127.0.0.1" else real(ip))
    photos = _photos(tmp_path / "photos", 1)
    with PhotoServer(photos) as srv:
        assert fetch(srv.url("p0.jpg"), FetchPolicy(timeout=2, deadline=5)) == (photos / "p0.jpg").read_bytes()
        with pytest.raises(Refused, match=r"^host 169\.254\.169\.254 resolves to a link-local address"):
            fetch(srv.redirect("http://169.254.169.254/latest/meta-data/"), FetchPolicy(timeout=2, deadline=5))
        assert srv.hits == {"/img/p0.jpg": 1, "/redirect?to=" + srv.redirect("http://169.254.169.254/latest/meta-data/")
                            .split("?to=")[1]: 1}


KILL_SCRIPT = """
import sys
from pathlib import Path
from curate.catalog import Catalog
from curate.download import DownloadConfig, load_selection, run_download
if __name__ == "__main__":
    build = Path(sys.argv[1])
    with Catalog(build / "catalog.duckdb") as cat:
        load_selection(cat, build / "selection.parquet")
        run_download(cat, DownloadConfig.model_validate_json(sys.argv[2]), build, progress=False)
"""


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a live process from /proc, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every descendant of ``pid``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))):
            children.setdefault(st[0], []).append((int(d.name), st[2]))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += [k for k, _ in kids]
    return out


def _alive(proc: tuple[int, int]) -> bool:
    st = _stat(proc[0])
    return st is not None and st[2] == proc[1] and st[1] != "Z"  # same process (not a reused pid), not a zombie


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_parent_kills_img2dataset_workers(tmp_path):
    """SIGKILL to the main process only (not its group): the pool workers (busy and idle) and img2dataset's
    logger process die with it instead of lingering."""
    photos = _photos(tmp_path / "photos", 1)
    script = tmp_path / "dl.py"
    script.write_text(KILL_SCRIPT)
    with PhotoServer(photos) as srv:
        srv.delay_s = 30  # every image request hangs: the workers are mid-download when the parent dies
        rows = [{"uid": f"u{i}", "url": srv.url("p0.jpg") + f"?{i}"} for i in range(4)]
        build = _build(tmp_path, rows)
        cfg = DownloadConfig(**{**CFG, "processes_count": 3, "thread_count": 2, "number_sample_per_shard": 2,
                                "timeout": 60, "deadline": 120})
        env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
        proc = subprocess.Popen([sys.executable, str(script), str(build), cfg.model_dump_json()], env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        kids: list = []
        try:
            deadline = time.time() + 90
            while (not srv.hits or len(_descendants(proc.pid)) < 4) and time.time() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                time.sleep(0.1)
            kids = _descendants(proc.pid)
            assert srv.hits and len(kids) >= 4  # 3 pool workers + the logger (+ multiprocessing's tracker)
            os.kill(proc.pid, signal.SIGKILL)  # the main process only
            proc.wait(timeout=10)
            until = time.time() + 15
            while any(_alive(k) for k in kids) and time.time() < until:
                time.sleep(0.1)
            survivors = [k for k in kids if _alive(k)]
            assert survivors == []
        finally:
            for k in kids:  # never leave a process of this test behind, even when it fails
                if _alive(k):
                    os.kill(k[0], signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
