"""Every docstring example in lojax runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import lojax._src

MODULES = sorted(m.name for m in pkgutil.iter_modules(lojax._src.__path__, "lojax._src."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_public_names_have_docstrings():
  import lojax
  missing = [n for n in lojax.__all__ if not (getattr(lojax, n).__doc__ or "").strip()]
  assert not missing, missing
