"""Test-session settings.

The suite is bound by XLA compile time (hundreds of small programs, most run
once). LLVM's optimisation level changes how fast the CPU code is and how long
it takes to build, not the HLO program: the FLOP counts, buffer assignments and
fusions the tests read are XLA's, made before LLVM runs. Level 0 builds the
suite's programs in about two thirds of the time. Subprocesses (examples,
8-device checks) inherit the setting. Set LOJAX_TEST_XLA_OPT=1 to test with
the default level.

The test session also shares one persistent compilation cache (a temporary
directory made by the first process, removed when the session ends) between
its pytest-xdist workers and the subprocesses they start: about a fifth of the
suite's compile time is programs compiled again, in another test or worker.
The cache stores XLA's executables; the HLO, cost and memory analyses the tests
read come back with them. Set LOJAX_TEST_XLA_CACHE=0 to compile everything
afresh; the benchmark scripts switch the cache off for their own timings.
"""

import os
import shutil
import sys
import tempfile

if os.environ.get("LOJAX_TEST_XLA_OPT") != "1":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

_CACHE_OWNER = False
if (os.environ.get("LOJAX_TEST_XLA_CACHE") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  # Made here, at the first conftest import (the xdist controller's, before it starts the
  # workers), so that every worker and subprocess inherits the same directory.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lojax-test-xla-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  _CACHE_OWNER = True
if "jax" in sys.modules and "JAX_COMPILATION_CACHE_DIR" in os.environ:
  # A plugin imported jax before this file: its config read the environment already.
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if _CACHE_OWNER and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "fuzz: property-based fuzz and fault-injection tests (tests/test_fuzz.py); a long "
      "run: `LOJAX_FUZZ_EXAMPLES=2000 python -m pytest -m fuzz tests/test_fuzz.py`")
