"""Two text tasks built from the Python standard library's own documentation.

Nothing is downloaded: both datasets are read, with :mod:`ast` (no imports),
from the ``.py`` files of the running interpreter's standard library, so they
are real English written by Python's developers, and the same on every machine
with the same Python version (the README's numbers are from CPython 3.11).
Test packages, ``distutils`` and ``lib2to3`` (removed in later Pythons) and
``site-packages`` are skipped.

* :func:`docstring_topics` (sequence classification): the first paragraph of a
  function or class docstring, labelled with the standard-library package it
  comes from (13 packages: asyncio, email, tkinter, logging, ...).
* :func:`api_search` (retrieval): a docstring's first paragraph as the query,
  the documented function's dotted name and signature as the document
  (``"logging.Logger.getChild(suffix)"``).

Split: an example is held out when the SHA-256 of its key (the text for
topics, the signature for API search) is 0 mod 5, about 20%. The split is thus
fixed by content, not by order or by a seed. Texts that occur more than once
are dropped, so no held-out text also appears in training.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import hashlib
import pathlib
import sysconfig

# Package (first path component under Lib/) -> class name.
TOPIC_PACKAGES = {
    "_pydecimal": "decimal", "asyncio": "asyncio", "email": "email", "http": "http",
    "idlelib": "idlelib", "importlib": "importlib", "logging": "logging", "mailbox": "mailbox",
    "multiprocessing": "multiprocessing", "tkinter": "tkinter", "turtle": "turtle",
    "unittest": "unittest", "xml": "xml",
}
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "distutils",
               "lib2to3"}
_MIN_WORDS = 4


@dataclasses.dataclass(frozen=True)
class Split:
  """A train / held-out split. ``x``: inputs, ``y``: labels (class ids or documents)."""

  train_x: tuple
  train_y: tuple
  test_x: tuple
  test_y: tuple
  classes: tuple = ()


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _sources(packages=None):
  """``(relative path, syntax tree)`` for each standard-library source file, sorted.

  ``packages``: only files whose first path component (minus ``.py``) is one of these.
  """
  root = stdlib_root()
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if _SKIP_PARTS & set(rel.parts) or (
        packages is not None and rel.parts[0].removesuffix(".py") not in packages):
      continue
    try:
      yield rel, ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue  # a few files are deliberately invalid or not UTF-8


def summary(docstring: str | None) -> str | None:
  """The first paragraph of ``docstring`` on one line, or None when under 4 words."""
  if not docstring:
    return None
  text = " ".join(docstring.split("\n\n")[0].split())
  return text if len(text.split()) >= _MIN_WORDS else None


def _held_out(key: str) -> bool:
  return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 5 == 0


@functools.cache
def docstring_topics() -> Split:
  """Docstring first paragraphs labelled with their package (13 classes).

  Returns a :class:`Split` with ``classes`` the class names and labels as
  indices into it. A text that occurs in more than one place is dropped (even
  within one package), so memorising a repeated docstring cannot help. Parsed
  once per process (a few seconds); the split is immutable.
  """
  seen = collections.defaultdict(set)
  counts = collections.Counter()
  for rel, tree in _sources(TOPIC_PACKAGES):
    package = rel.parts[0].removesuffix(".py")
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        text = summary(ast.get_docstring(node))
        if text:
          seen[text].add(package)
          counts[text] += 1
  classes = tuple(sorted(set(TOPIC_PACKAGES.values())))
  found = {TOPIC_PACKAGES[p] for ps in seen.values() for p in ps}
  if found != set(classes):
    raise RuntimeError(f"standard-library packages missing under {stdlib_root()}: "
                       f"{sorted(set(classes) - found)} (a Python without them?)")
  split = ([], [], [], [])
  for text in sorted(seen):
    if counts[text] == 1:
      label = classes.index(TOPIC_PACKAGES[next(iter(seen[text]))])
      half = 2 if _held_out(text) else 0
      split[half].append(text)
      split[half + 1].append(label)
  return Split(*map(tuple, split), classes=classes)


class _Signatures(ast.NodeVisitor):
  """Collects ``(summary, "module.Class.name(args)")`` for public documented functions."""

  def __init__(self, module: str):
    self.module, self.scope, self.pairs = module, [], []

  def visit_ClassDef(self, node):
    if not node.name.startswith("_"):
      self.scope.append(node.name)
      self.generic_visit(node)
      self.scope.pop()

  def visit_FunctionDef(self, node):  # nested functions are not part of an API
    text = summary(ast.get_docstring(node))
    if text and not node.name.startswith("_"):
      a = node.args
      names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
      name = ".".join([self.module, *self.scope, node.name])
      self.pairs.append((text, f"{name}({', '.join(names)})"))

  visit_AsyncFunctionDef = visit_FunctionDef


@functools.cache
def api_search() -> Split:
  """Docstring summary -> ``module.Class.function(args)`` pairs of the public API.

  Private modules, classes and functions (a leading ``_``) are skipped; a
  summary or a signature that occurs more than once is dropped, so every query
  has exactly one right document. Parsed once per process; the split is immutable.
  """
  pairs = []
  for rel, tree in _sources():
    if any(p.startswith("_") and p != "__init__.py" for p in rel.parts):
      continue
    module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
    visitor = _Signatures(module)
    visitor.visit(tree)
    pairs += visitor.pairs
  queries = collections.Counter(q for q, _ in pairs)
  docs = collections.Counter(d for _, d in pairs)
  split = ([], [], [], [])
  for query, doc in sorted(pairs):
    if queries[query] == 1 and docs[doc] == 1:
      half = 2 if _held_out(doc) else 0
      split[half].append(query)
      split[half + 1].append(doc)
  return Split(*map(tuple, split))


if __name__ == "__main__":
  for name, fn in (("docstring_topics", docstring_topics), ("api_search", api_search)):
    s = fn()
    print(f"{name}: {len(s.train_x)} train / {len(s.test_x)} held out; e.g. "
          f"{s.test_x[0]!r} -> {s.classes[s.test_y[0]] if s.classes else s.test_y[0]!r}")
