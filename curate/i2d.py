"""img2dataset under tether's download rules: every worker fetches through :func:`curate.fetch.fetch`, checks the
pixel count before decoding, and (multiprocessing) dies with the process that started it.

:func:`guarded` swaps three names in ``img2dataset.main`` for the duration of one ``img2dataset.download`` call:

* ``Downloader`` → :class:`GuardedDownloader`: the downloader object img2dataset pickles to every worker, with
  whatever distributor (multiprocessing, pyspark, ray). In the worker it installs :func:`download_image` in
  place of img2dataset's urllib download for the shard it runs, and wraps the resizer in :class:`PixelGuard`;
* ``multiprocessing_distributor`` → the same spawn pool, with a worker initializer that ties each worker's
  life to its parent (:func:`die_with_parent`), also the idle ones;
* ``LoggerProcess`` → :class:`GuardedLoggerProcess`, the same tie for img2dataset's logger process.

With pyspark / ray the workers belong to the cluster (their lifetime is the cluster's); the fetch and pixel
rules still hold in them, provided tether is importable there.

This module imports img2dataset (OpenCV, albumentations): import it only where a download runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import sys
import threading
import warnings
from multiprocessing import get_context

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import img2dataset.downloader as i2d_downloader  # noqa: E402
import img2dataset.main  # noqa: E402,F401 - the package's ``main`` attribute is the CLI function, not the module
from img2dataset.distributor import retrier  # noqa: E402
from img2dataset.logger import LoggerProcess  # noqa: E402

from tether.distribute import die_with_parent  # noqa: E402
from curate.fetch import USER_AGENT, FetchPolicy, Refused, clean_error, fetch, fetch_error  # noqa: E402

i2d_main = sys.modules["img2dataset.main"]


# --------------------------------------------------------------------------------------------------------
# workers die with their parent
# --------------------------------------------------------------------------------------------------------
class GuardedLoggerProcess(LoggerProcess):
    """img2dataset's logger process, tied to the process that starts it."""

    def start(self):
        self._tether_parent = os.getpid()
        return super().start()

    def run(self):
        die_with_parent(self._tether_parent)
        return super().run()


def guarded_multiprocessing_distributor(processes_count, downloader, reader, _subjob_size, max_shard_retry):
    """img2dataset's multiprocessing distributor (spawn pool, 5 tasks per child, shard retries) whose workers
    die with this process."""
    from tether.progress import progress as tqdm

    with get_context("spawn").Pool(processes_count, initializer=die_with_parent, initargs=(os.getpid(),),
                  maxtasksperchild=5) as pool:
        def run(shards):
            return [row for ok, row in tqdm(pool.imap_unordered(downloader, shards)) if ok is False]

        retrier(run, run(reader), max_shard_retry)
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------------------------------------
# the download function and the pixel check, installed in the workers
# --------------------------------------------------------------------------------------------------------
def download_image(row, timeout, user_agent_token, disallowed_header_directives, *, policy: FetchPolicy):
    """img2dataset's ``download_image`` contract — ``(key, BytesIO | None, error | None)`` — through
    :func:`curate.fetch.fetch` with ``policy`` (``timeout`` is img2dataset's own, the same number)."""
    key, url = row
    headers = {}
    if user_agent_token:
        headers["User-Agent"] = (f"{USER_AGENT} (compatible; {user_agent_token}; "
                                 "+https://github.com/rom1504/img2dataset)")

    def accept(h):
        if disallowed_header_directives and i2d_downloader.is_disallowed(h, user_agent_token,
                                                                          disallowed_header_directives):
            return "Use of image disallowed by X-Robots-Tag directive"
        return None

    try:
        pol = policy if policy.timeout == timeout else dataclasses.replace(policy, timeout=timeout)
        return key, io.BytesIO(fetch(str(url), pol, headers, accept)), None
    except Refused as e:
        return key, None, str(e)
    except Exception as e:  # noqa: BLE001 - any fetch error is a per-row reason
        return key, None, fetch_error(e)


class PixelGuard:
    """Wraps img2dataset's resizer: refuses an image whose header declares more than ``max_pixels`` before
    anything decodes it; cleans memory addresses out of the resizer's error texts."""

    def __init__(self, resizer, max_pixels: int):
        self.resizer = resizer
        self.max_pixels = max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        reason = pixel_reason(img_stream, self.max_pixels)
        img_stream.seek(0)
        if reason:
            return None, None, None, None, None, reason
        out = self.resizer(img_stream, blurring_bbox_list)
        if out[-1] is not None:
            out = (*out[:-1], clean_error(str(out[-1])))
        return out


def pixel_reason(stream, max_pixels: int) -> str | None:
    """A reason when the image header in ``stream`` declares more than ``max_pixels`` pixels (header only:
    nothing is decoded). Streams Pillow does not recognise pass (the decoder reports them)."""
    from PIL import Image

    stream.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        return (f"image refused before decoding: more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels "
                f"(decompression bomb; max_pixels {max_pixels})")
    except Exception:  # noqa: BLE001 - not an image Pillow knows: left to img2dataset's decoder
        return None
    if w * h > max_pixels:
        return f"image refused before decoding: {w}x{h} = {w * h} pixels > max_pixels ({max_pixels})"
    return None


class GuardedDownloader(i2d_downloader.Downloader):
    """img2dataset's Downloader carrying a :class:`FetchPolicy`; each shard it runs fetches through it."""

    def __init__(self, *args, policy: FetchPolicy, **kw):
        super().__init__(*args, **kw)
        self.policy = policy
        self.resizer = PixelGuard(self.resizer, policy.max_pixels)

    def __call__(self, row):
        original = i2d_downloader.download_image
        i2d_downloader.download_image = functools.partial(download_image, policy=self.policy)
        try:
            return super().__call__(row)
        finally:
            i2d_downloader.download_image = original


_PATCH_LOCK = threading.Lock()
_PATCHED = ("Downloader", "LoggerProcess", "multiprocessing_distributor")


@contextlib.contextmanager
def guarded(policy: FetchPolicy):
    """Within the block, ``img2dataset.download`` runs with the guarded downloader, distributor and logger."""
    missing = [n for n in _PATCHED if not hasattr(i2d_main, n)]
    if missing or not hasattr(i2d_downloader, "download_image"):
        raise RuntimeError(f"img2dataset {getattr(i2d_main, '__version__', '')} lacks {missing or 'download_image'}: "
                           "tether's download guards need the img2dataset version pinned in pyproject.toml")
    with _PATCH_LOCK:
        saved = {n: getattr(i2d_main, n) for n in _PATCHED}
        i2d_main.Downloader = functools.partial(GuardedDownloader, policy=policy)
        i2d_main.LoggerProcess = GuardedLoggerProcess
        i2d_main.multiprocessing_distributor = guarded_multiprocessing_distributor
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(i2d_main, n, v)
