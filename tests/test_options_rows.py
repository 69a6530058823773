"""The option rows of ``benchmarks/options.py`` measure what they claim, on a tiny config.

* MoE step: the row's LoRA loss and adapter gradients equal a float64 reference written out
  independently: routing in NumPy (softmax, top-k, capacity filled in priority order by a
  Python loop), each token's kept experts applied one by one with the kernels
  ``W_e + s * A_e @ B_e`` merged per expert, attention linears ``W + s * A @ B``; its step FLOPs
  stay within 1.05 x (frozen limit + 6 * rows * r * (in + out) per adapted kernel).
* EVA init: the row runs end to end and reports consistent counts and times.
"""

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import options  # noqa: E402
from models import Config  # noqa: E402

TINY = Config(vocab=64, d=32, heads=2, layers=2, seq=16, batch=2)
E, K, CF, R, ALPHA = 4, 2, 1.0, 4, 8.0


@pytest.fixture(scope="module")
def row():
  return options.moe_row(TINY, experts=E, top_k=K, factor=CF, r=R, alpha=ALPHA,
                         init_lora_weights=False)


def _ln(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _routes(logits: np.ndarray, cap: int):
  """``[(token, expert, choice)]`` kept, in priority order: every token's first choice, then
  its second, each expert taking the first ``cap``."""
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  choice = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
  used, kept = [0] * E, []
  for k in range(K):
    for n in range(len(logits)):
      e = int(choice[n, k])
      if used[e] < cap:
        used[e] += 1
        kept.append((n, e, k))
  return choice, kept


def reference_loss(base, factors, ids, labels, routes):
  """The MoE GPT's loss in float64; ``routes`` (a list, filled on the first, concrete call)
  holds each layer's routing."""
  p = base["params"]
  s = ALPHA / R

  def w(path, kernel):
    a, b = factors[path]["lora_A"], factors[path]["lora_B"]
    if kernel.ndim == 3:   # per expert, written out
      return jnp.stack([kernel[e] + s * a[e] @ b[e] for e in range(E)])
    return kernel + s * a @ b

  bsz, t = ids.shape
  d, hd = TINY.d, TINY.d // TINY.heads
  x = p["wte"]["embedding"][ids] + p["wpe"]["embedding"][:t][None]
  cap = math.ceil(K * bsz * t * CF / E)
  for i in range(TINY.layers):
    blk, name = p[f"h_{i}"], f"params/h_{i}"
    h = _ln(x, blk["ln_1"])
    qkv = h @ w(f"{name}/c_attn", blk["c_attn"]["kernel"]) + blk["c_attn"]["bias"]
    q, k, v = (z.reshape(bsz, t, TINY.heads, hd) for z in jnp.split(qkv, 3, axis=-1))
    sc = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    sc = jnp.where(np.tril(np.ones((t, t), bool)), sc, -1e30)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(sc, -1), v).reshape(bsz, t, d)
    x = x + att @ w(f"{name}/c_proj", blk["c_proj"]["kernel"]) + blk["c_proj"]["bias"]
    h = _ln(x, blk["ln_2"]).reshape(bsz * t, d)
    logits = h @ blk["moe"]["router"]["kernel"]
    if len(routes) <= i:
      routes.append(_routes(np.asarray(logits), cap))
    choice, kept = routes[i]
    probs = jax.nn.softmax(logits, -1)
    chosen = jnp.take_along_axis(probs, jnp.asarray(choice), axis=1)
    gate = chosen / chosen.sum(-1, keepdims=True)
    wi, wo = w(f"{name}/moe/wi", blk["moe"]["wi"]), w(f"{name}/moe/wo", blk["moe"]["wo"])
    n, e, c = (np.array([r[j] for r in kept]) for j in range(3))   # one row per kept route
    y = jnp.einsum("mf,mfd->md", _gelu(jnp.einsum("md,mdf->mf", h[n], wi[e])), wo[e])
    x = x + jnp.zeros((bsz * t, d)).at[n].add(gate[n, c][:, None] * y).reshape(bsz, t, d)
  logits = _ln(x, p["ln_f"]) @ p["lm_head"]["kernel"]
  logp = jax.nn.log_softmax(logits, -1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))


def test_moe_step_is_the_written_out_moe_layer(row):
  got_loss, got = jax.jit(jax.value_and_grad(row.loss))(row.lora.trainable, row.lora, row.ids,
                                                         row.labels)
  _, _, step_loss = row.step(row.lora, row.opt_state, row.ids, row.labels)
  np.testing.assert_allclose(float(step_loss), float(got_loss), rtol=1e-6)
  got = got["default"]["lora"]
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), t)
    base, factors = f64(row.lora.base), f64(row.lora.trainable["default"]["lora"])
    ids, labels = np.asarray(row.ids), np.asarray(row.labels)
    routes = []
    want_loss = reference_loss(base, factors, ids, labels, routes)
    dropped = [K * TINY.batch * TINY.seq - len(kept) for _, kept in routes]
    assert all(n > 0 for n in dropped), dropped   # the capacity rule is exercised
    want = jax.jit(jax.grad(lambda f: reference_loss(base, f, ids, labels, routes)))(factors)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  assert set(got) == set(want)
  for path in want:
    for name in ("lora_A", "lora_B"):
      w = np.asarray(want[path][name])
      np.testing.assert_allclose(np.asarray(got[path][name]), w, rtol=1e-4,
                                 atol=1e-4 * np.abs(w).max(), err_msg=f"{path} {name}")


def test_moe_step_flops_are_the_limit_plus_the_adapter_work(row):
  _, _, lora, _ = options._compiled(row.step, row.lora, row.opt_state, row.ids, row.labels)
  _, _, limit, _ = options._compiled(row.limit, row.params, row.perturb, row.ids, row.labels)
  assert lora <= 1.05 * (limit + row.adapter_flops), (lora, limit, row.adapter_flops)
  # a merged W + s A@B would add a kernel-sized weight gradient: 2 * rows * in * out per kernel
  tokens, d = TINY.batch * TINY.seq, TINY.d
  slots = E * options.capacity(tokens, E, K, CF)
  merged = TINY.layers * 2 * (tokens * (3 * d * d + d * d) + slots * 2 * d * 2 * d)
  assert lora < limit + merged, (lora, limit, merged)
  assert lora > limit   # the adapters' work is there


def test_eva_row_runs_and_reports_consistent_figures():
  e = options.eva(Config(vocab=64, d=32, heads=2, layers=1, seq=16, batch=4), batches=2,
                  max_steps=4, calls=1)
  assert 1 <= e["batches"] <= 4
  assert e["converged"] == (e["ranks"] is not None)
  assert e["stats_temp_bytes"] > 0 and e["forward_s"] > 0 and e["init_s"] > e["per_batch_s"]
  np.testing.assert_allclose(e["init_ratio_to_forward"], e["init_s"] / e["forward_s"])
  assert any("EVA init" in line for line in options.markdown({"eva": e}))
