"""Hypothesis profiles for the fuzz suite (tests/test_fuzz.py).

- ``ci`` (default): derandomized (the same cases every run), no example database, bounded so
  the fuzz suite takes about a minute on 2 busy cores.
- ``long``: random cases, ~30 minutes on 2 cores: ``python -m pytest tests/test_fuzz.py
  --hypothesis-profile=long --hypothesis-show-statistics``.

``--hypothesis-profile=NAME`` or the ``SATA_HYPOTHESIS_PROFILE`` environment variable selects one;
``SATA_FUZZ_EXAMPLES`` sets the long profile's examples per test (default 9000; the cheap
invalid-input test runs 5x as many).
"""

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", max_examples=250, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("SATA_FUZZ_EXAMPLES", 9000)), **_COMMON)
if settings.get_current_profile_name() == "default":  # not chosen with --hypothesis-profile already
    settings.load_profile(os.environ.get("SATA_HYPOTHESIS_PROFILE", "ci"))
