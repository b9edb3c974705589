"""Configuration: the frozen settings tree, the home directory, the project error."""

import os

# OpenMP threads (torch, FAISS) that wait for work sleep instead of spinning. A daemon shares
# the machine with builds and tests: spinning threads then stall each other, and a 10 ms
# query encode took 400 ms at p99 on a busy 2-core machine (bench/search_scale.py). libgomp
# reads this once, when torch or FAISS loads it, so it is set before either is imported;
# `memory` imports this package first. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from config.errors import ConfigError, GremlinError  # noqa: E402
from config.settings import Settings, init_home, load_settings  # noqa: E402

__all__ = ["ConfigError", "GremlinError", "Settings", "init_home", "load_settings"]
