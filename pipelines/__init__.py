"""Everything Ray: data (precompute), training, sweeps, tracking, generation, evaluation.

Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported; every job imports this package
before Ray, so a Ray it starts keeps every port on 127.0.0.1 (the one place this is set).
"""
import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
