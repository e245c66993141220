"""``curate serve BUILD``: a read-only local web explorer over a build's catalog and stored images.

Pages (server-rendered with Jinja2 on FastAPI/Starlette, served by uvicorn on 127.0.0.1 by default):

* ``/``                 overview: stages with counts, rejection reasons, concept head/tail curve, sources
* ``/concepts``         searchable, paginated concept table (matched / balance before-after / alive counts)
* ``/concept/{id}``     gloss, kept samples (thumbnails, the matched span highlighted), dropped ones + reasons,
  and (builds with ``media.agreement``) the samples by image–text agreement, worst first, with the sense check
* ``/sample/{uid}``     what ``curate inspect`` says: decisions per stage, matches, duplicate group, shard/key
* ``/search``           caption search (every word must occur, case-insensitive), filters: concept, status, source
* ``/thumb/{uid}``      a JPEG thumbnail of the stored image (``?size=`` 32..1024), with cache headers
* ``/images``, ``/model`` with ``--model``: text → image search over the build's images (embeddings cached per
  build + model fingerprint under ``$TETHER_CACHE/serve``), the model's config and eval reports

* ``/model`` also draws the patch-level similarity map of a text over an image (``?uid=&q=``, the PNG at
  ``/model/patchmap.png``) when the model's image head embeds patch tokens (``LoadedModel.patch_similarity``)

Read-only by construction: the catalog is opened with ``duckdb.connect(path, read_only=True)`` and images are
read (one tar member, one file) from where the build stored them — never extracted, never written. What has to be
precomputed for large builds (per-concept ranked members, a caption word index, per-sample lookups: see
:class:`Summary`) is cached outside the build, under ``$TETHER_CACHE/serve``. Bad input
(unknown uid/concept, malformed query) gets an HTML page with a 4xx status, never a traceback.
"""

from curate.serve.app import create_app
from curate.serve.cli import cmd_serve, register
from curate.serve.common import (COUNT_CAP, GRID_SIZE, IMAGE_HITS, MAX_PAGE, MAX_QUERY_CHARS, PAGE_SIZE, STATUSES,
                                 BadRequest, NotFound, cache_root)
from curate.serve.explorer import Explorer
from curate.serve.models import ModelIndex
from curate.serve.render import head_tail_svg, heat_colors, highlight, quote_id
from curate.serve.summary import Summary

__all__ = ["create_app", "cmd_serve", "register", "Explorer", "Summary", "ModelIndex", "cache_root", "highlight",
           "heat_colors", "head_tail_svg", "quote_id", "BadRequest", "NotFound", "PAGE_SIZE", "GRID_SIZE", "MAX_PAGE",
           "MAX_QUERY_CHARS", "COUNT_CAP", "IMAGE_HITS", "STATUSES"]
