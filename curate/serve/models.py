"""An exported aligned model over a build's images: the explorer's text → image and image → text search and patch
maps (:class:`ModelIndex`)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from pathlib import Path

from tether.digest import update_from_file
from curate.serve.common import DEAD, NotFound, cache_root
from curate.serve.render import heat_colors


class ModelIndex:
    """An exported aligned model (loaded through :func:`tether.plugins.load_model`) over the build's images: image and caption embeddings of every
    sample with a stored image (the shards' samples when the build has shards), computed once per (build, model
    fingerprint) and cached outside the build, under :func:`cache_root`."""

    def __init__(self, explorer, model_dir: str | Path, eval_dir: str | Path | None = None):
        from tether.plugins import load_model

        self.ex = explorer
        self.dir = Path(model_dir)
        loaded = load_model(self.dir)  # align's AlignedModel: heads now, encoders on the first query
        self.model = loaded.model
        self.patch_similarity = loaded.patch_similarity  # None: pooled heads only
        self.about = loaded.about  # what the model page shows about it
        self._maps: OrderedDict[tuple[str, str], tuple[object, object]] = OrderedDict()
        h = hashlib.sha256()
        for name in loaded.files:
            update_from_file(h, name)
        self.fingerprint = h.hexdigest()[:16]
        self.cache = cache_root() / f"{explorer.build_key}-{self.fingerprint}"
        self.eval_dir = Path(eval_dir) if eval_dir else None
        self._lock = threading.Lock()
        self._index: tuple[list[str], object, object] | None = None
        self.seconds_to_build: float | None = None
        self.progress = (0, 0)  # (images embedded, images to embed) while the index is being built
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._index is not None

    def start_background(self) -> None:
        """Build (or load) the index in a thread, so the pages stay usable meanwhile (``/images`` shows progress)."""
        def run():
            try:
                self.index()
            except Exception as e:  # noqa: BLE001 - shown on /images instead of killing the server
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

        self._thread = threading.Thread(target=run, name="tether-serve-index", daemon=True)
        self._thread.start()

    def _uids(self) -> list[str]:
        with self.ex.cursor() as cur:
            if self.ex.has("shard_index"):
                rows = cur.execute("SELECT uid FROM shard_index ORDER BY pos").fetchall()
                if rows:
                    return [r[0] for r in rows]
            if self.ex.has("downloads"):
                rows = cur.execute(f"""SELECT DISTINCT s.uid FROM samples s JOIN downloads d USING (uid)
                                       WHERE d.status = 'success' AND NOT {DEAD} ORDER BY 1""").fetchall()
                if rows:
                    return [r[0] for r in rows]
            return [r[0] for r in cur.execute(
                f"SELECT uid FROM samples s WHERE path IS NOT NULL AND NOT {DEAD} ORDER BY uid").fetchall()]

    def index(self):
        """``(uids, group [N], image_emb [G, D], caption_emb [N, D])``: ``group[i]`` is the row of ``uids[i]``'s
        image in ``image_emb`` (samples whose stored images are byte-identical — several captions of one photo —
        share one row, embedded once). From the cache, or computed (then cached) once."""
        import numpy as np

        with self._lock:
            if self._index is not None:
                return self._index
            f = self.cache / "index.npz"
            if f.is_file():
                try:
                    with np.load(f, allow_pickle=False) as z:
                        self._index = (list(z["uids"]), z["group"], z["image"], z["caption"])
                    return self._index
                except (OSError, ValueError, KeyError):
                    pass  # a damaged cache file is rebuilt
            import time

            from PIL import Image

            t0 = time.time()
            todo = self._uids()
            with self.ex.cursor() as cur:
                caps = dict(cur.execute("SELECT uid, caption FROM samples WHERE uid IN (SELECT unnest(?))",
                                        [todo]).fetchall())
            uids, group, seen = [], [], {}
            images, captions, img_parts, cap_parts = [], [], [], []

            def flush(force: bool = False):
                if images and (force or len(images) >= 64):
                    img_parts.append(self.model.encode_image(images))
                    images.clear()
                if captions and (force or len(captions) >= 256):
                    cap_parts.append(self.model.encode_text(captions))
                    captions.clear()

            self.progress = (0, len(todo))
            for n, uid in enumerate(todo, 1):
                self.progress = (n, len(todo))
                data = self.ex.image_bytes(uid)
                if data is None:
                    continue
                key = hashlib.sha1(data).digest()
                if key not in seen:
                    try:
                        with Image.open(io.BytesIO(data)) as im:
                            images.append(im.convert("RGB"))
                    except Exception:  # noqa: BLE001 - an undecodable image is left out of the index
                        continue
                    seen[key] = len(seen)
                uids.append(uid)
                group.append(seen[key])
                captions.append(caps.get(uid) or "")
                flush()
            flush(force=True)
            if img_parts:  # images and captions are flushed together: both or neither
                img, cap = np.concatenate(img_parts), np.concatenate(cap_parts)
            else:  # an empty build: the width of one text embedding (the plugin contract promises encode_text only)
                img = cap = np.zeros((0, np.asarray(self.model.encode_text([""])).shape[-1]), np.float32)
            grp = np.asarray(group, dtype=np.int64)
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = self.cache / f".index.{os.getpid()}.npz"
            np.savez(tmp, uids=np.array(uids, dtype=str), group=grp, image=img, caption=cap)
            os.replace(tmp, f)
            self.seconds_to_build = time.time() - t0
            self._index = (uids, grp, img, cap)
            return self._index

    def text_to_image(self, q: str, k: int) -> list[tuple[str, float, int]]:
        """The ``k`` images nearest the text ``q``: ``(uid of its first sample, cosine, samples sharing it)``."""
        import numpy as np

        uids, grp, img, _ = self.index()
        if not uids:
            return []
        scores = img @ self.model.encode_text([q])[0]
        first = {}
        for i, g in enumerate(grp.tolist()):
            first.setdefault(g, i)
        counts = np.bincount(grp, minlength=len(img))
        top = np.argsort(-scores, kind="stable")[:k]
        return [(uids[first[int(g)]], float(scores[g]), int(counts[g])) for g in top]

    def image_to_text(self, uid: str, k: int) -> list[tuple[str, float]] | None:
        """The ``k`` indexed captions nearest ``uid``'s image (None when the image is not indexed)."""
        import numpy as np

        uids, grp, img, cap = self.index()
        try:
            i = uids.index(uid)
        except ValueError:
            return None
        scores = cap @ img[grp[i]]
        top = np.argsort(-scores, kind="stable")[:k]
        return [(uids[j], float(scores[j])) for j in top]

    def patch_map(self, uid: str, q: str) -> tuple[object, object]:
        """``(sims [h, w], view)``: the model's patch similarity map of the text ``q`` over ``uid``'s stored image
        and the part of the image it covers (the center square the encoder's preprocessing keeps). The last 32 are
        kept (the page and its PNG ask for the same map)."""
        import numpy as np
        from PIL import Image, ImageOps

        if self.patch_similarity is None:
            raise NotFound("this model has pooled heads only: it has no patch embeddings to map")
        key = (uid, q)
        with self._lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
        data = self.ex.image_bytes(uid)  # NotFound for an unknown uid
        if data is None:
            raise NotFound(f"sample {uid!r} has no stored image")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
        except Exception:  # noqa: BLE001 - a broken stored image is "no image", not a crash
            raise NotFound(f"sample {uid!r}: its stored image cannot be decoded") from None
        sims = np.asarray(self.patch_similarity(im, q), dtype=np.float32)
        if sims.ndim != 2 or not sims.size or not np.isfinite(sims).all():
            raise RuntimeError(f"the model's patch similarity is not a finite 2-D map (shape {sims.shape})")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        out = (sims, im.crop((left, top, left + side, top + side)))
        with self._lock:
            self._maps[key] = out
            while len(self._maps) > 32:
                self._maps.popitem(last=False)
        return out

    def patch_map_png(self, uid: str, q: str, size: int = 384) -> bytes:
        """The map upsampled (bilinear) over the image's center square as a heat map (dark: lowest cosine on this
        image, bright yellow: highest), blended with the photo, as PNG."""
        import numpy as np
        from PIL import Image

        sims, view = self.patch_map(uid, q)
        heat = np.asarray(Image.fromarray(sims).resize((size, size), Image.BILINEAR), dtype=np.float32)
        lo, hi = float(sims.min()), float(sims.max())
        t = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        photo = np.asarray(view.resize((size, size), Image.BICUBIC), dtype=np.float32)
        blend = (0.4 * photo + 0.6 * heat_colors(t)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(blend).save(buf, format="PNG")
        return buf.getvalue()

    def reports(self) -> list[dict]:
        """The eval reports (``<task>.md`` + ``<task>.png`` written by ``align eval``) in ``eval_dir``."""
        if not self.eval_dir or not self.eval_dir.is_dir():
            return []
        out = []
        for md in sorted(self.eval_dir.glob("*.md")):
            png = md.with_suffix(".png")
            out.append({"task": md.stem, "text": md.read_text(encoding="utf-8", errors="replace")[:20000],
                        "png": png.name if png.is_file() else None})
        return out
