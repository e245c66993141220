"""Guarded HTTP(S) fetching: what every download of the download stage enforces, whatever the distributor.

:func:`fetch` is the one download function. For each URL it

* fetches only ``http``/``https`` (:func:`curate.urlpolicy.url_reason`), for the URL itself and for every
  redirect target (a 302 to ``ftp://`` or ``file://`` is refused, not followed); the opener has no
  ``file:``/``ftp:``/``data:`` handler at all;
* refuses hosts that resolve to a loopback / link-local / private / reserved / multicast / unspecified address
  (:func:`curate.urlpolicy.address_reason`; cloud metadata at 169.254.169.254 included) unless
  ``allow_private_hosts``. The check runs on the addresses the socket then connects to (one resolution: a DNS
  answer cannot change between check and connect). Through an HTTP(S) proxy from the environment, the URL's
  own host is resolved and checked, and the proxy itself is trusted;
* reads at most ``max_bytes`` of body (a larger ``Content-Length`` is refused before reading; a body that grows
  past it stops there);
* enforces a total ``deadline`` per download (connect, TLS, redirects, headers, body): a per-process reaper
  thread shuts the download's sockets down when it expires, so a server dripping one byte per second cannot hold
  a download longer than the deadline. ``timeout`` stays the limit per socket operation.
  DNS resolution itself is bounded by the system resolver's own timeouts.

Failures are :class:`Refused` with a short deterministic text (no object reprs, no memory addresses); other
errors keep urllib's text with any ``at 0x…`` removed (:func:`clean_error`).
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from curate.reasons import stable_reason
from curate.urlpolicy import address_reason, url_reason

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's
CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchPolicy:
    """The limits of one download (picklable: it travels to img2dataset's workers with the downloader)."""

    timeout: float = 10.0  # seconds per socket operation
    deadline: float = 60.0  # seconds for the whole download
    max_bytes: int = 32 << 20  # response body cap
    max_pixels: int = 100_000_000  # checked from the image header before decoding (see curate.i2d)
    allow_private_hosts: bool = False


class Refused(Exception):
    """A download refused by policy; ``str()`` is the per-row reason."""




def clean_error(text: str) -> str:
    """An error text without memory addresses, on one line (:func:`curate.reasons.stable_reason`)."""
    return stable_reason(text) or ""


def _fmt_s(x: float) -> str:
    return f"{x:g} s"


# --------------------------------------------------------------------------------------------------------
# per-download budget + the reaper that enforces the deadline
# --------------------------------------------------------------------------------------------------------
class _Budget:
    """One download's deadline and the sockets it opened (dup'ed, so shutting them down never hits a reused fd)."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self.deadline = time.monotonic() + policy.deadline
        self.expired = False
        self.done = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        if self.expired or self.remaining() <= 0:
            self.expired = True
            raise Refused(f"download took longer than its deadline ({_fmt_s(self.policy.deadline)})")

    def op_timeout(self) -> float:
        self.check()
        return min(self.policy.timeout, self.remaining())

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if self.done:
                return
            dup = sock.dup()
            self._socks.append(dup)
            if self.expired:
                _shutdown(dup)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            for s in self._socks:
                _shutdown(s)

    def close(self) -> None:
        with self._lock:
            self.done = True
            for s in self._socks:
                s.close()
            self._socks.clear()


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Reaper:
    """One daemon thread per process: expires budgets whose deadline has passed (a heap of deadlines)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, _Budget]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, budget: _Budget) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tether-download-deadline", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (budget.deadline, next(self._seq), budget))
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    budget = heapq.heappop(self._heap)[2]
                    if not budget.done:
                        budget.expire()
                self._cv.wait(self._heap[0][0] - now if self._heap else None)


_REAPER = _Reaper()


def _reset_after_fork() -> None:  # a forked child (pyspark's python workers) starts its own reaper
    global _REAPER, _SSL_CONTEXT
    _REAPER = _Reaper()
    _SSL_CONTEXT = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)

_SSL_CONTEXT: ssl.SSLContext | None = None
_SSL_LOCK = threading.Lock()


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    with _SSL_LOCK:
        if _SSL_CONTEXT is None:
            _SSL_CONTEXT = ssl.create_default_context()
        return _SSL_CONTEXT


# --------------------------------------------------------------------------------------------------------
# connections: resolve once, check the addresses, connect under the budget
# --------------------------------------------------------------------------------------------------------
def _resolve(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Refused(f"host {host} does not resolve ({e.strerror})") from None


def _check_addresses(host: str, infos: list[tuple]) -> None:
    bad = sorted({(address_reason(i[4][0]), i[4][0]) for i in infos if address_reason(i[4][0])})
    if bad:
        kind, ip = bad[0]
        raise Refused(f"host {host} resolves to a {kind} address ({ip}); "
                      "set media.download.allow_private_hosts: true to allow it")


def _connect(budget: _Budget, address: tuple[str, int], check_host: bool) -> socket.socket:
    host, port = address
    infos = _resolve(host, port)
    if check_host:
        _check_addresses(host, infos)
    err: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            budget.add(sock)
            sock.settimeout(budget.op_timeout())
            sock.connect(sockaddr)
            sock.settimeout(budget.policy.timeout)
            return sock
        except OSError as e:
            err = e
            sock.close()
        except Refused:
            sock.close()
            raise
    raise err if err is not None else OSError(f"no address for {host}")


def _conn_factory(base: type, budget: _Budget, check_host: bool):
    def make(host, **kw):
        conn = base(host, **kw)
        conn._create_connection = lambda address, *a, **k: _connect(budget, address, check_host)
        return conn

    return make


class _Guard:
    """Mixin for the HTTP(S) handlers: every connection goes through :func:`_connect` under one budget."""

    budget: _Budget

    def _guarded_open(self, base: type, req: urllib.request.Request, **kw):
        self.budget.check()
        proxied = req.has_proxy() or getattr(req, "_tunnel_host", None)
        private_ok = self.budget.policy.allow_private_hosts
        if proxied and not private_ok:  # the proxy is the operator's; the URL's own host is checked here
            parts = urlsplit(req.full_url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            _check_addresses(parts.hostname, _resolve(parts.hostname, port))
        return self.do_open(_conn_factory(base, self.budget, not proxied and not private_ok), req, **kw)


class _HTTPHandler(_Guard, urllib.request.HTTPHandler):
    def __init__(self, budget: _Budget):
        super().__init__()
        self.budget = budget

    def http_open(self, req):
        return self._guarded_open(http.client.HTTPConnection, req)


class _HTTPSHandler(_Guard, urllib.request.HTTPSHandler):
    def __init__(self, budget: _Budget):
        super().__init__(context=_ssl_context())
        self.budget = budget

    def https_open(self, req):
        return self._guarded_open(http.client.HTTPSConnection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL :func:`url_reason` accepts (the host is checked when it connects)."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            reason = url_reason(urljoin(req.full_url, target))
            if reason:
                fp.close()
                raise Refused(f"redirect refused: {reason}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener(budget: _Budget) -> urllib.request.OpenerDirector:
    """http(s) only: no file/ftp/data handler is installed (an unknown scheme fails in UnknownHandler)."""
    op = urllib.request.OpenerDirector()
    for h in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _HTTPHandler(budget),
              _HTTPSHandler(budget), urllib.request.HTTPDefaultErrorHandler(), _RedirectHandler(),
              urllib.request.HTTPErrorProcessor()):
        op.add_handler(h)
    return op


# --------------------------------------------------------------------------------------------------------
# one download
# --------------------------------------------------------------------------------------------------------
def _read_body(resp, budget: _Budget) -> bytes:
    cap = budget.policy.max_bytes
    declared = resp.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > cap:
        raise Refused(f"response body larger than max_bytes ({cap} bytes)")
    buf = bytearray()
    while True:
        budget.check()
        chunk = resp.read1(CHUNK)  # one socket read at most: the loop sees every byte as it comes
        if not chunk:
            break
        buf += chunk
        if len(buf) > cap:
            raise Refused(f"response body larger than max_bytes ({cap} bytes)")
    budget.check()
    if resp.length:  # Content-Length promised more than came
        raise Refused(f"response body truncated ({len(buf)} of {len(buf) + resp.length} bytes)")
    if not buf:
        raise Refused("empty response body")
    return bytes(buf)


def fetch(url: str, policy: FetchPolicy, headers: dict | None = None, accept=None) -> bytes:
    """The body of ``url`` under ``policy``; raises :class:`Refused` (or urllib's errors) otherwise.

    ``accept(response_headers)`` may return a reason to refuse the response before its body is read.
    """
    reason = url_reason(url)
    if reason:
        raise Refused(reason)
    budget = _Budget(policy)
    _REAPER.watch(budget)
    try:
        req = urllib.request.Request(url.strip(), headers={"User-Agent": USER_AGENT, **(headers or {})})
        try:
            with _opener(budget).open(req, timeout=policy.timeout) as resp:
                why = accept(resp.headers) if accept else None
                if why:
                    raise Refused(why)
                return _read_body(resp, budget)
        except Refused:
            raise
        except Exception:  # a socket shut down by the reaper surfaces as any I/O error: name the deadline
            budget.check()
            raise
    finally:
        budget.close()


def fetch_error(err: BaseException) -> str:
    """The per-row text for a failed :func:`fetch`."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError) \
            and isinstance(err.reason, Refused):
        return str(err.reason)
    return clean_error(str(err)) or type(err).__name__
