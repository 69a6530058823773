"""Compile time: ``lower`` and ``compile`` of a LoRA step against the frozen model's.

For the linen benchmark GPT (``models.LinenGPT``, d_model 512, vocab 8192,
seq 256, batch 8; its blocks are a Python loop, so ``layers`` of them are
unrolled in the program) at 4 and at 48 layers, each row is one step function,
timed as ``jax.jit(f).lower(*args)`` and ``lowered.compile()`` separately:

* ``frozen limit``: the loss and its gradient with respect to a perturbation of
  the embedding output (``run.py``'s ``limit``): the frozen model's forward and
  backward, no weight gradient;
* ``full fine-tuning gradient``: ``value_and_grad`` with respect to every param, no
  optimizer (the like-for-like row for the LoRA gradient);
* ``full fine-tuning``: the gradient of every param and an ``optax.adamw`` update;
* ``lojax LoRA gradient``: ``value_and_grad`` with respect to ``lora.trainable``
  (``lojax.LoraSpec(r=16, lora_alpha=32, target_modules="all-linear")``), no optimizer;
* ``lojax LoRA step``: the gradient and the AdamW update (``models.lora_step``);
* ``lojax LoRA step, remat=False``: the same with ``lojax.lorafy(model.apply,
  remat=False)``: the plain factorized ``x@W + s*((x@A)@B)`` without the fused
  custom-VJP matmul.

Every repetition (``--reps``, default 3) runs ``jax.clear_caches()`` before each
row and goes through all rows of all depths in turn, so load on a shared machine
hits them alike; a row's figure is its repetition with the least lower + compile.
From the compiled executable: its ``dot(`` and ``fusion(`` instructions (in
``compiled.as_text()``, fused computations included) and its temp memory
(``memory_analysis()``). One more line per depth: ``jax.make_jaxpr(model.apply)``
alone, the trace of the model that ``lojax.lorafy`` runs before it rewrites it.

``python benchmarks/compile_time.py`` (``--layers 4,48``, ``--reps 3``, ``--out
benchmarks/results``) writes ``compile.json`` and ``compile.md``; ``--tiny`` (d 64,
vocab 256, seq 16, batch 2, 2 layers) is the shape ``tests/test_compile_time.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import lojax  # noqa: E402
from models import Config, LinenGPT, batch, fresh_compiles, lora_step, xent  # noqa: E402

R, ALPHA, LR = 16, 32.0, 1e-3
TINY = dict(d=64, vocab=256, seq=16, batch=2)
LIMIT = "frozen limit"
ROWS = (LIMIT, "full fine-tuning gradient", "full fine-tuning", "lojax LoRA gradient",
        "lojax LoRA step", "lojax LoRA step, remat=False")


def depth_rows(cfg: Config) -> tuple[dict, callable]:
  """``{row name: (unjitted fn, args)}`` at one depth, and the model-trace thunk."""
  model = LinenGPT(cfg)
  ids, labels = batch(cfg)
  params = jax.jit(model.init)(jax.random.key(0), ids)
  tx = optax.adamw(LR)

  def limit(params, perturb, ids, labels):
    return jax.value_and_grad(lambda q: xent(model.apply(params, ids, q), labels))(perturb)

  def full_grad(params, ids, labels):
    return jax.value_and_grad(lambda p: xent(model.apply(p, ids), labels))(params)

  def full_step(params, opt_state, ids, labels):
    loss, grads = jax.value_and_grad(lambda p: xent(model.apply(p, ids), labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  apply = lojax.lorafy(model.apply)

  def lora_grad(lora, ids, labels):
    return jax.value_and_grad(
        lambda t: xent(apply(lora.with_trainable(t), ids), labels))(lora.trainable)

  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules="all-linear")
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  lora_opt = tx.init(lora.trainable)
  perturb = jnp.zeros(ids.shape + (cfg.d,), jnp.float32)
  # lora_step returns a jitted step; its __wrapped__ is the plain function, jitted afresh per
  # repetition below.
  unjit = lambda f: getattr(f, "__wrapped__", f)
  rows = {
      LIMIT: (limit, (params, perturb, ids, labels)),
      "full fine-tuning gradient": (full_grad, (params, ids, labels)),
      "full fine-tuning": (full_step, (params, tx.init(params), ids, labels)),
      "lojax LoRA gradient": (lora_grad, (lora, ids, labels)),
      "lojax LoRA step": (unjit(lora_step(apply, tx)), (lora, lora_opt, ids, labels)),
      "lojax LoRA step, remat=False": (
          unjit(lora_step(lojax.lorafy(model.apply, remat=False), tx)),
          (lora, lora_opt, ids, labels)),
  }
  assert tuple(rows) == ROWS
  trace = lambda: jax.make_jaxpr(model.apply)(params, ids)
  return rows, trace


def count(text: str, op: str) -> int:
  """HLO instructions with opcode ``op`` (``%name = <shape> op(...)``)."""
  return len(re.findall(rf"\s{op}\(", text))


def measure(fn, args) -> dict:
  jax.clear_caches()
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "compiled": compiled}


def analyse(compiled) -> dict:
  text = compiled.as_text()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  return {"dots": count(text, "dot"), "fusions": count(text, "fusion"),
          "temp_mib": None if temp is None else round(temp / 2**20, 2)}


def run(layers: list[int], reps: int, tiny: bool) -> dict:
  base = TINY if tiny else {}
  depths, traces = {}, {}
  for n in layers:
    depths[n], traces[n] = depth_rows(Config(layers=n, **base))
  best = {n: {} for n in layers}
  every = {n: {} for n in layers}   # [lower s, compile s] of every repetition
  trace_s = {n: float("inf") for n in layers}
  for rep in range(reps):
    for n in layers:
      jax.clear_caches()
      t0 = time.perf_counter()
      traces[n]()
      trace_s[n] = min(trace_s[n], time.perf_counter() - t0)
      for name, (fn, args) in depths[n].items():
        m = measure(fn, args)
        compiled = m.pop("compiled")
        every[n].setdefault(name, []).append(
            [round(m["lower_s"], 3), round(m["compile_s"], 3)])
        if name not in best[n]:
          m.update(analyse(compiled))
        elif m["total_s"] < best[n][name]["total_s"]:
          m.update({k: best[n][name][k] for k in ("dots", "fusions", "temp_mib")})
        else:
          continue
        best[n][name] = m
      for name, ts in every[n].items():
        print(f"rep {rep + 1} layers {n:3d} {name:30s} lower {ts[-1][0]:7.2f} s  "
              f"compile {ts[-1][1]:7.2f} s", flush=True)
  out = {}
  for n in layers:
    rows, lim = best[n], best[n][LIMIT]
    for m in rows.values():
      for k in ("lower", "compile", "total"):
        m[f"{k}_vs_limit"] = round(m[f"{k}_s"] / lim[f"{k}_s"], 3)
      for k in ("lower_s", "compile_s", "total_s"):
        m[k] = round(m[k], 3)
    for name, m in rows.items():
      m["reps"] = every[n][name]
    out[str(n)] = {"rows": rows, "model_apply_trace_s": round(trace_s[n], 3)}
  cfg = Config(**base)
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "machine": platform.machine(), "reps": reps,
          "config": {"d": cfg.d, "vocab": cfg.vocab, "seq": cfg.seq, "batch": cfg.batch,
                     "heads": cfg.heads, "r": R, "lora_alpha": ALPHA},
          "layers": out}


def markdown(res: dict) -> str:
  c = res["config"]
  lines = [
      "## Compile time: a LoRA step against the frozen model's",
      "",
      f"`python benchmarks/compile_time.py` on {res['backend']} (jax {res['jax']}): the linen "
      f"benchmark GPT (d_model {c['d']}, vocab {c['vocab']}, seq {c['seq']}, batch {c['batch']}; "
      "the blocks are a Python loop, so every layer is unrolled in the program), "
      "`jax.jit(step).lower(*args)` and `.compile()` timed separately, `jax.clear_caches()` "
      f"before each, rows interleaved, best of {res['reps']} by lower + compile. LoRA: r = "
      f"{c['r']}, alpha {c['lora_alpha']:g}, all linear layers. Dots and fusions: instructions "
      "in `compiled.as_text()` (fused computations included); temp: `memory_analysis()`.",
      "",
      "| layers | row | lower s | compile s | total s | total / limit | dots | fusions | "
      "temp MiB |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for n, d in res["layers"].items():
    for name, m in d["rows"].items():
      lines.append(f"| {n} | {name} | {m['lower_s']:.2f} | {m['compile_s']:.2f} | "
                   f"{m['total_s']:.2f} | {m['total_vs_limit']:.2f}x | {m['dots']} | "
                   f"{m['fusions']} | {m['temp_mib']} |")
  lines.append("")
  for n, d in res["layers"].items():
    lines.append(f"- {n} layers: `jax.make_jaxpr(model.apply)(params, ids)` alone (the trace "
                 f"`lojax.lorafy` starts from) {d['model_apply_trace_s']:.2f} s; the LoRA "
                 f"step's lowering {d['rows']['lojax LoRA step']['lower_s']:.2f} s.")
  lines += ["", summary(res), ""]
  return "\n".join(lines)


def summary(res: dict) -> str:
  """A paragraph written from the measured numbers."""
  parts = []
  for n, d in res["layers"].items():
    rows = d["rows"]
    lim, step, full = rows[LIMIT], rows["lojax LoRA step"], rows["full fine-tuning"]
    grad, plain = rows["lojax LoRA gradient"], rows["lojax LoRA step, remat=False"]
    fgrad = rows["full fine-tuning gradient"]
    where = "lowering" if (step["lower_s"] - lim["lower_s"]) > (
        step["compile_s"] - lim["compile_s"]) else "compiling"
    parts.append(
        f"At {n} layers the LoRA step takes {step['total_s']:.2f} s to lower and compile, "
        f"{step['total_vs_limit']:.2f}x the frozen limit's {lim['total_s']:.2f} s "
        f"(lower {step['lower_vs_limit']:.2f}x, compile {step['compile_vs_limit']:.2f}x) and "
        f"{step['total_s'] / full['total_s']:.2f}x full fine-tuning's {full['total_s']:.2f} s; "
        f"most of the extra over the limit is {where}. The gradient alone is "
        f"{grad['total_vs_limit']:.2f}x the limit and {grad['total_s'] / fgrad['total_s']:.2f}x "
        f"full fine-tuning's gradient ({fgrad['total_vs_limit']:.2f}x the limit; "
        f"{grad['dots']} dots against {fgrad['dots']}); AdamW adds "
        f"{step['total_s'] - grad['total_s']:+.2f} s and {step['fusions'] - grad['fusions']} "
        f"fusions on the adapters, {full['total_s'] - fgrad['total_s']:+.2f} s and "
        f"{full['fusions'] - fgrad['fusions']} fusions on every param; without the fused op (remat=False) the "
        f"step is {plain['total_vs_limit']:.2f}x, with {plain['dots']} dots against "
        f"{step['dots']} fused and {lim['dots']} in the limit.")
  spread = max(max(sum(t) for t in m["reps"]) / min(sum(t) for t in m["reps"])
               for d in res["layers"].values() for m in d["rows"].values())
  parts.append(f"Timings are noisy (a shared machine: a row's slowest repetition took up to "
               f"{spread:.2f}x its fastest; `compile.json` has every repetition); the "
               "instruction counts and temp memory do not vary.")
  return " ".join(parts)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", default="4,48", help="comma-separated depths (default 4,48)")
  ap.add_argument("--reps", type=int, default=3, help="repetitions per row (best kept)")
  ap.add_argument("--out", default=str(HERE / "results"),
                  help="folder for compile.json / compile.md")
  ap.add_argument("--tiny", action="store_true",
                  help="d 64, vocab 256, seq 16, batch 2, 2 layers (the test's shape)")
  args = ap.parse_args(argv)
  layers = [2] if args.tiny else [int(x) for x in args.layers.split(",") if x.strip()]
  start = time.perf_counter()
  with fresh_compiles():
    res = run(layers, args.reps, args.tiny)
  res["wall_s"] = round(time.perf_counter() - start, 1)
  path = pathlib.Path(args.out)
  path.mkdir(parents=True, exist_ok=True)
  (path / "compile.json").write_text(json.dumps(res, indent=1))
  (path / "compile.md").write_text(markdown(res))
  print(markdown(res), flush=True)
  print(f"wrote {path / 'compile.json'} and {path / 'compile.md'} in {res['wall_s']} s", flush=True)
  return res


if __name__ == "__main__":
  main()
