"""Head-to-head benchmarks (issue 6): trials expanded from a spec (`trial.py`) and a SQLite store of every run
(`store.py`). The suites, the runner and the reports build on these."""

from .store import SCHEMA_VERSION, Run, Store, finite_or_none
from .trial import SPEC_KEYS, Trial, expand, load_spec

__all__ = [
    "SCHEMA_VERSION",
    "SPEC_KEYS",
    "Run",
    "Store",
    "Trial",
    "expand",
    "finite_or_none",
    "load_spec",
]
