"""The architecture, checked: no import cycle, a data model that imports nothing from
lojax, and variant knowledge (keys, classes) only in the variant's own module."""

import ast
import pathlib
import re

import jax.numpy as jnp
import numpy as np

import lojax
from lojax._src import model

SRC = pathlib.Path(lojax.__file__).parent / "_src"


def _imports(path: pathlib.Path) -> set[str]:
  """Every lojax._src module ``path`` imports, at any depth (function-level imports too)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "lojax._src":
        out.update(a.name for a in node.names)
      elif node.module.startswith("lojax._src."):
        out.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      out.update(a.name.split(".")[2] for a in node.names if a.name.startswith("lojax._src."))
  return out


def _graph() -> dict[str, set[str]]:
  return {p.stem: _imports(p) for p in SRC.glob("*.py") if p.stem != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of ``graph`` (as a path), or None."""
  state: dict[str, int] = {}   # 1: on the stack, 2: done

  def visit(node, stack):
    state[node] = 1
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 1:
        return stack + [node, dep]
      if dep not in state and (found := visit(dep, stack + [node])):
        return found
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node, [])):
      return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))
  # The checker sees function-level imports and finds a planted cycle.
  assert _cycle(dict(graph, model={"wrap"})) is not None


def test_the_data_model_imports_nothing_from_lojax():
  assert _graph()["model"] == set()
  assert _graph()["paths"] <= {"model"}


# Keys and classes that belong to one variant, and the modules allowed to name them.
_OWNED = {
    r"\blora_E\b|adalora_step|AdaLoraSpec": {"adalora"},
    r"lora_magnitude|dora\.KEY": {"dora"},
    r"QuantizedArray|is_quantized": {"quant", "inits"},
}


def _code(path: pathlib.Path) -> str:
  """The source without docstrings and comments."""
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
        getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
      body[0] = ast.Pass()
  return ast.unparse(tree)


def test_variant_knowledge_lives_in_its_own_module():
  offenders = []
  for path in sorted(SRC.glob("*.py")):
    code = _code(path)
    for pattern, owners in _OWNED.items():
      if path.stem not in owners and re.search(pattern, code):
        offenders.append(f"{path.stem}: {pattern}")
  assert not offenders, offenders


def test_every_variant_implements_the_protocol():
  """Shapes, factors, merge/unmerge against the written-out math, and PEFT tensors round-trip,
  for a stacked 3-D kernel [L, in, out]."""
  from lojax._src import adalora, dora, lora
  t = model.TargetMeta(path="d", leaf="kernel", shape=(3, 5, 4), kind="dense", in_axes=(0,),
                       stacked=3, layers=None, r=2, alpha=4.0, scaling=2.0, dropout=0.0)
  rng = np.random.default_rng(0)
  w = rng.standard_normal(t.shape)
  for variant in (lora.LORA, dora.DORA, adalora.ADALORA):
    shapes = variant.shapes(t)
    assert shapes["lora_A"] == (3, 5, 2) and shapes["lora_B"] == (3, 2, 4)
    entry = {k: rng.standard_normal(s).astype(np.float32) + 1.0 for k, s in shapes.items()}
    a = entry["lora_A"] * (entry["lora_E"][:, None, :] if "lora_E" in entry else 1.0)
    merged = w + 2.0 * np.einsum("lir,lro->lio", a.astype(np.float64), entry["lora_B"])
    if "lora_magnitude" in entry:   # DoRA: m / ||W + s*A@B|| per output column
      merged = merged * entry["lora_magnitude"][:, None, :] / np.linalg.norm(merged, axis=1,
                                                                             keepdims=True)
    got = variant.merge(t, jnp.asarray(w, jnp.float32), entry)
    np.testing.assert_allclose(got, merged, rtol=2e-5, atol=2e-5, err_msg=variant.name)
    back = variant.unmerge(t, got, entry, jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(back, w, rtol=1e-4, atol=1e-4, err_msg=variant.name)
    layer = {k: v[1] for k, v in entry.items()}
    again = variant.from_peft(t, variant.to_peft(t, layer))
    assert sorted(again) == sorted(layer)
    for k in layer:
      np.testing.assert_array_equal(again[k], layer[k], err_msg=f"{variant.name} {k}")
  assert dora.DORA.shapes(t)["lora_magnitude"] == (3, 4)
  assert adalora.ADALORA.shapes(t)["lora_E"] == (3, 2)
