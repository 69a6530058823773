"""Mutation check for lojax's tests (issue 14 item 2). Not run in CI.

Each mutant is a plausible wrong implementation written as exact string
replacements in lojax's source. For each one this script copies the repository
to a temporary directory, applies the replacements (failing loudly when a
target string is not found exactly once, so a refactor cannot silently turn a
mutant into the real code), runs the mutant's test files there with
``python -m pytest -q -x`` and reports whether some test failed (killed) or
all passed (survived), with the first failing test.

Usage (from the repository root)::

  python tools/mutants.py                 # every mutant
  python tools/mutants.py scan_mask dora  # the named ones
  python tools/mutants.py --list

Exit status 1 when a mutant survives.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  what: str
  file: str                            # relative to the repository root
  edits: tuple[tuple[str, str], ...]   # (exact old text, new text), each old text unique
  tests: tuple[str, ...]               # test files (or node ids) expected to kill it


MUTANTS = (
    Mutant("scan_mask", "scan body: no fold-in of the iteration index (masks repeat per step)",
           "lojax/_src/primitives.py",
           (("inner_ctx = ctx.with_rng(jax.random.fold_in(ctx.rng, x.pop()))",
             "inner_ctx = (x.pop(), ctx.with_rng(ctx.rng))[1]"),),
           ("tests/test_masks.py",)),
    Mutant("while_mask", "while body: no fold-in of the iteration counter",
           "lojax/_src/primitives.py",
           (("inner = ctx.with_rng(jax.random.fold_in(ctx.rng, i))",
             "inner = ctx.with_rng(ctx.rng)"),),
           ("tests/test_masks.py",)),
    Mutant("shared_mask", "Context.next_key returns the same key for every kernel use",
           "lojax/_src/rules.py",
           (("    return jax.random.fold_in(self.rng, self.counter)\n",
             "    return self.rng\n"),),
           ("tests/test_masks.py",)),
    Mutant("no_recompute", "lean backward keeps the kernel input instead of recomputing it",
           "lojax/_src/rules.py",
           (("y = fused.dense(lay.to_2d(x), lay.w2(k.value), factors, recompute,",
             "y = fused.dense(lay.to_2d(x), lay.w2(k.value), factors, None,"),),
           ("tests/test_lean_path.py",)),
    Mutant("untied_recompute", "fused._after returns vals: the recomputation is not tied to dy",
           "lojax/_src/fused.py",
           (("  if dy.size == 0:\n    return vals\n", "  return vals\n"),),
           ("tests/test_lean_path.py",)),
    Mutant("alpha_r_plus_1", "scaling alpha / (r + 1) instead of alpha / r",
           "lojax/_src/spec.py",
           (("return alpha / math.sqrt(r) if self.use_rslora else alpha / r",
             "return alpha / math.sqrt(r) if self.use_rslora else alpha / (r + 1)"),),
           ("tests/test_spec.py", "tests/test_merge.py")),
    Mutant("match_not_fullmatch", "target_modules regex with re.match instead of re.fullmatch",
           "lojax/_src/matcher.py",
           (("re.compile(tm).fullmatch)]", "re.compile(tm).match)]"),),
           ("tests/test_matcher.py",)),
    Mutant("dora_no_stop_gradient", "DoRA weight norm not detached (no stop_gradient)",
           "lojax/_src/rules.py",
           (("return m.astype(jnp.float32) / lax.stop_gradient(norm)",
             "return m.astype(jnp.float32) / norm"),),
           ("tests/test_dora.py",)),
    Mutant("peft_a_reshaped", "to_peft writes lora_A reshaped to [r, in] instead of transposed",
           "lojax/_src/lora.py",
           (('"lora_A.weight": a.reshape(-1, r).T', '"lora_A.weight": a.reshape(r, -1)'),),
           ("tests/test_peft_format.py",)),
    Mutant("layer_index_plus_1", "layer index of `h_3` read as 4 (off by one)",
           "lojax/_src/matcher.py",
           (("      if m := _SUFFIX_INDEX.fullmatch(part):\n        return int(m.group(1))\n",
             "      if m := _SUFFIX_INDEX.fullmatch(part):\n        return int(m.group(1)) + 1\n"),),
           ("tests/test_matcher.py",)),
    # (budget_schedule's `step > T - tfinal` as `>=` is an equivalent mutant: the optimizer
    # masks at t == T - tfinal whatever the table says, and budget_schedule is private.)
    Mutant("adalora_final_mask_late", "AdaLoRA re-applies the final mask one step late",
           "lojax/_src/adalora.py",
           (("    final_phase = t > T_final\n", "    final_phase = t > T_final + 1\n"),),
           ("tests/test_adalora.py",)),
    Mutant("unmerge_bias_added", "merge/unmerge: the bias delta is added in both directions",
           "lojax/_src/merge.py",
           (("floats[i] = (floats[i] + sign * d).astype(floats[i].dtype)",
             "floats[i] = (floats[i] + d).astype(floats[i].dtype)"),),
           ("tests/test_merge.py",)),
    Mutant("int8_scale_128", "int8 quantization scale absmax / 128 (codes clip at 127)",
           "lojax/_src/quant.py",
           (("    scales = (absmax / 127).astype(np.float32)",
             "    scales = (absmax / 128).astype(np.float32)"),),
           ("tests/test_quant.py",)),
    Mutant("dropped_bias_delta", "apply.view ignores the trained bias deltas",
           "lojax/_src/apply.py",
           (("      leaves[index[p]] = x + meta.expand_bias(p, d.astype(x.dtype), x.shape)\n",
             "      pass\n"),),
           ("tests/test_apply.py", "tests/test_training.py")),
    Mutant("ckpt_spec_not_compared", "restore does not compare the saved spec with the given one",
           "lojax/_src/checkpoint.py",
           (("        if da[k] != db[k]:\n", "        if False:\n"),),
           ("tests/test_checkpoint.py",)),
    Mutant("ckpt_base_not_compared", "restore does not compare the base fingerprint",
           "lojax/_src/checkpoint.py",
           (("    elif got != want:\n", "    elif False:\n"),),
           ("tests/test_checkpoint.py",)),
    Mutant("ckpt_opt_state_template", "restore returns the template's optimizer state, not the saved",
           "lojax/_src/checkpoint.py",
           (("    opt_state = jax.tree_util.tree_unflatten(treedef, restored)\n",
             "    opt_state = opt_state_template\n"),),
           ("tests/test_checkpoint.py",)),
    Mutant("ckpt_no_checksum", "restore does not verify the stored arrays' checksums",
           "lojax/_src/checkpoint.py",
           (("    elif _describe(x, True) != want:\n", "    elif False:\n"),),
           ("tests/test_checkpoint.py",)),
    Mutant("peft_load_no_transpose", "load_peft does not transpose a saved [out, in] kernel",
           "lojax/_src/peft_format.py",
           (("    if leaf == \"kernel\" and value.ndim == 2 and mapping.transposed(lojax_module):\n"
             "      value = value.T\n",
             "    if False:\n      value = value.T\n"),),
           ("tests/test_peft_format.py", "tests/test_peft_oracle.py")),
    Mutant("peft_fan_in_fan_out_flag", "save_peft writes fan_in_fan_out inverted",
           "lojax/_src/peft_format.py",
           (('"fan_in_fan_out": any(not mapping.transposed(t.path) for t, _ in exported),',
             '"fan_in_fan_out": not any(not mapping.transposed(t.path) for t, _ in exported),'),),
           ("tests/test_peft_format.py", "tests/test_peft_oracle.py")),
    Mutant("peft_alpha_pattern_dropped", "load_peft ignores the file's alpha_pattern",
           "lojax/_src/peft_format.py",
           (('    alpha = _peft_lookup(config.get("alpha_pattern"), tn, alpha0)\n',
             "    alpha = alpha0\n"),),
           ("tests/test_peft_format.py", "tests/test_peft_oracle.py")),
    Mutant("peft_stacked_layer_shift", "save_peft names stacked layer i as layer i + 1",
           "lojax/_src/peft_format.py",
           (('    key = path if layer is None else f"{path}[{layer}]"\n    if callable(',
             '    key = path if layer is None else f"{path}[{layer + 1}]"\n    if callable('),),
           ("tests/test_peft_format.py", "tests/test_peft_oracle.py")),
    Mutant("moe_batch_is_input", "a batched einsum's expert axis is not an expert axis",
           "lojax/_src/analysis.py",
           (('experts = {logical[j] for j in info["batch"] + info.get("group", ())} | indexed',
             'experts = indexed'),),
           ("tests/test_moe.py",)),
    Mutant("moe_ragged_shared_b", "ragged_dot: every expert's rows meet expert 0's B",
           "lojax/_src/rules.py",
           (("d = lax.ragged_dot_general(t.astype(rhs.dtype), term.b.astype(rhs.dtype), ",
             "d = lax.ragged_dot_general(t.astype(rhs.dtype), jnp.broadcast_to(term.b[:1], "
             "term.b.shape).astype(rhs.dtype), "),),
           ("tests/test_moe.py",)),
    Mutant("shared_axis_owner", "every shared axis is taken as the factors' first axis",
           "lojax/_src/tagged.py",
           (("      return [(0, pos), (1, pos)]", "      return [(0, 0), (1, 0)]"),),
           ("tests/test_moe.py",)),
    Mutant("remat_merges_outputs", "nnx.remat: kernels handed back by the body are merged",
           "lojax/_src/primitives.py",
           (("    outs, out_rebuild = _pack(outs)\n    unpack.append(out_rebuild)\n",
             "    outs = _merged_outs(ctx, outs, 'checkpoint')\n    unpack.append(lambda o: o)\n"),),
           ("tests/test_nnx.py",)),
)

_IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis",
                                 ".benchmarks", "*.egg-info")


def apply_mutant(root: pathlib.Path, m: Mutant) -> None:
  path = root / m.file
  text = path.read_text()
  for old, new in m.edits:
    n = text.count(old)
    if n != 1:
      raise SystemExit(f"mutant {m.name!r}: expected the target text exactly once in {m.file}, "
                       f"found it {n} times; update the mutant to the current code:\n{old}")
    text = text.replace(old, new)
  path.write_text(text)


def run_mutant(m: Mutant, timeout: float) -> tuple[str, str, float]:
  with tempfile.TemporaryDirectory(prefix=f"lojax-mutant-{m.name}-") as tmp:
    root = pathlib.Path(tmp) / "repo"
    shutil.copytree(ROOT, root, ignore=_IGNORE)
    apply_mutant(root, m)
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    where = subprocess.run([sys.executable, "-c", "import lojax; print(lojax.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(root)):
      raise SystemExit(f"mutant {m.name!r}: the copy's lojax is not the one imported ({where!r})")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests]
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
      return "timeout", "", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
      return "SURVIVED", "", dt
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if proc.returncode == 1 and failed:
      return "killed", failed[0], dt
    return f"error (rc={proc.returncode})", out.strip().splitlines()[-1] if out.strip() else "", dt


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("names", nargs="*", help="mutants to run (default: all)")
  p.add_argument("--list", action="store_true", help="list the mutants and exit")
  p.add_argument("--timeout", type=float, default=1200, help="seconds per mutant")
  args = p.parse_args(argv)
  by_name = {m.name: m for m in MUTANTS}
  if args.list:
    for m in MUTANTS:
      print(f"{m.name:24} {m.file:28} {m.what}")
    return 0
  unknown = [n for n in args.names if n not in by_name]
  if unknown:
    raise SystemExit(f"unknown mutants {unknown}; known: {sorted(by_name)}")
  chosen = [by_name[n] for n in args.names] if args.names else list(MUTANTS)
  rows = []
  for m in chosen:
    status, test, dt = run_mutant(m, args.timeout)
    rows.append((m.name, status, test, dt))
    print(f"{m.name:24} {status:10} {dt:6.1f}s  {test}", flush=True)
  killed = sum(r[1] == "killed" for r in rows)
  print(f"\n{killed}/{len(rows)} mutants killed")
  print("\n| mutant | result | killing test | time |\n|---|---|---|---|")
  for name, status, test, dt in rows:
    print(f"| {name} | {status} | {test or '-'} | {dt:.0f} s |")
  return 0 if killed == len(rows) else 1


if __name__ == "__main__":
  sys.exit(main())
