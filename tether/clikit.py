"""What every tether command line shares: plugin subcommands and one-line errors.

``add_plugins`` lets a module contribute subcommands through a ``register(subparsers)`` function (imported
lazily; a plugin that is not installed is skipped, a broken one is reported in one line and skipped).
``run_command`` runs the chosen subcommand and turns any exception into ``error: <one line>`` with exit status 2
(130 on Ctrl-C) — never a traceback, unless ``TETHER_DEBUG=1`` asks for it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Iterable

from tether.recipe import RecipeError


class UserError(Exception):
    """A user mistake (wrong path, unknown id, bad flag value); its message is shown as it is."""


def add_plugins(subparsers, modules: Iterable[str]) -> None:
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (name == err.name or name.startswith(err.name + ".")):
                continue  # plugin not installed
            print(f"warning: plugin {name} failed to import: {one_line(err)}", file=sys.stderr)
            continue
        except Exception as err:  # noqa: BLE001 - a broken plugin must not take the core commands down
            print(f"warning: plugin {name} failed to import: {one_line(err)}", file=sys.stderr)
            continue
        register = getattr(mod, "register", None)
        if callable(register):
            register(subparsers)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, (RecipeError, UserError)):
        return msg
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename or msg}"
    return f"{type(e).__name__}: {msg}"


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace,
                interrupted: str = "interrupted (rerun the same command to resume)") -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from tether.progress import quiet_library_bars

    quiet_library_bars()  # off a terminal: no "Loading weights" carriage-return storms in a log file
    try:
        rc = func(args)
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, traceback only on request
        if os.environ.get("TETHER_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return int(rc or 0)
