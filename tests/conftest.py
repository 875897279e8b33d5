"""Test-suite settings shared by every test module."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI runs derandomized so a red run is reproducible; locally hypothesis explores.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
