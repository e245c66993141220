"""Random access to the image bytes the download stage stored (:mod:`curate.download` records where each image
is: ``downloads(format, store, shard, key)``). Used by image dedup, the shard writer and the explorer."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path


class ImageStore:
    """Random access to stored image bytes by a ``downloads`` row (format, store, shard, key).

    webdataset: the tar ``store/shard.tar`` is indexed once (member → offset, size) and read with ``pread``;
    files: ``store/shard/key.<ext>``; local: the file at ``key``.
    """

    def __init__(self, encode_format: str = "jpg"):
        self.ext = encode_format
        self._index: dict[str, dict[str, tuple[int, int]]] = {}
        self._fds: dict[str, int] = {}

    def _tar_index(self, tar_path: str) -> dict[str, tuple[int, int]]:
        idx = self._index.get(tar_path)
        if idx is None:
            idx = {}
            with tarfile.open(tar_path, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        idx[m.name] = (m.offset_data, m.size)
            self._index[tar_path] = idx
            self._fds[tar_path] = os.open(tar_path, os.O_RDONLY)
        return idx

    def read(self, fmt: str, store: str, shard: str, key: str) -> bytes:
        if fmt == "local":
            with open(key, "rb") as f:
                return f.read()
        if fmt == "files":
            with open(Path(store) / shard / f"{key}.{self.ext}", "rb") as f:
                return f.read()
        if fmt == "webdataset":
            tar_path = str(Path(store) / f"{shard}.tar")
            off, size = self._tar_index(tar_path)[f"{key}.{self.ext}"]
            return os.pread(self._fds[tar_path], size, off)
        raise ValueError(f"unknown image store format {fmt!r}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._index.clear()

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
