"""Test-session settings.

The suite is bound by XLA compile time (hundreds of small programs, most run
once). LLVM's optimisation level changes how fast the CPU code is and how long
it takes to build, not the HLO program: the FLOP counts, buffer assignments and
fusions the tests read are XLA's, made before LLVM runs. Level 0 builds the
suite's programs in about two thirds of the time. Subprocesses (examples,
8-device checks) inherit the setting. Set LOJAX_TEST_XLA_OPT=1 to test with
the default level.
"""

import os

if os.environ.get("LOJAX_TEST_XLA_OPT") != "1":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "fuzz: property-based fuzz and fault-injection tests (tests/test_fuzz.py); a long "
      "run: `LOJAX_FUZZ_EXAMPLES=2000 python -m pytest -m fuzz tests/test_fuzz.py`")
