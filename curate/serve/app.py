"""The explorer's web app (FastAPI): module-level routes and error pages over the app's
:class:`curate.serve.explorer.Explorer` (``app.state.explorer``) and, with a model, its
:class:`curate.serve.models.ModelIndex` (``app.state.model_index``). :func:`create_app` builds those and mounts
the routes; the routes validate the request, ask the explorer for data and render it."""

import hashlib
import math
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

import curate.serve.common as common
from curate.serve.common import (GRID_SIZE, IMAGE_HITS, MAX_PAGE, MAX_QUERY_CHARS, PAGE_SIZE, STATUSES, BadRequest,
                                 NotFound)
from curate.serve.explorer import Explorer
from curate.serve.models import ModelIndex
from curate.serve.render import head_tail_svg, highlight, quote_id

TEMPLATES = Path(__file__).parent / "templates"
router = APIRouter()


def create_app(build: str | Path, model: str | Path | None = None, eval_dir: str | Path | None = None,
               index_in_background: bool = False, summary: bool = True) -> FastAPI:
    """The FastAPI app over ``build`` (a build folder or its catalog.duckdb); with ``model`` (an exported
    AlignedModel folder) also text → image search, image → text on sample pages, and the model's eval reports
    (``eval_dir``: where ``align eval --out`` wrote them). ``summary``: load (or build and cache) the summary tables
    — now, or in a thread with ``index_in_background`` — instead of answering every page from the catalog."""
    ex = Explorer(build)
    if summary:  # the precomputed tables (cached outside the build); without them every page scans the catalog
        ex.use_summary(background=index_in_background)
    mi = ModelIndex(ex, model, eval_dir) if model else None
    if mi is not None and index_in_background:
        mi.start_background()
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["q"] = quote_id
    templates.env.filters["num"] = lambda v: "" if v is None else f"{v:,}"
    templates.env.globals["highlight"] = highlight
    templates.env.globals["pct"] = lambda n, total: f"{100 * n / total:.1f}%" if total else ""
    templates.env.globals["has_model"] = mi is not None
    app = FastAPI(title="tether explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = ex
    app.state.model_index = mi
    app.state.templates = templates
    app.state.build_name = ex.build_dir.resolve().name
    for exc, handler in ((NotFound, _not_found), (BadRequest, _bad_request), (RequestValidationError, _invalid),
                         (StarletteHTTPException, _http_error), (Exception, _server_error)):
        app.add_exception_handler(exc, handler)
    app.include_router(router)
    return app


# ---------------------------------------------------------------------------------------------- helpers
def _ex(request: Request) -> Explorer:
    return request.app.state.explorer


def render_page(request: Request, name: str, status_code: int = 200, **ctx):
    st = request.app.state
    return st.templates.TemplateResponse(request, name, {"build": st.build_name, **ctx}, status_code=status_code)


def error(request: Request, status: int, title: str, message: str):
    return render_page(request, "error.html", status, title=title, message=message)


def check_page(p: int, name: str = "page") -> int:
    if p < 1 or p > MAX_PAGE:
        raise BadRequest(f"{name} must be between 1 and {MAX_PAGE:,}, got {p}")
    return p


def check_text(name: str, v: str, nul: bool = True) -> str:
    """A query string within the length limit (and, ``nul``, without NUL characters)."""
    if len(v) > MAX_QUERY_CHARS:
        raise BadRequest(f"{name} too long ({len(v)} > {MAX_QUERY_CHARS} characters)")
    if nul and "\x00" in v:
        raise BadRequest(f"{name} contains a NUL character")
    return v


def pager(request: Request, cur: int, total: int, per: int, name: str = "page") -> dict:
    last = max(1, math.ceil(total / per))

    def url(p: int) -> str:
        qs = dict(request.query_params)
        qs[name] = str(p)
        return f"{request.url.path}?{urlencode(qs)}"

    return {"page": cur, "last": last, "total": total, "prev": url(cur - 1) if cur > 1 else None,
            "next": url(cur + 1) if cur < last else None, "first": url(1), "last_url": url(last)}


def need_model(request: Request) -> ModelIndex:
    mi = request.app.state.model_index
    if mi is None:
        raise NotFound("this explorer runs without a model: start it with `curate serve BUILD --model MODEL_DIR`")
    return mi


# ---------------------------------------------------------------------------------------------- errors
async def _not_found(request: Request, exc: NotFound):
    return error(request, 404, "Not found", str(exc))


async def _bad_request(request: Request, exc: BadRequest):
    return error(request, 400, "Bad request", str(exc))


async def _invalid(request: Request, exc: RequestValidationError):
    msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'query'}: {e.get('msg', '')}"
                     for e in exc.errors())
    return error(request, 400, "Bad request", msgs or "malformed request")


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error(request, exc.status_code, "Not found" if exc.status_code == 404 else "Error", str(exc.detail))


async def _server_error(request: Request, exc: Exception):
    first = str(exc).splitlines()[0] if str(exc) else ""
    return error(request, 500, "Server error", f"{type(exc).__name__}: {first}")


# ---------------------------------------------------------------------------------------------- pages
@router.get("/", response_class=HTMLResponse)
def overview(request: Request):
    ex = _ex(request)
    sm = ex.summary
    note = None
    if sm is not None and sm.error:
        note = f"summary tables could not be built ({sm.error}): every page queries the catalog itself"
    elif sm is not None and not sm.ready:
        note = (f"summary tables are being built ({sm.step or 'starting'}): until then pages query the catalog "
                "itself, slower on large builds")
    ov = ex.overview()
    matched = [c for c in ex.concept_table() if c["matched"]]
    ov["curve"] = head_tail_svg([c["matched"] for c in matched], [c["alive"] for c in matched])
    return render_page(request, "overview.html", ov=ov, title="Overview", summary_note=note)


@router.get("/concepts", response_class=HTMLResponse)
def concepts_page(request: Request, q: str = "", page: int = 1):
    check_page(page)
    check_text("query", q, nul=False)
    rows = _ex(request).concept_table()
    ql = q.strip().lower()
    if ql:
        rows = [c for c in rows if ql in c["id"].lower() or ql in c["name"].lower() or ql in c["gloss"].lower()]
    return render_page(request, "concepts.html", title="Concepts", q=q,
                       rows=rows[(page - 1) * PAGE_SIZE:page * PAGE_SIZE],
                       pager=pager(request, page, len(rows), PAGE_SIZE))


@router.get("/concept/{cid:path}", response_class=HTMLResponse)
def concept_page(request: Request, cid: str, page: int = 1, dpage: int = 1, apage: int = 1):
    check_page(page)
    check_page(dpage, "dpage")
    check_page(apage, "apage")
    ex = _ex(request)
    c = ex.concept(cid, page, dpage)
    c["n_scored"], c["scored"] = ex.concept_agreement(cid, apage)
    return render_page(request, "concept.html", title=f"Concept {cid}", c=c,
                       pager=pager(request, page, c["n_kept"], GRID_SIZE),
                       dpager=pager(request, dpage, c["n_dropped"], GRID_SIZE, "dpage"),
                       apager=pager(request, apage, c["n_scored"], GRID_SIZE, "apage"))


@router.get("/sample/{uid:path}", response_class=HTMLResponse)
def sample_page(request: Request, uid: str):
    ex, mi = _ex(request), request.app.state.model_index
    s = ex.sample(uid)
    near = None
    if mi is not None:
        hits = mi.image_to_text(uid, 10)
        if hits is not None:
            caps = dict(ex.captions([u for u, _ in hits]))
            near = [(u, sc, caps.get(u, "")) for u, sc in hits]
    return render_page(request, "sample.html", s=s, uid=uid, near=near, title=f"Sample {uid}",
                       patch_maps=mi is not None and mi.patch_similarity is not None)


@router.get("/images", response_class=HTMLResponse)
def images_page(request: Request, q: str = "", page: int = 1):
    m = need_model(request)
    check_page(page)
    q = check_text("query", q.strip())
    hits, n = [], 0
    if q and not m.ready and m._thread is not None:  # the background index is still being built
        if m.error:
            raise RuntimeError(f"building the image index failed: {m.error}")
        return render_page(request, "images.html", title="Text → image", q=q, hits=[], indexed=None,
                           building=m.progress, pager=pager(request, 1, 0, GRID_SIZE))
    if q:
        top = m.text_to_image(q, IMAGE_HITS)
        n = len(top)
        top = top[(page - 1) * GRID_SIZE:page * GRID_SIZE]
        caps = dict(_ex(request).captions([u for u, _, _ in top]))
        hits = [{"uid": u, "score": sc, "shared": k, "caption": caps.get(u) or ""} for u, sc, k in top]
    return render_page(request, "images.html", title="Text → image", q=q, hits=hits, building=None,
                       indexed=len(m.index()[2]) if q else None, pager=pager(request, page, n, GRID_SIZE))


@router.get("/model", response_class=HTMLResponse)
def model_page(request: Request, uid: str = "", q: str = ""):
    m = need_model(request)
    q, uid = check_text("q", q.strip()), check_text("uid", uid.strip())
    pmap = None
    if m.patch_similarity is not None and uid and q:
        sims, _ = m.patch_map(uid, q)
        pmap = {"grid": sims.shape, "min": float(sims.min()), "max": float(sims.max()),
                "png": "/model/patchmap.png?" + urlencode({"uid": uid, "q": q})}
    return render_page(request, "model.html", title="Model", m=m, reports=m.reports(), uid=uid, q=q,
                       pmap=pmap)


@router.get("/model/patchmap.png")
def patch_map_png(request: Request, uid: str, q: str):
    m = need_model(request)
    if not q.strip() or len(q) > MAX_QUERY_CHARS or "\x00" in q or len(uid) > MAX_QUERY_CHARS:
        raise BadRequest("q must be a text of 1 to 300 characters (and uid at most 300)")
    return Response(m.patch_map_png(uid.strip(), q.strip()), media_type="image/png",
                    headers={"Cache-Control": "no-cache"})


@router.get("/model/report/{name}")
def model_report(request: Request, name: str):
    m = need_model(request)
    ok = {r["png"] for r in m.reports() if r["png"]}
    if name not in ok:
        raise NotFound(f"no eval report image {name!r}")
    return Response((m.eval_dir / name).read_bytes(), media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get("/search", response_class=HTMLResponse)
def search_page(request: Request, q: str = "", concept: str = "", status: str = "any", source: str = "",
                page: int = 1):
    check_page(page)
    check_text("query", q)
    ex = _ex(request)
    if status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    if source and source not in ex.sources():
        raise BadRequest(f"unknown source {source!r} (sources: {', '.join(ex.sources()[:20])})")
    res = ex.search(q, concept.strip(), status, source, page)
    return render_page(request, "search.html", title="Search", q=q, concept=concept, status=status, source=source,
                       statuses=STATUSES, sources=ex.sources(), res=res,
                       concept_name=(ex.concept_index().get(concept.strip()) or {}).get("name")
                       if concept.strip() else None,
                       pager=pager(request, page, min(res["n"], common.COUNT_CAP), PAGE_SIZE))


@router.get("/thumb/{uid:path}")
def thumb(request: Request, uid: str, size: int = 256):
    if not 32 <= size <= 1024:
        raise BadRequest(f"size must be between 32 and 1024 pixels, got {size}")
    ex = _ex(request)
    etag = '"' + hashlib.sha1(f"{ex.etag_seed}:{uid}:{size}".encode()).hexdigest()[:20] + '"'
    headers = {"Cache-Control": "public, max-age=86400", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    data = ex.thumbnail(uid, size)
    if data is None:
        raise NotFound(f"sample {uid!r} has no stored image that can be decoded")
    return Response(data, media_type="image/jpeg", headers=headers)


__all__ = ["create_app", "router"]
