"""benchmarks/compile_time.py on its tiny shape: every row lowers and compiles, and the
compiled programs have the structure the compile-time table rests on.

The script runs in-process (``main(["--tiny", "--reps", "1", "--out", tmp_path])``); the
checks read its ``compile.json``: the six rows are there with positive lower and compile
times and ratios against the frozen limit, and the factorized LoRA steps have more matmuls
than the frozen limit (the adapters' ``x@A`` and ``(x@A)@B`` and their gradients), the plain
``remat=False`` path more than the fused custom-VJP one.
"""

import json
import pathlib
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import compile_time  # noqa: E402
import models  # noqa: E402

ROWS = ("frozen limit", "full fine-tuning gradient", "full fine-tuning", "lojax LoRA gradient",
        "lojax LoRA step", "lojax LoRA step, remat=False")


def test_compile_time_tiny(tmp_path):
  compile_time.main(["--tiny", "--reps", "1", "--out", str(tmp_path)])
  res = json.loads((tmp_path / "compile.json").read_text())
  assert list(res["layers"]) == ["2"]
  depth = res["layers"]["2"]
  rows = depth["rows"]
  assert tuple(rows) == ROWS
  for name, m in rows.items():
    assert m["lower_s"] > 0 and m["compile_s"] > 0, (name, m)
    assert abs(m["total_s"] - m["lower_s"] - m["compile_s"]) < 0.01, (name, m)
    assert m["total_vs_limit"] > 0 and m["dots"] > 0 and m["fusions"] > 0, (name, m)
    assert m["temp_mib"] is not None and m["temp_mib"] >= 0, (name, m)
  assert rows["frozen limit"]["total_vs_limit"] == 1.0
  assert depth["model_apply_trace_s"] > 0
  limit = rows["frozen limit"]["dots"]
  for name in ROWS[3:]:
    assert rows[name]["dots"] > limit, (name, rows[name]["dots"], limit)
  assert rows["lojax LoRA step, remat=False"]["dots"] > rows["lojax LoRA step"]["dots"]
  md = (tmp_path / "compile.md").read_text()
  for name in ROWS:
    assert f"| 2 | {name} |" in md
  assert "x the frozen limit" in md


def test_benchmarks_compile_for_real_under_a_persistent_cache(tmp_path):
  """``models.fresh_compiles`` (compile_time, run and scale's mains): no persistent-cache
  entry is written (or read) inside it, and the cache works again after it."""
  keep = {k: getattr(jax.config, k) for k in
          ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  try:
    jax.jit(lambda x: x * 5.0 + 3.0).lower(1.0).compile()   # jax now holds the cache as on
    written = set(tmp_path.iterdir())
    assert written
    with models.fresh_compiles():
      jax.jit(lambda x: x * 7.0 + 3.0).lower(1.0).compile()
    assert set(tmp_path.iterdir()) == written
    jax.jit(lambda x: x * 11.0 + 3.0).lower(1.0).compile()
    assert set(tmp_path.iterdir()) > written
  finally:
    for k, v in keep.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()
