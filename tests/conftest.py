"""Every test sees 8 fake CPU devices (set before JAX is first imported) and the `slow` marker.

JAX reads XLA_FLAGS once, at backend start, so this runs at collection time, before any test
module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Deterministic hypothesis runs: no example database, derandomised.
os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                                     print_blob=True)
hypothesis.settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: multi-minute tests (CI runs them too)")
