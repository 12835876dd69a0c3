"""Head-to-head benchmarks: trials expanded from a spec (`trial.py`), a SQLite store of every run
(`store.py`), the runner that fills it (`runner.py`), and the suites (`suites/`: `sp`'s `sensing` so far)."""

from .runner import Outcome, RunSummary, library_versions, run_trials
from .store import SCHEMA_VERSION, Run, Store, finite_or_none
from .trial import SPEC_KEYS, Trial, expand, load_spec

__all__ = [
    "SCHEMA_VERSION",
    "SPEC_KEYS",
    "Outcome",
    "Run",
    "RunSummary",
    "Store",
    "Trial",
    "expand",
    "finite_or_none",
    "library_versions",
    "load_spec",
    "run_trials",
]
