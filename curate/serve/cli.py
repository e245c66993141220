"""``curate serve``: the subcommand (a :mod:`curate.cli` plugin) that starts the explorer with uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from curate.serve.app import create_app


def cmd_serve(args) -> int:
    import socket

    import uvicorn

    from tether.clikit import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port: expected 1..65535, got {args.port}")
    p = Path(args.build)
    if not (p / "catalog.duckdb" if p.is_dir() else p).is_file():
        raise UserError(f"{args.build}: no build catalog here (run `curate build RECIPE` first)")
    if args.model and not Path(args.model).is_dir():
        raise UserError(f"--model: {args.model}: no such folder (an exported aligned model: config.json + "
                        "model.safetensors)")
    if args.eval and not Path(args.eval).is_dir():
        raise UserError(f"--eval: {args.eval}: no such folder")
    try:
        app = create_app(args.build, model=args.model, eval_dir=args.eval, index_in_background=True)
    except duckdb.Error as e:
        raise UserError(f"{args.build}: cannot open the catalog read-only ({str(e).splitlines()[0]}); is a build "
                        "still writing it?") from None
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); try another --port") \
                from None
    print(f"tether explorer on http://{args.host}:{args.port}/ (read-only over {Path(args.build).resolve()}); "
          "Ctrl-C stops it", flush=True)
    sm = app.state.explorer.summary
    if sm is not None and not sm.ready:
        print(f"summary tables: building them once in the background into {sm.path} (large builds: minutes); pages "
              "answer from the catalog meanwhile", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=os.environ.get("TETHER_SERVE_LOG", "warning"))
    return 0


def register(sub) -> None:
    """Plugin hook of :mod:`curate.cli`: the ``serve`` subcommand."""
    s = sub.add_parser("serve", help="a read-only local web explorer over a build (concepts, samples, search)")
    s.add_argument("build", help="build folder or catalog.duckdb")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8731)
    s.add_argument("--model", help="an exported aligned model folder: adds text → image search (embeddings cached "
                                    "in $TETHER_CACHE/serve, default ~/.cache/tether/serve) and image → text")
    s.add_argument("--eval", help="folder of that model's eval reports (`align eval --out`), shown on /model")
    s.set_defaults(func=cmd_serve)
