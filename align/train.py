"""Entry of the training program: ``accelerate launch align/train.py --config R`` (or ``-m align.train``),
``python align/train.py --config R``, ``torchrun ... align/train.py --config R``; ``align train`` runs the same.

The code lives in :mod:`align.training`; this module re-exports its public names (``from align.train import
train`` keeps working). Run as a file, Python puts ``align/`` first on ``sys.path``: that is harmless because this
file imports only the ``align`` package, by absolute name, and no dependency imports a top-level module named like
one in ``align/`` (``tests/test_train_entry.py`` checks every module a run imports). No ``sys.path`` editing.
"""

from __future__ import annotations

import sys

try:
    from align.training import *  # noqa: F401,F403 - the public names of align.training, listed in its __all__
    from align.training import __all__, main
except ModuleNotFoundError as e:  # run as a file from a checkout that is not installed
    if e.name != "align":
        raise
    sys.exit("error: the align package is not importable: install the project (pip install -e .), or set "
             "PYTHONPATH to the repository root")

if __name__ == "__main__":
    sys.exit(main())
