"""Test helpers for the media stages: a loopback photo server and a minimal build (catalog + selection).

``PhotoServer``: a loopback HTTP server serving real photos plus the failure cases a downloader meets.

Routes (all under ``http://127.0.0.1:<port>/``):
  img/<name>          the file ``<name>`` from the photo folder (image/jpeg)
  missing.jpg         404
  html.jpg            an HTML page served as .jpg (text/html)
  truncated.jpg       the first ``truncate_to`` bytes of a real JPEG
  tiny.jpg            a valid 1×1 JPEG (below any sensible min size)
  fixed.jpg           404 until ``fix()`` is called, then a real photo (for retry-failed)
  slow.jpg            waits ``slow_s`` seconds before answering (past the client's timeout)

Hostile routes (what a crafted URL list can point at):
  zero.jpg            200 with an empty body
  bomb.png            a ~50 KB PNG declaring 20000×20000 pixels (1-bit, all zero: a decompression bomb)
  huge.jpg            ``huge_bytes`` of JPEG-looking bytes, no Content-Length (read until the server closes)
  huge-declared.jpg   the same with its Content-Length
  drip.jpg            200 JPEG-looking bytes with their Content-Length, one byte every ``drip_s`` seconds
  redirect?to=URL     302 to URL (e.g. file:///etc/passwd, ftp://…, or another route)

Every streaming route stops when the client goes away.

The server binds port 0 on 127.0.0.1 only, runs in a daemon thread, and ``stop()`` (or leaving the ``with``
block) shuts it down and releases any handler still sleeping.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of ``width``×``height`` zero pixels: tiny on the wire, huge once decoded."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
    idat += z.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


_BOMB: list[bytes] = []


class PhotoServer:
    def __init__(self, photo_dir: str | Path, truncate_from: str | None = None, truncate_to: int = 400,
                 slow_s: float = 6.0, huge_bytes: int = 64 << 20, drip_s: float = 0.2):
        self.photo_dir = Path(photo_dir)
        self.slow_s = slow_s
        self.huge_bytes = huge_bytes
        self.drip_s = drip_s
        self.sent: dict[str, int] = {}  # bytes of body written per streaming route
        self.released = threading.Event()
        self.fixed = threading.Event()
        self.delay_s = 0.0  # per /img/ request, to make a download take long enough to be killed
        self.hits: dict[str, int] = {}
        src = self.photo_dir / truncate_from if truncate_from else next(iter(sorted(self.photo_dir.glob("*.jpg"))))
        self.truncated = src.read_bytes()[:truncate_to]
        self.tiny = tiny_jpeg()
        self.fixed_photo = sorted(self.photo_dir.glob("*.jpg"))[-1].read_bytes()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> "PhotoServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, name: str, total: int, declared: bool, piece: int, pause: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                if declared:
                    self.send_header("Content-Length", str(total))
                self.end_headers()
                body = outer.tiny[:2] + bytes(piece)  # starts like a JPEG
                outer.sent[name] = 0
                while outer.sent[name] < total and not outer.released.is_set():
                    n = min(piece, total - outer.sent[name])
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    outer.sent[name] += n
                    if pause:
                        outer.released.wait(pause)

            def do_GET(self):  # noqa: N802 - http.server API
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1  # with the query: counts per URL
                path = self.path.split("?")[0]
                try:
                    if path == "/zero.jpg":
                        return self._send(200, b"", "image/jpeg")
                    if path == "/bomb.png":
                        if not _BOMB:
                            _BOMB.append(png_bomb())
                        return self._send(200, _BOMB[0], "image/png")
                    if path in ("/huge.jpg", "/huge-declared.jpg"):
                        return self._stream(path, outer.huge_bytes, path == "/huge-declared.jpg", 1 << 16, 0)
                    if path == "/drip.jpg":
                        return self._stream(path, 200, True, 1, outer.drip_s)
                    if path == "/redirect":
                        to = parse_qs(urlsplit(self.path).query).get("to", [""])[0]
                        self.send_response(302)
                        self.send_header("Location", to)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    if path.startswith("/img/"):
                        if outer.delay_s:
                            outer.released.wait(outer.delay_s)
                        f = outer.photo_dir / Path(path[5:]).name
                        if f.is_file():
                            return self._send(200, f.read_bytes(), "image/jpeg")
                        return self._send(404, b"not found", "text/plain")
                    if path == "/html.jpg":
                        return self._send(200, b"<!doctype html><html><body><h1>Moved</h1></body></html>",
                                          "text/html")
                    if path == "/truncated.jpg":
                        return self._send(200, outer.truncated, "image/jpeg")
                    if path == "/fixed.jpg" and outer.fixed.is_set():
                        return self._send(200, outer.fixed_photo, "image/jpeg")
                    if path == "/tiny.jpg":
                        return self._send(200, outer.tiny, "image/jpeg")
                    if path == "/slow.jpg":
                        outer.released.wait(outer.slow_s)
                        return self._send(200, outer.tiny, "image/jpeg")
                    return self._send(404, b"not found", "text/plain")
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "PhotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/img/{name}"

    def redirect(self, to: str) -> str:
        from urllib.parse import quote

        return f"{self.base}/redirect?to={quote(to, safe='')}"

    def fix(self) -> None:
        self.fixed.set()


def make_build(build_dir: Path, rows: list[dict]) -> Path:
    """A minimal build: ``selection.parquet`` from ``rows`` (uid, url, path, caption, concept_ids, source) and a
    catalog whose ``samples`` and ``matches`` hold the same rows (what the core stages would have left)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.catalog import Catalog

    build_dir.mkdir(parents=True, exist_ok=True)
    cols = {k: [r.get(k) for r in rows] for k in ("uid", "url", "path", "caption", "source")}
    cols["concept_ids"] = [list(r.get("concept_ids") or []) for r in rows]
    sel = build_dir / "selection.parquet"
    pq.write_table(pa.table({**cols, "concept_ids": pa.array(cols["concept_ids"], pa.list_(pa.string()))}), sel)
    with Catalog(build_dir / "catalog.duckdb") as cat:
        for i, r in enumerate(rows):
            cat.execute("INSERT INTO samples(uid, source, row_index, url, path, caption) VALUES (?,?,?,?,?,?)",
                        [r["uid"], r.get("source"), i, r.get("url"), r.get("path"), r.get("caption")])
            for c in r.get("concept_ids") or []:
                cat.execute("INSERT INTO matches VALUES (?, ?, 'lexical', 1.0, NULL)", [r["uid"], c])
    return sel
