"""tether's shared layer: what both halves use and neither owns.

``curate`` (the curation engine) and ``align`` (frozen-encoder alignment) import this package and never each
other (tests/test_layering.py checks it). It holds recipe loading (:mod:`tether.recipe`), the CLI kit
(:mod:`tether.clikit`), file and build-folder helpers (:mod:`tether.fileio`), offline resource locators
(:mod:`tether.resources`), and the frozen encoders with their offline zoo (:mod:`tether.encoders`,
:mod:`tether.zoo`). It imports neither half.
"""
