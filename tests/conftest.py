"""Test-session settings.

The suite is bound by XLA compile time (thousands of small programs, most run
once). Two settings make XLA's CPU backend build them faster:

* LLVM's optimisation level 0. It changes how fast the CPU code is and how
  long it takes to build, not the HLO program: the FLOP counts, buffer
  assignments and fusions the tests read are XLA's, made before LLVM runs.
  It builds the suite's programs in about two thirds of the time.
* ``--xla_cpu_use_fusion_emitters=false``: the CPU backend's older loop
  emitters, which build about a third faster than the MLIR ones (a 4-layer
  GPT LoRA step: 0.56 s against 0.70 to 0.94 s). The FLOPs and collectives are
  the same; the CPU fusion pass makes a few different choices (that step: 432
  fusions against 440, 92 more bytes of temp). It is set only where this
  jaxlib knows the flag (a subprocess tries it once; XLA aborts on a flag it
  does not know).

Subprocesses (examples, 8-device checks) inherit both. Set
LOJAX_TEST_XLA_OPT=1 to test with XLA's defaults.

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
import subprocess
import sys
import tempfile

FAST_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  probe = "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                        timeout=120).returncode == 0


if os.environ.get("LOJAX_TEST_XLA_OPT") != "1" and "LOJAX_TEST_XLA_FAST" not in os.environ:
  # The first conftest import (the xdist controller's, before it starts the workers) decides;
  # workers and subprocesses inherit the flags and the decision.
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  if _xla_accepts(FAST_EMITTERS):
    flags += " " + FAST_EMITTERS
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ["LOJAX_TEST_XLA_FAST"] = "1"

_CACHE_OWNER = False
if (os.environ.get("LOJAX_TEST_XLA_CACHE") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  # Made at the first conftest import, so that every worker and subprocess shares it.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lojax-test-xla-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  _CACHE_OWNER = True


def pytest_unconfigure(config):
  if _CACHE_OWNER:   # the first process (xdist's controller); workers inherit the directory
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "fuzz: property-based fuzz and fault-injection tests (tests/test_fuzz.py); a long "
      "run: `LOJAX_FUZZ_EXAMPLES=2000 python -m pytest -m fuzz tests/test_fuzz.py`")
