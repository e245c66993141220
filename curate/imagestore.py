"""Random access to the image bytes the download stage stored (:mod:`curate.download` records where each image
is: ``downloads(format, store, shard, key)``), and to the members of the build's own shards. The ONE stored-image
reader: image dedup, the agreement stage, the shard writer and the explorer all read through it — and the bounded
local-file check and read (:func:`local_file_reason`, :func:`read_local_file`) that ingest and the download use."""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

MAX_IMAGE_BYTES = 64 << 20  # default ``ingest.max_image_bytes``


def local_file_reason(path: str, max_bytes: int, check_files: bool = True) -> str | None:
    """Why the local image ``path`` cannot be used (None = usable): a NUL in the path, a missing file (only when
    ``check_files``), anything but a regular file (``/dev/zero``, a FIFO, a folder: never read), a file over
    ``max_bytes``. ``stat`` only — nothing is opened. Symlinks are followed (a link to a photo is fine)."""
    if "\x00" in path:
        return "image path contains NUL bytes"
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "image file not found" if check_files else None
    except (OSError, ValueError) as e:
        if not check_files:
            return None
        code = errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)
        return f"image file not accessible ({code})"
    if not stat.S_ISREG(st.st_mode):
        return "image path is not a regular file"
    if st.st_size > max_bytes:
        return f"image file too large ({st.st_size} > {max_bytes} bytes)"
    return None


def read_local_file(path: str, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes | None, str | None]:
    """Read one local image with a bound: ``(data, None)`` or ``(None, reason)``. Only a regular file of at most
    ``max_bytes`` is read (checked before opening and again on the open descriptor, opened non-blocking so a FIFO
    swapped in cannot hang, and never more than ``max_bytes + 1`` bytes read)."""
    why = local_file_reason(path, max_bytes)
    if why == "image file not found":
        return None, f"no such file: {path}"
    if why:
        return None, why
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, f"no such file: {path}"
    except OSError as e:
        return None, f"image file not accessible ({errno.errorcode.get(e.errno or 0, type(e).__name__)})"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "image path is not a regular file"
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        return None, f"image file too large (> {max_bytes} bytes)"
    return data, None


class StoredImageError(OSError):
    """A stored image that is missing, unreadable or larger than the reader's bound (one line)."""


class ImageStore:
    """Bounded random access to stored image bytes by a ``downloads`` row (format, store, shard, key).

    webdataset: the tar ``store/shard.tar`` is indexed once (member → offset, size) and each member read at its
    offset; files: ``store/shard/key.<ext>``; local: the file at ``key``. Every read is bounded by ``max_bytes`` (a
    file or tar member larger than that is refused, never read whole), and at most ``max_tars`` tar indexes are
    kept (least recently used evicted), so memory is set here, not by the build. Thread-safe (the explorer serves
    pages from several threads): the indexes are shared under a lock, no file descriptor is kept between reads.
    """

    def __init__(self, encode_format: str = "jpg", max_bytes: int = MAX_IMAGE_BYTES, max_tars: int = 256):
        self.ext = encode_format
        self.max_bytes, self.max_tars = int(max_bytes), max(1, int(max_tars))
        self._tars: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()  # path → {member: (offset, size)}
        self._lock = threading.Lock()

    def _tar(self, tar_path: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            idx = self._tars.get(tar_path)
            if idx is not None:
                self._tars.move_to_end(tar_path)
                return idx
        idx = {}
        try:
            with tarfile.open(tar_path, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        idx[m.name] = (m.offset_data, m.size)
        except (OSError, tarfile.TarError) as e:
            raise StoredImageError(f"stored shard {tar_path} is unreadable ({type(e).__name__})") from None
        with self._lock:
            self._tars[tar_path] = idx
            while len(self._tars) > self.max_tars:
                self._tars.popitem(last=False)
        return idx

    def tar_member(self, tar_path: str | Path, member: str) -> bytes:
        """One member of a tar, read at its offset."""
        idx = self._tar(str(tar_path))
        if member not in idx:
            raise StoredImageError(f"{member} is not in {tar_path}")
        off, size = idx[member]
        if size > self.max_bytes:
            raise StoredImageError(f"{member} in {tar_path} is too large (> {self.max_bytes} bytes)")
        try:
            with open(tar_path, "rb") as f:
                data = os.pread(f.fileno(), size, off)
        except OSError as e:
            raise StoredImageError(f"{member} in {tar_path} is unreadable ({type(e).__name__})") from None
        if len(data) != size:
            raise StoredImageError(f"{member} in {tar_path} is truncated")
        return data

    def _file(self, path: str) -> bytes:
        data, why = read_local_file(path, self.max_bytes)
        if data is None:
            raise StoredImageError(f"stored image {path}: {why}")
        return data

    def read(self, fmt: str, store: str, shard: str, key: str) -> bytes:
        """The bytes of one stored image; :class:`StoredImageError` when it cannot be read within the bound."""
        if fmt == "local":
            return self._file(key)
        if fmt == "files":
            return self._file(str(Path(store) / shard / f"{key}.{self.ext}"))
        if fmt == "webdataset":
            return self.tar_member(Path(store) / f"{shard}.tar", f"{key}.{self.ext}")
        raise ValueError(f"unknown image store format {fmt!r}")

    def get(self, fmt: str, store: str, shard: str, key: str) -> bytes | None:
        """:meth:`read`, or None when the image cannot be read (the explorer's "no image")."""
        try:
            return self.read(fmt, store, shard, key)
        except (StoredImageError, ValueError):
            return None

    def get_member(self, tar_path: str | Path, member: str) -> bytes | None:
        """:meth:`tar_member`, or None when it cannot be read."""
        try:
            return self.tar_member(tar_path, member)
        except StoredImageError:
            return None

    def close(self) -> None:
        with self._lock:
            self._tars.clear()

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
