"""Hypothesis profiles for the fuzz suite (tests/test_fuzz.py).

- ``ci`` (default): derandomized (the same cases every run), no example database, bounded so
  the fuzz suite takes about a minute on 2 busy cores.
- ``long``: random cases, ~30 minutes on 2 cores: ``python -m pytest tests/test_fuzz.py
  --hypothesis-profile=long --hypothesis-show-statistics``.

``--hypothesis-profile=NAME`` or the ``SATA_HYPOTHESIS_PROFILE`` environment variable selects one.
"""

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", max_examples=150, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=6000, **_COMMON)
settings.load_profile(os.environ.get("SATA_HYPOTHESIS_PROFILE", "ci"))
