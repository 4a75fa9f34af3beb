"""Tests run on 128 simulated CPU devices (set before JAX starts) in float32 with exact matmuls."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=128").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from helpers import xla_cache_dir  # noqa: E402

# The same persistent XLA cache as the commands tests start (helpers.command_env): tests compile the
# same programs again and again (a config's parameter draw, an engine's shapes), each in seconds.
jax.config.update("jax_compilation_cache_dir", xla_cache_dir())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The Hugging Face fixture imported as a moejax checkpoint (once per test module)."""
    from helpers import FIXTURE, import_fixture

    return import_fixture(tmp_path_factory, FIXTURE)
