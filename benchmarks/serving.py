"""Serving rows: prefill and single-token decode steps with a KV cache, unmerged vs merged,
mixed-adapter batches over K adapters, and hotswapping adapters into a compiled server.

The model is ``examples/generate.py``'s KV-cache GPT at the benchmark shape (d_model 512,
4 layers, 8 heads, vocab 8192), r = 16 on every block linear, batch 16. Every row of a
table is timed in the same process, interleaved call by call; medians after a warm-up.
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

import lojax  # noqa: E402
import generate  # noqa: E402

WIDTH, DEPTH, HEADS, VOCAB, BATCH, PROMPT, R = 512, 4, 8, 8192, 16, 64, 16
MIXED_K = (1, 4, 16)
DECODE_STEPS = 32


def interleaved(fns: dict, calls: int) -> dict[str, float]:
  """Median seconds per call of each ``fn()``, timed round-robin after one warm-up call."""
  for f in fns.values():
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(calls):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in times.items()}


def _adapters(params, k: int):
  """A LoraParams with ``k`` active adapters (r = 16, random factors)."""
  spec = lojax.LoraSpec(r=R, lora_alpha=2 * R, target_modules="all-linear",
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(100), adapter_name="a0")
  for i in range(1, k):
    lora = lojax.wrap(lora, spec, key=jax.random.key(100 + i), adapter_name=f"a{i}")
  return lojax.set_adapter(lora, [f"a{i}" for i in range(k)])


def serving(calls: int = 10) -> dict:
  model = generate.CausalLM(width=WIDTH, depth=DEPTH, heads=HEADS, vocab=VOCAB)
  prompt = jax.random.randint(jax.random.key(0), (BATCH, PROMPT), 0, VOCAB)
  params = jax.jit(model.init)(jax.random.key(1), prompt)
  cache = generate.empty_cache(model, params, BATCH)
  positions = jnp.broadcast_to(jnp.arange(PROMPT), (BATCH, PROMPT))
  token = prompt[:, -1:]
  pos = jnp.full((BATCH, 1), PROMPT)

  def prefill(p, cache, ids):
    return model.apply({**p, "cache": cache}, ids, positions, decode=True, mutable=["cache"])

  def decode(p, cache, ids):   # DECODE_STEPS cached single-token steps (a scan), per call
    def step(carry, _):
      cache, tok, i = carry
      logits, out = model.apply({**p, "cache": cache}, tok, pos + i, decode=True,
                                mutable=["cache"])
      return (out["cache"], jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), i + 1), None
    (cache, tok, _), _ = jax.lax.scan(step, (cache, ids, 0), None, length=DECODE_STEPS)
    return tok

  single = _adapters(params, 1)
  merged = lojax.merge(single)
  out: dict = {"shape": f"d_model {WIDTH}, {DEPTH} layers, vocab {VOCAB}, batch {BATCH}, "
                        f"prompt {PROMPT}, r = {R} on every block linear, KV cache 256"}
  for phase, fn, ids in (("prefill", prefill, prompt), ("decode", decode, token)):
    per = DECODE_STEPS if phase == "decode" else 1
    frozen, lorafied = jax.jit(fn), jax.jit(lojax.lorafy(fn))
    rows = {"merged": functools.partial(frozen, merged, cache, ids),
            "unmerged": functools.partial(lorafied, single, cache, ids)}
    for k in MIXED_K:
      lora_k = _adapters(params, k)
      sel = lojax.adapter_ids(lora_k, [f"a{i % k}" for i in range(BATCH)])
      rows[f"mixed K={k}"] = functools.partial(lorafied, lora_k, cache, ids,
                                               lora_adapter_ids=sel)
      if k > 1:   # the factors stacked once (lojax.adapter_bank), not per call
        rows[f"mixed K={k}, bank"] = functools.partial(
            lorafied, lora_k, cache, ids, lora_adapter_ids=sel,
            lora_bank=lojax.adapter_bank(lora_k))
    t = interleaved(rows, calls)
    out[phase] = {k: {"s": v / per, "ratio_to_merged": v / t["merged"],
                      "ratio_to_unmerged": v / t["unmerged"]} for k, v in t.items()}
    compiled = {k: jax.jit(fn if k == "merged" else lojax.lorafy(fn)).lower(
        merged if k == "merged" else single, cache, ids).compile() for k in ("merged", "unmerged")}
    for k, c in compiled.items():
      out[phase][k]["bytes_accessed"] = float(c.cost_analysis()["bytes accessed"])
      out[phase][k]["temp_bytes"] = int(c.memory_analysis().temp_size_in_bytes)
  out["hotswap"] = _hotswap(model, params, prompt)
  return out


def _hotswap(model, params, prompt, swaps: int = 6) -> dict:
  """Adapters of ranks 4, 8 and 16 swapped into a server compiled for r = 16."""
  traces = []

  def forward(p, ids):
    traces.append(1)
    return model.apply(p, ids)

  serve = jax.jit(lojax.lorafy(forward))
  server = _adapters(params, 1)
  jax.block_until_ready(serve(server, prompt))
  incoming = [lojax.wrap(params, lojax.LoraSpec(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                init_lora_weights=False),
                         key=jax.random.key(200 + i), adapter_name="a0")
              for i, r in enumerate((4, 8, 16) * (swaps // 3))]
  per = []
  for new in incoming:
    t0 = time.perf_counter()
    swapped = lojax.hotswap(server, new)
    jax.block_until_ready(jax.tree.leaves(swapped.adapters))
    per.append(time.perf_counter() - t0)
    jax.block_until_ready(serve(swapped, prompt))
  return {"swaps": len(incoming), "recompilations": len(traces) - 1,
          "swap_s": float(np.median(per))}


def block_bytes() -> tuple[int, int]:
  """Float32 bytes of the served model's block kernels and of one adapter's factors on them
  (``r * (in + out)`` values per kernel), from the abstract params."""
  model = generate.CausalLM(width=WIDTH, depth=DEPTH, heads=HEADS, vocab=VOCAB)
  shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, PROMPT), jnp.int32))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  kernels = [x.shape for path, x in flat
             if path[-1].key == "kernel" and path[-2].key in ("c_attn", "c_proj", "c_fc")]
  assert len(kernels) == 4 * DEPTH, kernels
  return (4 * sum(i * o for i, o in kernels), 4 * sum(R * (i + o) for i, o in kernels))


def markdown(s: dict) -> list[str]:
  lines = ["", f"Serving ({s['shape']}): time per prefill, per decoded token (a scan of "
           f"{DECODE_STEPS} cached steps per call; bytes and temp per call), and the ratio to "
           "the merged model and to one unmerged adapter.", "",
           "| phase | row | time | / merged | / unmerged | bytes accessed MB | temp MiB |",
           "|---|---|---|---|---|---|---|"]
  for phase in ("prefill", "decode"):
    for k, r in s[phase].items():
      b = f"{r['bytes_accessed'] / 1e6:.1f}" if "bytes_accessed" in r else "—"
      m = f"{r['temp_bytes'] / 2**20:.1f}" if "temp_bytes" in r else "—"
      lines.append(f"| {phase} | {k} | {r['s'] * 1e3:.2f} ms | {r['ratio_to_merged']:.3f} | "
                   f"{r['ratio_to_unmerged']:.3f} | {b} | {m} |")
  kernels, factors = block_bytes()
  lines += ["", f"What a decoded token reads, besides the KV cache and the head: the block "
            f"kernels, {kernels / 1e6:.1f} MB (float32), and each distinct adapter's factors, "
            f"{factors / 1e6:.2f} MB (r = {R} on the {DEPTH} x 4 block linears). A step whose "
            f"{BATCH} examples use K different adapters reads K of those: at K = 4 "
            f"{4 * factors / kernels:.0%} and at K = 16 {16 * factors / kernels:.0%} of the "
            "kernels' bytes. Where those matmuls are bound by memory bandwidth, K adapters "
            "cost (kernels + K x factors) / (kernels + factors) of one adapter's time on them "
            f"(K = 16: {(kernels + 16 * factors) / (kernels + factors):.2f}x) whatever gathers "
            "the factors; the step as a whole costs less than that here (the table), as the "
            "attention over the cache, the head and fixed costs per op take their share."]
  h = s["hotswap"]
  lines += ["", f"Hotswap: {h['swaps']} adapters of ranks 4, 8 and 16 swapped into a server "
            f"compiled for r = 16: {h['recompilations']} recompilations, "
            f"{h['swap_s'] * 1e3:.1f} ms per swap."]
  return lines
