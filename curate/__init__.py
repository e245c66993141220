"""tether.curate — concept-rich image–caption curation.

Data flows one way: sources → catalog → concepts → match → balance → dedup → download → shards.
Each stage is one module; every decision is recorded in the build's DuckDB catalog.
"""

__version__ = "0.1.0"
