"""Option rows where speed matters: EVA initialisation, and a LoRA step on MoE expert kernels.

EVA init (``eva``): ``lojax.eva_init`` with PEFT's default ``eva_config`` (rho 2, tau 0.99) on
the benchmark GPT (``models.py``, d_model 512, 4 layers, batch 8 x 256), r = 16 on every block
linear as in ``run.py``, over ``EVA_BATCHES`` batches cycled until the components converge or
``EVA_MAX_STEPS`` batches have been read. It reports the end-to-end time (tracing and compiling
the statistics pass included), the batches read, the steady-state time per batch (the end-to-end
time less the statistics pass's compile time, over the batches), the jitted statistics pass
alone per batch, each against one jitted forward of the frozen model on the same batch (timed
interleaved with the pass), and the pass's compiled temp bytes. The model is a random
initialisation fed random tokens: its inputs' spectra are flat, so tau = 0.99 may not be
reached within the cap; the row then says so, and its times are those of the batches read.

MoE step (``moe``): ``MoeGPT``, the benchmark GPT's shape (d_model ``MOE.d``, ``MOE.layers``
pre-LayerNorm blocks, causal attention ``attn/c_attn``, ``attn/c_proj``) whose MLP is a
mixture of ``EXPERTS`` experts with kernels ``moe/wi [E, d, f]`` and ``moe/wo [E, f, d]``, a
bias-free ``moe/router``, top-``TOP_K`` token-choice routing with the softmax gates of the
chosen experts renormalised, and GShard's capacity: ``C = ceil(TOP_K * tokens * CAPACITY / E)``
slots per expert, filled in priority order (every token's first choice, then its second), the
overflow dropped. Dispatch and combine are a gather and a scatter-add of the tokens into the
``[E, C, d]`` slots, so the expert matmuls are batched ``einsum``s ``ecd,edf->ecf`` with the
expert axis as a batch axis (the form lojax factorizes per expert; CPU's ``ragged_dot`` is a
dense fallback that computes every token against every expert). LoRA r = ``R`` goes on the
expert kernels (one ``A [E, in, r]``, ``B [E, r, out]`` per kernel: PEFT's
``target_parameters``) and the attention linears; router, embeddings and head are frozen.

The frozen limit is ``run.py``'s: forward plus the gradient with respect to an additive
perturbation of the embedding output (every input gradient, no weight gradient). The adapter
work added to it is ``6 * rows * r * (in + out)`` FLOPs per adapted kernel: the forward
``x @ A`` and ``(x @ A) @ B`` (2 rows r (in + out)), and the backward's gradients of ``B``, of
``x @ A``, of ``A`` and the ``A``-term of the input gradient (4 rows r (in + out)); ``rows`` is
the tokens for an attention linear and the ``E * C`` computed slots (padding slots included)
for an expert kernel. The target is ``step FLOPs <= 1.05 x (limit + adapter work)``: the step
costs the frozen model's input gradients plus the adapters' own work, never a merged
``W + s A@B`` per expert (which would add a kernel-sized weight gradient per expert).
"""

from __future__ import annotations

import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lojax
from models import Config, LinenGPT, _attend, batch, embed, xent
from serving import interleaved

R, ALPHA, LR = 16, 32.0, 1e-3
EVA_BATCHES, EVA_MAX_STEPS = 4, 8
EXPERTS, TOP_K, CAPACITY = 8, 2, 1.25
MOE = Config(vocab=2048, d=256, heads=4, layers=4, seq=256, batch=8)
MOE_TARGETS = ["c_attn", "c_proj", "wi", "wo"]


def _compiled(fn, *args):
  """(compiled, compile seconds, flops, temp bytes) of ``jax.jit(fn)`` at ``args``."""
  t0 = time.perf_counter()
  c = jax.jit(fn).lower(*args).compile()
  s = time.perf_counter() - t0
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return c, s, float(cost["flops"]), int(c.memory_analysis().temp_size_in_bytes)


# ------------------------------------------------------------------- EVA ---

def eva(cfg: Config = Config(), batches: int = EVA_BATCHES, max_steps: int = EVA_MAX_STEPS,
        calls: int = 5) -> dict:
  from lojax._src import eva as eva_src   # the jitted statistics pass, for its memory analysis
  model = LinenGPT(cfg)
  data = [batch(cfg, seed=100 + i)[0] for i in range(batches)]
  params = jax.jit(model.init)(jax.random.key(0), data[0])
  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules="all-linear")
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  read = []

  def count(b):   # eva_init asks for one mask per batch it reads (and one for its first trace)
    read.append(1)

  t0 = time.perf_counter()
  try:
    out = lojax.eva_init(lora, model.apply, data, token_mask=count, max_steps=max_steps)
    converged, ranks = True, sorted(t.r for t in out.meta.adapter("default").targets)
  except ValueError as e:
    if "not converged" not in str(e):
      raise
    converged, ranks = False, None
  init_s = time.perf_counter() - t0
  steps = len(read) - 1
  dense = {t.path: t for t in lora.meta.adapter("default").targets if t.kind == "dense"}
  run = eva_src.statistics_fn(lora, model.apply, dense)
  leaves = jax.tree_util.tree_leaves(lora.base)
  t0 = time.perf_counter()
  stats = run.step.lower(leaves, data[0], None).compile()
  compile_s = time.perf_counter() - t0
  forward = jax.jit(model.apply)
  t = interleaved({"forward": lambda: forward(params, data[0]),
                    "stats": lambda: run(data[0], None)}, calls)
  per_batch = (init_s - compile_s) / max(steps, 1)
  return {"shape": f"d_model {cfg.d}, {cfg.layers} layers, vocab {cfg.vocab}, batch "
                   f"{cfg.batch} x {cfg.seq}, r = {R} on every block linear ({len(dense)} "
                   "kernels), eva_config defaults (rho 2, tau 0.99)",
          "distinct_batches": batches, "max_steps": max_steps, "batches": steps,
          "converged": converged, "ranks": ranks, "init_s": init_s,
          "stats_compile_s": compile_s, "per_batch_s": per_batch,
          "stats_step_s": t["stats"], "forward_s": t["forward"],
          "init_ratio_to_forward": init_s / t["forward"],
          "per_batch_ratio_to_forward": per_batch / t["forward"],
          "stats_ratio_to_forward": t["stats"] / t["forward"],
          "stats_temp_bytes": int(stats.memory_analysis().temp_size_in_bytes)}


# ------------------------------------------------------------------- MoE ---

def capacity(tokens: int, experts: int = EXPERTS, top_k: int = TOP_K,
             factor: float = CAPACITY) -> int:
  return math.ceil(top_k * tokens * factor / experts)


def route(logits, top_k: int, cap: int):
  """``(table [E, C], gates [E, C])``: the token (``tokens`` = an empty slot) in each expert's
  slots and its gate, top-``top_k`` token choice filled in priority order up to ``cap``."""
  n, e = logits.shape
  gate, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
  gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  expert = idx.T.reshape(-1)                          # [top_k * n]: first choices, then second
  token = jnp.tile(jnp.arange(n, dtype=jnp.int32), top_k)
  seen = jnp.cumsum(jax.nn.one_hot(expert, e, dtype=jnp.int32), axis=0)
  pos = jnp.take_along_axis(seen, expert[:, None], axis=1)[:, 0] - 1
  slot = jnp.where(pos < cap, expert * cap + pos, e * cap)   # e * cap: dropped
  table = jnp.full((e * cap + 1,), n, jnp.int32).at[slot].set(token)[:-1].reshape(e, cap)
  gates = jnp.zeros((e * cap + 1,), gate.dtype).at[slot].set(gate.T.reshape(-1))
  return table, gates[:-1].reshape(e, cap)


class _Moe(nn.Module):
  cfg: Config
  experts: int = EXPERTS
  top_k: int = TOP_K
  capacity: float = CAPACITY

  @nn.compact
  def __call__(self, h):
    b, t, d = h.shape
    f = 2 * d
    init = nn.initializers.lecun_normal(batch_axis=(0,))
    wi = self.param("wi", init, (self.experts, d, f))
    wo = self.param("wo", init, (self.experts, f, d))
    x = h.reshape(b * t, d)
    table, gates = route(nn.Dense(self.experts, use_bias=False, name="router")(x), self.top_k,
                         capacity(b * t, self.experts, self.top_k, self.capacity))
    xe = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[table]          # [E, C, d]
    ye = jnp.einsum("ecf,efd->ecd", jax.nn.gelu(jnp.einsum("ecd,edf->ecf", xe, wi)), wo)
    out = jnp.zeros((b * t + 1, d), ye.dtype).at[table].add(ye * gates[..., None])
    return out[:-1].reshape(b, t, d)


class _MoeBlock(nn.Module):
  cfg: Config
  experts: int
  top_k: int
  capacity: float

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_1")(x)
    q, k, v = jnp.split(nn.Dense(3 * self.cfg.d, name="c_attn")(h), 3, axis=-1)
    x = x + nn.Dense(self.cfg.d, name="c_proj")(_attend(q, k, v, self.cfg.heads))
    return x + _Moe(self.cfg, self.experts, self.top_k, self.capacity, name="moe")(
        nn.LayerNorm(name="ln_2")(x))


class MoeGPT(nn.Module):
  """``models.LinenGPT`` with a mixture-of-experts MLP (``h_i/moe``) in every block."""
  cfg: Config
  experts: int = EXPERTS
  top_k: int = TOP_K
  capacity: float = CAPACITY

  @nn.compact
  def __call__(self, ids, perturb=None):
    x = embed(self.cfg, ids, perturb)
    for i in range(self.cfg.layers):
      x = _MoeBlock(self.cfg, self.experts, self.top_k, self.capacity, name=f"h_{i}")(x)
    return nn.Dense(self.cfg.vocab, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


@dataclasses.dataclass
class MoeRow:
  model: MoeGPT
  params: dict
  lora: lojax.LoraParams
  ids: jax.Array
  labels: jax.Array
  loss: callable        # loss(trainable, lora, ids, labels): what the step differentiates
  step: callable        # step(lora, opt_state, ids, labels) -> (trainable, opt_state, loss)
  opt_state: object
  limit: callable       # limit(params, perturb, ids, labels) -> (loss, d loss / d perturb)
  perturb: jax.Array
  adapter_flops: float  # 6 * rows * r * (in + out), summed over the adapted kernels


def moe_row(cfg: Config = MOE, experts: int = EXPERTS, top_k: int = TOP_K,
            factor: float = CAPACITY, r: int = R, alpha: float = ALPHA,
            init_lora_weights=True) -> MoeRow:
  model = MoeGPT(cfg, experts, top_k, factor)
  ids, labels = batch(cfg)
  params = jax.jit(model.init)(jax.random.key(0), ids)
  spec = lojax.LoraSpec(r=r, lora_alpha=alpha, target_modules=MOE_TARGETS,
                        init_lora_weights=init_lora_weights)
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=model.apply,
                    example_args=(ids,))
  apply = lojax.lorafy(model.apply)
  tx = optax.adamw(LR)

  def loss(trainable, lora, ids, labels):
    return xent(apply(lora.with_trainable(trainable), ids), labels)

  @jax.jit
  def step(lora, opt_state, ids, labels):
    value, grads = jax.value_and_grad(loss)(lora.trainable, lora, ids, labels)
    updates, opt_state = tx.update(grads, opt_state, lora.trainable)
    return optax.apply_updates(lora.trainable, updates), opt_state, value

  @jax.jit
  def limit(params, perturb, ids, labels):
    return jax.value_and_grad(lambda q: xent(model.apply(params, ids, q), labels))(perturb)

  tokens, d, f = cfg.batch * cfg.seq, cfg.d, 2 * cfg.d
  slots = experts * capacity(tokens, experts, top_k, factor)
  per_layer = 6 * r * (tokens * ((d + 3 * d) + (d + d)) + slots * 2 * (d + f))
  return MoeRow(model, params, lora, ids, labels, loss, step, tx.init(lora.trainable), limit,
                jnp.zeros(ids.shape + (d,), jnp.float32), float(cfg.layers * per_layer))


def moe(calls: int = 5) -> dict:
  row = moe_row()
  lora_args = (row.lora, row.opt_state, row.ids, row.labels)
  limit_args = (row.params, row.perturb, row.ids, row.labels)
  _, lora_compile, lora_flops, lora_temp = _compiled(row.step, *lora_args)
  _, limit_compile, limit_flops, limit_temp = _compiled(row.limit, *limit_args)
  t = interleaved({"limit": lambda: row.limit(*limit_args),
                    "lora": lambda: row.step(*lora_args)}, calls)
  cfg = row.model.cfg
  return {"shape": f"d_model {cfg.d}, {cfg.layers} layers, {cfg.heads} heads, vocab {cfg.vocab}, "
                   f"batch {cfg.batch} x {cfg.seq}; {EXPERTS} experts [E, {cfg.d}, {2 * cfg.d}] "
                   f"and [E, {2 * cfg.d}, {cfg.d}] per block, top-{TOP_K}, capacity factor "
                   f"{CAPACITY} ({capacity(cfg.batch * cfg.seq)} slots per expert); r = {R} on "
                   f"{', '.join(MOE_TARGETS)}",
          "limit": {"s": t["limit"], "flops": limit_flops, "temp_bytes": limit_temp,
                    "compile_s": limit_compile},
          "lora": {"s": t["lora"], "flops": lora_flops, "temp_bytes": lora_temp,
                   "compile_s": lora_compile},
          "adapter_flops": row.adapter_flops,
          "step_ratio_to_limit": t["lora"] / t["limit"],
          "flops_ratio_to_limit": lora_flops / limit_flops,
          "flops_ratio_to_limit_plus_adapters": lora_flops / (limit_flops + row.adapter_flops)}


def options(calls: int = 5) -> dict:
  out = {"moe": moe(calls)}
  print("  moe:", out["moe"], flush=True)
  out["eva"] = eva(calls=calls)
  print("  eva:", out["eva"], flush=True)
  return out


def targets(o: dict) -> list[tuple[str, str, bool | None]]:
  """(target, measured, met) of the option rows."""
  out = []
  m = o.get("moe")
  if m:
    f = m["flops_ratio_to_limit_plus_adapters"]
    out.append(("MoE LoRA step FLOPs <= 1.05 x (frozen MoE limit + adapter work)",
                f"{f:.3f}x ({m['flops_ratio_to_limit']:.3f}x the limit alone)", f <= 1.05))
  return out


def markdown(o: dict) -> list[str]:
  lines = []
  m = o.get("moe")
  if m:
    lines += ["", f"MoE LoRA step ({m['shape']}): against that model's frozen limit; adapter "
              f"work {m['adapter_flops'] / 1e9:.2f} GFLOPs (6 x rows x r x (in + out) per "
              "adapted kernel).", "",
              "| row | step (s) | step / limit | GFLOPs | FLOPs / limit | "
              "FLOPs / (limit + adapters) | temp MiB | compile (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, key in (("frozen limit (MoE)", "limit"), ("lojax LoRA (MoE)", "lora")):
      r = m[key]
      lora = key == "lora"
      lines.append(
          f"| {name} | {r['s']:.3f} | {m['step_ratio_to_limit'] if lora else 1:.3f} | "
          f"{r['flops'] / 1e9:.1f} | {m['flops_ratio_to_limit'] if lora else 1:.3f} | "
          + (f"{m['flops_ratio_to_limit_plus_adapters']:.3f}" if lora else "—")
          + f" | {r['temp_bytes'] / 2**20:.0f} | {r['compile_s']:.1f} |")
  e = o.get("eva")
  if e:
    host = e["per_batch_s"] - e["stats_step_s"]
    state = (f"converged after {e['batches']} batches" if e["converged"] else
             f"not converged after {e['batches']} batches (the cap)")
    lines += ["", f"EVA init ({e['shape']}; {e['distinct_batches']} distinct batches, cycled): "
              f"{state}. Times against one jitted forward of the frozen model on one batch "
              f"({e['forward_s']:.3f} s).", "",
              "| EVA | time (s) | / forward |", "|---|---|---|",
              f"| eva_init, end to end (compile included) | {e['init_s']:.1f} | "
              f"{e['init_ratio_to_forward']:.1f} |",
              f"| per batch, steady state (host PCA included) | {e['per_batch_s']:.2f} | "
              f"{e['per_batch_ratio_to_forward']:.1f} |",
              f"| statistics pass alone, per batch | {e['stats_step_s']:.3f} | "
              f"{e['stats_ratio_to_forward']:.2f} |",
              f"| host side per batch (moments merged, PCA): the two above's difference | "
              f"{host:.2f} | {host / e['forward_s']:.1f} |",
              "", f"Statistics pass: compile {e['stats_compile_s']:.1f} s, temp "
              f"{e['stats_temp_bytes'] / 2**20:.0f} MiB."]
  return lines
