"""Serving (issue 16): KV-cache decoding under lorafy, mixed-adapter decoding, hotswap.

The model is ``examples/generate.py``'s CausalLM (linen, KV cache in the
``"cache"`` collection) at a tiny size, plus a small NNX model whose cache is
``nnx.Cache`` state. References are written out: a kernel ``W + s·A@B`` formed
in float64 NumPy and the model run without a cache on the whole sequence.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lojax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import generate  # noqa: E402

V, B, P, STEPS = 64, 4, 5, 12


@functools.cache
def setup():
  model = generate.CausalLM(width=32, depth=2, heads=2, vocab=V)
  prompt = jax.random.randint(jax.random.key(0), (B, P), 0, V)
  params = jax.jit(model.init)(jax.random.key(1), prompt)
  return model, params, prompt


def wrapped(r=4, alpha=8, key=2, targets="all-linear", **kw):
  model, params, prompt = setup()
  spec = lojax.LoraSpec(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                        **kw)
  return lojax.wrap(params, spec, key=jax.random.key(key))


def merged_by_hand(lora, name="default"):
  """The base with ``W + s * A @ B`` in float64 NumPy for every 2-D target (not lojax.merge)."""
  meta = lora.meta.adapter(name)
  params = jax.tree.map(np.asarray, lora.base)
  for t in meta.targets:
    f = lora.adapters[name]["lora"][t.path]
    node = params
    for part in t.path.split("/"):
      node = node[part]
    w = np.asarray(node[t.leaf], np.float64)
    delta = t.scaling * np.asarray(f["lora_A"], np.float64) @ np.asarray(f["lora_B"], np.float64)
    node[t.leaf] = (w + delta).astype(np.float32)
  return params


@functools.cache
def _jitted_apply():
  return jax.jit(setup()[0].apply)


def reference(params, ids):
  """The model run without a cache on whole sequences (jitted: one compile per shape)."""
  return _jitted_apply()(params, jnp.asarray(ids))


def greedy_fn(steps=STEPS):
  model, _, _ = setup()
  return functools.partial(generate.greedy, model, steps=steps)


def test_decoding_under_lorafy_is_the_adapted_model_token_by_token():
  """lorafy of the whole loop (prefill + lax.scan of cached steps) continues the prompt as the
  written-out adapted model does without a cache, token by token, and as the merged model."""
  model, params, prompt = setup()
  lora = wrapped()
  cache = generate.empty_cache(model, params, B)
  tokens = np.asarray(jax.jit(lojax.lorafy(greedy_fn()))(lora, cache, prompt))
  ref = merged_by_hand(lora)
  seq = np.zeros((B, P + STEPS), np.int32)   # one shape: the model is causal, so the
  seq[:, :P] = np.asarray(prompt)              # zeros after position P + i change nothing
  for i in range(STEPS):   # no cache: the whole sequence each time
    logits = reference(ref, seq)
    nxt = np.argmax(np.asarray(logits[:, P + i - 1]), axis=-1)
    np.testing.assert_array_equal(tokens[:, i], nxt, err_msg=f"token {i}")
    seq[:, P + i] = nxt
  merged = jax.jit(greedy_fn())(lojax.merge(lora), cache, prompt)
  np.testing.assert_array_equal(tokens, np.asarray(merged))
  base = np.asarray(jax.jit(greedy_fn())(params, cache, prompt))
  assert (base != tokens).any(), "the adapter changes nothing: the test would not see it"


def test_a_while_loop_decoder_under_lorafy():
  """A lax.while_loop decoder (stop at a token or a length) gives the scan's tokens."""
  model, params, prompt = setup()
  lora = wrapped()
  cache = generate.empty_cache(model, params, B)

  def decode(p, cache, prompt, stop_token):
    b, n = prompt.shape
    pos = jnp.broadcast_to(jnp.arange(n), (b, n))
    logits, out = model.apply({**p, "cache": cache}, prompt, pos, decode=True, mutable=["cache"])
    tokens = jnp.zeros((b, STEPS), jnp.int32)
    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

    def cond(c):
      _, tok, i, _ = c
      return (i < STEPS) & ~jnp.all(tok == stop_token)

    def body(c):
      cache, tok, i, tokens = c
      tokens = tokens.at[:, i].set(tok)
      logits, out = model.apply({**p, "cache": cache}, tok[:, None], jnp.full((b, 1), n + i),
                                decode=True, mutable=["cache"])
      return out["cache"], jnp.argmax(logits[:, -1], -1).astype(jnp.int32), i + 1, tokens

    return jax.lax.while_loop(cond, body, (out["cache"], first, 0, tokens))

  _, _, n, tokens = jax.jit(lojax.lorafy(decode))(lora, cache, prompt, -1)
  want = jax.jit(lojax.lorafy(greedy_fn()))(lora, cache, prompt)
  assert int(n) == STEPS
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))


class NnxLM(nnx.Module):
  """A one-block NNX causal LM whose KV cache is ``nnx.Cache`` state."""

  def __init__(self, d, heads, max_len, batch, rngs):
    self.heads, self.max_len = heads, max_len
    self.wte = nnx.Embed(V, d, rngs=rngs)
    self.wpe = nnx.Embed(max_len, d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)
    self.head = nnx.Linear(d, V, rngs=rngs)
    hd = d // heads
    self.k = nnx.Cache(jnp.zeros((batch, max_len, heads, hd)))
    self.v = nnx.Cache(jnp.zeros((batch, max_len, heads, hd)))

  def __call__(self, ids, start):
    b, t = ids.shape
    x = self.wte(ids) + self.wpe(start + jnp.arange(t))[None]
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3 * self.heads, -1), 3, axis=2)
    self.k[...] = jax.lax.dynamic_update_slice(self.k[...], k, (0, start, 0, 0))
    self.v[...] = jax.lax.dynamic_update_slice(self.v[...], v, (0, start, 0, 0))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, self.k[...]) / np.sqrt(q.shape[-1])
    mask = jnp.arange(self.max_len)[None, :] <= (start + jnp.arange(t))[:, None]
    s = jnp.where(mask, s, -1e30)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), self.v[...]).reshape(b, t, -1)
    return self.head(x + self.out(o))


def test_nnx_decoding_with_cache_state():
  model = NnxLM(32, 2, 32, B, nnx.Rngs(0))
  graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)
  _, _, prompt = setup()

  def decode(params, cache, prompt):
    m = nnx.merge(graphdef, params, cache)
    tok = jnp.argmax(m(prompt, 0)[:, -1], -1)
    out = []
    for i in range(4):   # unrolled steps; the cache is NNX state
      out.append(tok)
      tok = jnp.argmax(m(tok[:, None], P + i)[:, -1], -1)
    return jnp.stack(out, 1), nnx.state(m, nnx.Cache)

  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["qkv", "out", "head"],
                                           init_lora_weights=False), key=jax.random.key(3))
  tokens, new_cache = jax.jit(lojax.lorafy(decode))(lora, cache, prompt)
  ref_tokens, _ = jax.jit(decode)(lojax.merge(lora), cache, prompt)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref_tokens))
  assert float(jnp.abs(new_cache["k"][...]).max()) > 0   # the cache was written
  # the first token against the written-out adapted model on the prompt alone
  by_hand = nnx.merge(graphdef, nnx.State(jax.tree.map(jnp.asarray, merged_by_hand(lora))),
                      cache)
  np.testing.assert_array_equal(np.asarray(tokens[:, 0]),
                                np.asarray(jnp.argmax(by_hand(prompt, 0)[:, -1], -1)))


def _decode_step():
  model, params, _ = setup()

  def step(p, cache, tok, pos):
    return model.apply({**p, "cache": cache}, tok, jnp.full(tok.shape, pos), decode=True,
                       mutable=["cache"])
  return step, generate.empty_cache(model, params, B), jnp.zeros((B, 1), jnp.int32)


def test_a_decode_step_writes_no_copy_of_a_kernel():
  """Unmerged, one decode step reads the kernels once and the adapters: no ``[W; s·B]``
  concatenation (the training path's single matmul), no temp beyond the merged step's."""
  model, params, _ = setup()
  lora = wrapped(r=4)
  step, cache, tok = _decode_step()
  merged = jax.jit(step).lower(lojax.merge(lora), cache, tok, 3).compile()
  unmerged = jax.jit(lojax.lorafy(step)).lower(lora, cache, tok, 3).compile()
  adapters = sum(x.nbytes for x in jax.tree.leaves(lora.adapters))
  got, want = (c.cost_analysis()["bytes accessed"] for c in (unmerged, merged))
  assert got <= 1.02 * want + 2 * adapters, (got / want, got, want, adapters)
  assert unmerged.memory_analysis().temp_size_in_bytes <= merged.memory_analysis(
  ).temp_size_in_bytes + adapters
  assert "concatenate(" not in unmerged.as_text()


def test_mixed_adapter_decoding_is_each_adapter_alone():
  """K adapters, one per example, in one decoding loop: each row is that adapter's own."""
  model, params, prompt = setup()
  names = ["a", "b", "c"]
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules="all-linear",
                                           init_lora_weights=False),
                    key=jax.random.key(10), adapter_name="a")
  for i, n in enumerate(names[1:]):
    lora = lojax.wrap(lora, lojax.LoraSpec(r=2 + 2 * i, lora_alpha=4 + i,
                                           target_modules="all-linear", init_lora_weights=False),
                      key=jax.random.key(11 + i), adapter_name=n)
  lora = lojax.set_adapter(lora, names)
  rows = ["a", "c", "b", "__base__"]    # the base model for the last row
  ids = lojax.adapter_ids(lora, rows)
  cache = generate.empty_cache(model, params, B)
  run = jax.jit(lojax.lorafy(greedy_fn()))
  mixed = np.asarray(run(lora, cache, prompt, lora_adapter_ids=ids))
  for i, n in enumerate(rows):
    alone = lojax.disable_adapters(lora) if n == "__base__" else lojax.set_adapter(lora, n)
    want = np.asarray(run(alone, cache, prompt))
    np.testing.assert_array_equal(mixed[i], want[i], err_msg=f"row {i} ({n})")


# --------------------------------------------------------------------------- hotswap ---

def _forward():
  model, _, _ = setup()
  traces = []

  def fwd(p, ids):
    traces.append(1)   # runs once per compilation
    return model.apply(p, ids)
  return jax.jit(lojax.lorafy(fwd)), traces


def test_hotswap_never_recompiles_and_serves_each_adapter_exactly(tmp_path):
  model, params, prompt = setup()
  server = lojax.wrap(params, lojax.LoraSpec(r=8, lora_alpha=8, target_modules="all-linear"),
                      key=jax.random.key(0))
  serve, traces = _forward()
  serve(server, prompt)
  incoming = [wrapped(r=8, alpha=16, key=20), wrapped(r=2, alpha=3, key=21),
              wrapped(r=4, alpha=4, key=22, use_rslora=True),
              wrapped(r=3, alpha=6, key=23, targets=["c_attn"])]   # a subset of the kernels
  lojax.save_peft(tmp_path, wrapped(r=5, alpha=10, key=24), mapping=lojax.PeftMapping())
  incoming.append(lojax.load_peft(tmp_path, params, mapping=lojax.PeftMapping()))
  for new in incoming:
    swapped = lojax.hotswap(server, new)
    got = np.asarray(serve(swapped, prompt))
    want = np.asarray(reference(merged_by_hand(new), prompt))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert len(traces) == 1, f"the server recompiled {len(traces) - 1} times"


def test_hotswap_into_one_adapter_of_a_mixed_server_and_dora():
  model, params, prompt = setup()
  spec = lojax.LoraSpec(r=4, target_modules="all-linear", init_lora_weights=False)
  server = lojax.wrap(params, spec, key=jax.random.key(0), adapter_name="x")
  server = lojax.set_adapter(lojax.wrap(server, spec, key=jax.random.key(1), adapter_name="y"),
                             ["x", "y"])
  ids = lojax.adapter_ids(server, ["x", "y", "x", "y"])
  serve = jax.jit(lojax.lorafy(model.apply))
  new = wrapped(r=2, alpha=5, key=30)
  got = np.asarray(serve(lojax.hotswap(server, new, adapter_name="y"), prompt,
                         lora_adapter_ids=ids))
  want_y = np.asarray(reference(merged_by_hand(new), prompt))
  want_x = np.asarray(serve(lojax.set_adapter(server, "x"), prompt))
  np.testing.assert_allclose(got[1::2], want_y[1::2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[0::2], want_x[0::2], rtol=1e-5, atol=1e-5)
  dora_server = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["c_attn"], use_dora=True),
                           key=jax.random.key(0))
  dora_new = wrapped(r=2, alpha=5, key=31, targets=["c_attn"], use_dora=True)
  np.testing.assert_allclose(np.asarray(serve(lojax.hotswap(dora_server, dora_new), prompt)),
                             np.asarray(serve(dora_new, prompt)), rtol=1e-5, atol=1e-5)


def test_hotswap_refuses_what_the_server_cannot_hold():
  model, params, _ = setup()
  server = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["c_attn"]),
                      key=jax.random.key(0))
  with pytest.raises(ValueError, match="rank 8 is above the server's 4") as e:
    lojax.hotswap(server, wrapped(r=8, targets=["c_attn", "lm_head"]))
  assert "lm_head: adapted by the new adapter, not by the server" in str(e.value)
  with pytest.raises(ValueError, match="is lora, the new one dora"):
    lojax.hotswap(server, wrapped(r=2, targets=["c_attn"], use_dora=True))
  with pytest.raises(ValueError, match="trains the bias"):
    lojax.hotswap(server, wrapped(r=2, targets=["c_attn"], bias="all"))
  with pytest.raises(TypeError, match="`new` must be a lojax.LoraParams"):
    lojax.hotswap(server, server.adapters)


# ----------------------------------------------------------------------- adapter bank ---

def _three_adapters(first_targets="all-linear"):
  """Adapters a (r 4, ``first_targets``), b (r 2), c (r 6, rsLoRA) on the same base."""
  model, params, prompt = setup()
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=first_targets,
                                           init_lora_weights=False),
                    key=jax.random.key(30), adapter_name="a")
  for n, r, kw in (("b", 2, {}), ("c", 6, {"use_rslora": True})):
    lora = lojax.wrap(lora, lojax.LoraSpec(r=r, lora_alpha=3, target_modules="all-linear",
                                           init_lora_weights=False, **kw),
                      key=jax.random.key(31 + r), adapter_name=n)
  return model, params, prompt, lojax.set_adapter(lora, ["a", "b", "c"])


def test_a_bank_decodes_each_example_with_its_own_adapter():
  """Prefill and greedy decoding from a bank: each row is that adapter's alone (ranks padded,
  an adapter that adapts fewer kernels, a row on the base)."""
  model, params, prompt, lora = _three_adapters(first_targets=["c_attn"])
  rows = ["c", "__base__", "a", "b"]
  ids = lojax.adapter_ids(lora, rows)
  bank = lojax.adapter_bank(lora)
  assert {tuple(np.shape(a))[:1] for a, _ in bank.factors.values()} == {(3,)}
  cache = generate.empty_cache(model, params, B)
  run = jax.jit(lojax.lorafy(greedy_fn()))
  banked = np.asarray(run(lora, cache, prompt, lora_adapter_ids=ids, lora_bank=bank))
  for i, n in enumerate(rows):
    alone = lojax.disable_adapters(lora) if n == "__base__" else lojax.set_adapter(lora, n)
    np.testing.assert_array_equal(banked[i], np.asarray(run(alone, cache, prompt))[i],
                                  err_msg=f"row {i} ({n})")
  apply = jax.jit(lojax.lorafy(model.apply))
  for i, n in enumerate(rows):   # the logits, against the adapter merged by hand
    want = reference(params if n == "__base__" else merged_by_hand(lora, n), prompt)
    got = apply(lora, prompt, lora_adapter_ids=ids, lora_bank=bank)
    np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-5)


def test_a_bank_is_not_restacked_per_call_and_swaps_without_recompiling():
  model, params, prompt, lora = _three_adapters()
  ids = lojax.adapter_ids(lora, ["a", "b", "c", "a"])
  bank = lojax.adapter_bank(lora)
  apply = lojax.lorafy(model.apply)
  per_call = jax.jit(lambda l, x: apply(l, x, lora_adapter_ids=ids))
  banked = jax.jit(lambda l, k, x: apply(l, x, lora_adapter_ids=ids, lora_bank=k))
  import re
  stacking = lambda f, *a: len(re.findall(r"\b(?:concatenate|pad)\(", f.lower(*a).compile()
                                          .as_text()))
  # without a bank each call pads and stacks every kernel's factors (16 kernels here); the
  # banked program does neither (the bank gives 1.10x -> 1.08x of one adapter's prefill time
  # at K = 16 on the serving benchmark's shape, CPU)
  assert stacking(per_call, lora, prompt) >= 16
  assert stacking(banked, lora, bank, prompt) == 0
  # a hotswap, then the bank rebuilt: same shapes, the compiled server is reused
  serve, traces = _forward()
  serve_bank = jax.jit(lambda l, k, x: lojax.lorafy(
      lambda p, x: (traces.append(1), model.apply(p, x))[1])(l, x, lora_adapter_ids=ids,
                                                             lora_bank=k))
  serve_bank(lora, bank, prompt)
  new = wrapped(r=2, alpha=5, key=40)
  swapped = lojax.hotswap(lora, new, adapter_name="b")
  got = serve_bank(swapped, lojax.adapter_bank(swapped), prompt)
  np.testing.assert_allclose(got[1], reference(merged_by_hand(new), prompt)[1], rtol=1e-5,
                             atol=1e-5)
  assert len(traces) == 1


def test_a_bank_refuses_what_it_cannot_serve():
  model, params, prompt, lora = _three_adapters()
  bank = lojax.adapter_bank(lora)
  apply = lojax.lorafy(model.apply)
  with pytest.raises(ValueError, match="pass `lora_adapter_ids` too"):
    apply(lora, prompt, lora_bank=bank)
  with pytest.raises(ValueError, match="rebuild it"):
    apply(lojax.set_adapter(lora, ["a", "b"]), prompt,
          lora_adapter_ids=jnp.zeros(B, jnp.int32), lora_bank=bank)
  dora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules="all-linear", use_dora=True),
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match="plain LoRA factors only"):
    lojax.adapter_bank(dora)
  with pytest.raises(TypeError, match="lojax.adapter_bank"):
    apply(lora, prompt, lora_adapter_ids=jnp.zeros(B, jnp.int32), lora_bank={"x": 1})


def test_a_bank_over_a_scanned_stack_with_layer_subsets():
  """Banked factors follow a scan's slicing: adapters on different kernels and layers."""
  import gpt
  model = gpt.GPT(vocab=64, d=32, heads=4, layers=3, max_len=16, scan=True)
  params, ids = gpt.init(model, batch=4, seq=8)
  how = dict(apply_fn=model.apply, example_args=(ids,))
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["c_attn", "c_fc"],
                                           init_lora_weights=False, layers_to_transform=[0, 2]),
                    key=jax.random.key(0), adapter_name="a", **how)
  lora = lojax.wrap(lora, lojax.LoraSpec(r=3, target_modules=["c_attn"], init_lora_weights=False),
                    key=jax.random.key(1), adapter_name="b", **how)
  lora = lojax.set_adapter(lora, ["a", "b"])
  rows = ["b", "a", "__base__", "a"]
  f = jax.jit(lojax.lorafy(model.apply))
  got = np.asarray(f(lora, ids, lora_adapter_ids=lojax.adapter_ids(lora, rows),
                     lora_bank=lojax.adapter_bank(lora)))
  for i, n in enumerate(rows):
    alone = lojax.disable_adapters(lora) if n == "__base__" else lojax.set_adapter(lora, n)
    np.testing.assert_allclose(got[i], np.asarray(f(alone, ids))[i], rtol=1e-6, atol=1e-6)
