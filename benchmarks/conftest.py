"""pytest-benchmark suites: `make bench` (never part of `make test`; no timed assertions)."""
