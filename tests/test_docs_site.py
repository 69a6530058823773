"""The documentation site builds without a warning, and every internal link resolves.

``python -m sphinx -W -b html docs docs/_build/html`` is the build (warnings are errors: a
broken cross-reference, a page outside the table of contents, a docstring autodoc cannot
render). The check then reads the built HTML as a browser would: every relative ``href`` and
``src`` must name a file of the build, and every ``#fragment`` an ``id`` in that file.
The API page must document every public name (``lojax.__all__``).
"""

from __future__ import annotations

import html.parser
import pathlib
import re
import urllib.parse

import pytest

import lojax

ROOT = pathlib.Path(__file__).resolve().parent.parent
# One xdist worker runs this module (`--dist loadgroup`, pyproject.toml): the site is built once (a module fixture, ~7 s).
pytestmark = pytest.mark.xdist_group("docs-site")

DOCS = ROOT / "docs"


class _Links(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.links: list[str] = []
    self.ids: set[str] = set()

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if "id" in a:
      self.ids.add(a["id"])
    if tag == "a" and "name" in a:
      self.ids.add(a["name"])
    for key in ("href", "src"):
      if a.get(key):
        self.links.append(a[key])


def _parse(path: pathlib.Path) -> _Links:
  p = _Links()
  p.feed(path.read_text(errors="replace"))
  return p


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  build = pytest.importorskip("sphinx.cmd.build",
                              reason="sphinx is not installed: pip install -e '.[docs]'")
  pytest.importorskip("myst_parser", reason="myst-parser is not installed: pip install -e '.[docs]'")
  out = tmp_path_factory.mktemp("html")
  status = build.build_main(["-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)])
  assert status == 0, "sphinx-build -W failed: see the warnings above"
  return out


def test_every_internal_link_resolves(site):
  pages = sorted(p for p in site.rglob("*.html")
                 if not p.relative_to(site).parts[0].startswith("_"))   # not theme templates
  assert len(pages) >= 15, [p.name for p in pages]
  parsed = {p.resolve(): _parse(p) for p in pages}
  broken = []
  for page, links in parsed.items():
    for link in links.links:
      url = urllib.parse.urlsplit(link)
      if url.scheme or url.netloc or link.startswith(("mailto:", "javascript:", "data:")):
        continue
      target = (page.parent / urllib.parse.unquote(url.path)).resolve() if url.path else page
      if target.is_dir():
        target = target / "index.html"
      if not target.exists():
        broken.append(f"{page.relative_to(site)}: {link} (no such file)")
      elif url.fragment and target.suffix == ".html":
        ids = parsed[target].ids if target in parsed else _parse(target).ids
        if url.fragment not in ids:
          broken.append(f"{page.relative_to(site)}: {link} (no id {url.fragment!r})")
  assert not broken, "\n".join(broken[:40])


def test_api_page_documents_every_public_name(site):
  api = (DOCS / "api.rst").read_text()
  documented = set(re.findall(r"^\.\. (?:auto\w+|py:data):: lojax\.(\w+)$", api, re.M))
  assert documented == set(lojax.__all__) - {"__version__"}, (
      sorted(set(lojax.__all__) - documented), sorted(documented - set(lojax.__all__)))
  built = (site / "api.html").read_text()
  missing = [n for n in documented if f'id="lojax.{n}"' not in built]
  assert not missing, missing


def test_rules_are_rendered_from_the_code(site):
  from lojax._src import matcher
  targeting = (site / "targeting.html").read_text()
  for names in (matcher.HEAD_NAMES, matcher.ATTENTION_NAMES, matcher.MLP_LAST):
    missing = [n for n in names if f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{n}</span></code>" not in targeting]
    assert not missing, missing
