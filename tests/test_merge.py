"""Tests for lojax.merge / lojax.unmerge (lojax._src.merge).

References are written out independently: merged kernels in NumPy float64,
outputs of the factorized forward against the plain model run on merged params.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt
import lojax

RTOL, ATOL = 1e-5, 1e-5       # float32 merged-vs-factorized outputs
K_RTOL, K_ATOL = 1e-6, 1e-6   # merged kernels vs float64 NumPy


def _params(model, seed=0, batch=2, seq=8):
  """Random params with the model's structure (eval_shape: no compile)."""
  ids = jax.random.randint(jax.random.key(seed + 1), (batch, seq), 0, model.vocab)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), ids)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape).astype(np.float32)), shapes)
  return params, ids


def _randomize(tree, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.normal(0.0, scale, np.shape(x)).astype(np.float32)), tree)


def _leaf(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def _all_leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def untied():
  model = gpt.GPT(vocab=32, d=16, heads=2, layers=2, max_len=8)
  params, ids = _params(model)
  return model, params, ids


@pytest.fixture(scope="module")
def apply_jit(untied):
  return jax.jit(untied[0].apply)


# ---------------------------------------------------------------------------
# Factorized forward == plain model on merged params
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_jit", [False, True])
def test_lorafy_matches_merged_all_linear(untied, apply_jit, use_jit):
  model, params, ids = untied
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  f = lojax.lorafy(model.apply)
  out = (jax.jit(f) if use_jit else f)(lora, ids)
  ref = apply_jit(lojax.merge(lora), ids)
  base = apply_jit(params, ids)
  # The adapters do change the output (the test is not vacuous) ...
  assert np.max(np.abs(np.asarray(ref) - np.asarray(base))) > 1e-2
  # ... and the factorized forward equals the merged model.
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL)


def test_lorafy_matches_merged_with_bias_and_modules_to_save(untied, apply_jit):
  model, params, ids = untied
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules="all-linear", bias="all",
                        modules_to_save=["lm_head"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  tr = lora.trainable
  ad = dict(tr["default"])
  ad["bias"] = _randomize(ad["bias"], seed=5)
  ad["modules_to_save"] = {p: x + _randomize(x, seed=6) for p, x in ad["modules_to_save"].items()}
  assert set(ad["modules_to_save"]) == {"params/lm_head/kernel"}
  lora = lora.with_trainable({"default": ad})
  merged = lojax.merge(lora)

  # merged biases are base + delta, the saved module is the modified copy.
  for p, d in ad["bias"].items():
    np.testing.assert_allclose(_leaf(merged, p), _f64(_leaf(params, p)) + _f64(d),
                               rtol=K_RTOL, atol=K_ATOL)
  np.testing.assert_array_equal(_leaf(merged, "params/lm_head/kernel"),
                                ad["modules_to_save"]["params/lm_head/kernel"])

  f = lojax.lorafy(model.apply)
  ref = apply_jit(merged, ids)
  for out in (f(lora, ids), jax.jit(f)(lora, ids)):
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL)
  # The base stays untouched by with_trainable / merge.
  np.testing.assert_array_equal(_leaf(lora.base, "params/lm_head/kernel"),
                                _leaf(params, "params/lm_head/kernel"))


# ---------------------------------------------------------------------------
# Merged kernels against W + s*A@B in float64
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_dense_kernel_float64(untied, use_rslora):
  _, params, _ = untied
  r, alpha = 4, 6
  spec = lojax.LoraSpec(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["c_fc"],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(2))
  s = alpha / np.sqrt(r) if use_rslora else alpha / r   # 3.0 vs 1.5
  merged = lojax.merge(lora)
  targets = {t.path for t in lora.meta.adapters[0].targets}
  assert targets == {"params/h_0/mlp/c_fc", "params/h_1/mlp/c_fc"}
  for path in targets:
    fac = lora.adapters["default"]["lora"][path]
    a, b = _f64(fac["lora_A"]), _f64(fac["lora_B"])
    assert a.shape == (16, r) and b.shape == (r, 64)
    assert np.abs(b).max() > 0
    w = _f64(_leaf(params, path + "/kernel"))
    np.testing.assert_allclose(_leaf(merged, path + "/kernel"), w + s * a @ b,
                               rtol=K_RTOL, atol=K_ATOL)
  # Leaves that are not targets are passed through unchanged.
  for p in ("params/h_0/attn/c_attn/kernel", "params/h_0/mlp/c_fc/bias", "params/wte/embedding"):
    np.testing.assert_array_equal(_leaf(merged, p), _leaf(params, p))


def test_merged_dense_general_output_kernel_float64():
  model = gpt.GPT(vocab=32, d=16, heads=2, layers=1, max_len=8, general=True)
  params, ids = _params(model, seed=3)
  spec = lojax.LoraSpec(r=3, lora_alpha=5, target_modules=["out", "query"],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(3), apply_fn=model.apply,
                    example_args=(ids,))
  targets = {t.path: t for t in lora.meta.adapters[0].targets}
  out_t = targets["params/h_0/attn/out"]
  q_t = targets["params/h_0/attn/query"]
  assert out_t.shape == (2, 8, 16) and out_t.in_axes == (0, 1)
  assert q_t.shape == (16, 2, 8) and q_t.in_axes == (0,)
  s = 5 / 3
  merged = lojax.merge(lora)

  fac = lora.adapters["default"]["lora"]["params/h_0/attn/out"]
  a, b = _f64(fac["lora_A"]), _f64(fac["lora_B"])
  assert a.shape == (2, 8, 3) and b.shape == (3, 16)
  w = _f64(_leaf(params, "params/h_0/attn/out/kernel"))
  np.testing.assert_allclose(_leaf(merged, "params/h_0/attn/out/kernel"),
                             w + s * np.einsum("hdr,re->hde", a, b), rtol=K_RTOL, atol=K_ATOL)

  fac = lora.adapters["default"]["lora"]["params/h_0/attn/query"]
  a, b = _f64(fac["lora_A"]), _f64(fac["lora_B"])
  assert a.shape == (16, 3) and b.shape == (3, 2, 8)
  w = _f64(_leaf(params, "params/h_0/attn/query/kernel"))
  np.testing.assert_allclose(_leaf(merged, "params/h_0/attn/query/kernel"),
                             w + s * np.einsum("er,rhd->ehd", a, b), rtol=K_RTOL, atol=K_ATOL)

  f = lojax.lorafy(model.apply)
  ref = jax.jit(model.apply)(merged, ids)
  assert np.abs(np.asarray(ref) - np.asarray(jax.jit(model.apply)(params, ids))).max() > 1e-2
  for out in (jax.jit(f)(lora, ids),):  # eager lorafy is covered by the all-linear test
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL)


def test_merged_scan_kernel_selected_layer_float64():
  model = gpt.GPT(vocab=32, d=16, heads=2, layers=2, max_len=8, scan=True)
  params, ids = _params(model, seed=4)
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["c_fc"], layers_to_transform=[1],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(4), apply_fn=model.apply,
                    example_args=(ids,))
  (t,) = lora.meta.adapters[0].targets
  assert t.path == "params/h/mlp/c_fc" and t.stacked == 2 and t.layers == (1,)
  fac = lora.adapters["default"]["lora"][t.path]
  a, b = _f64(fac["lora_A"]), _f64(fac["lora_B"])
  assert a.shape == (1, 16, 2) and b.shape == (1, 2, 64)
  w = _f64(_leaf(params, t.path + "/kernel"))
  merged = np.asarray(_leaf(lojax.merge(lora), t.path + "/kernel"))
  np.testing.assert_array_equal(merged[0], np.asarray(_leaf(params, t.path + "/kernel"))[0])
  np.testing.assert_allclose(merged[1], w[1] + 2.0 * a[0] @ b[0], rtol=K_RTOL, atol=K_ATOL)
  assert np.abs(merged[1] - w[1]).max() > 1e-3

  f = lojax.lorafy(model.apply)
  ref = jax.jit(model.apply)(lojax.merge(lora), ids)
  for out in (jax.jit(f)(lora, ids),):
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL)


def test_merged_embedding_table_float64(untied, apply_jit):
  model, params, ids = untied
  spec = lojax.LoraSpec(r=4, lora_alpha=2, target_modules=["wte"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(5))
  (t,) = lora.meta.adapters[0].targets
  assert t.path == "params/wte" and t.leaf == "embedding" and t.kind == "embed"
  fac = lora.adapters["default"]["lora"]["params/wte"]
  a, b = _f64(fac["lora_A"]), _f64(fac["lora_B"])
  assert a.shape == (32, 4) and b.shape == (4, 16)
  e = _f64(_leaf(params, "params/wte/embedding"))
  merged = lojax.merge(lora)
  np.testing.assert_allclose(_leaf(merged, "params/wte/embedding"), e + 0.5 * a @ b,
                             rtol=K_RTOL, atol=K_ATOL)
  f = lojax.lorafy(model.apply)
  ref = apply_jit(merged, ids)
  for out in (jax.jit(f)(lora, ids),):
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL)


# ---------------------------------------------------------------------------
# unmerge
# ---------------------------------------------------------------------------

def test_unmerge_restores_base(untied):
  _, params, _ = untied
  spec = lojax.LoraSpec(r=4, lora_alpha=16, target_modules="all-linear", bias="all",
                        modules_to_save=["lm_head"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(6))
  ad = dict(lora.trainable["default"])
  ad["bias"] = _randomize(ad["bias"], seed=7)
  ad["modules_to_save"] = _randomize(ad["modules_to_save"], seed=8)
  lora = lora.with_trainable({"default": ad})
  merged = lojax.merge(lora)
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  changed = [p for p, x, y in zip(paths, jax.tree.leaves(merged), jax.tree.leaves(params))
             if not np.allclose(x, y, atol=1e-4)]
  # Every kernel of all-linear, every bias and lm_head were changed by merge ...
  assert len(changed) == 8 + 13 + 1, changed
  restored = lojax.unmerge(lora, merged)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  # ... and unmerge takes all of it out again.
  for p, x, y in zip(paths, jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=p)
  np.testing.assert_array_equal(_leaf(restored, "params/lm_head/kernel"),
                                _leaf(params, "params/lm_head/kernel"))


def test_unmerge_subset_by_adapter_names(untied):
  _, params, _ = untied
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(7))
  lora = lojax.wrap(lora, spec, key=jax.random.key(8), adapter_name="b")
  both = lojax.merge(lora, adapter_names=["default", "b"])
  only_default = lojax.merge(lora, adapter_names="default")
  assert not _all_leaves_equal(both, only_default)
  partial = lojax.unmerge(lora, both, adapter_names=["b"])
  for x, y in zip(jax.tree.leaves(partial), jax.tree.leaves(only_default)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  # Reference in float64 for one kernel: W + s*A1@B1 (s = 2).
  p = "params/h_1/attn/c_attn"
  f1 = lora.adapters["default"]["lora"][p]
  np.testing.assert_allclose(_leaf(partial, p + "/kernel"),
                             _f64(_leaf(params, p + "/kernel"))
                             + 2.0 * _f64(f1["lora_A"]) @ _f64(f1["lora_B"]),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# safe_merge and bad names
# ---------------------------------------------------------------------------

def _dense_lora(bad=None, where="lora_B"):
  params = {"enc": {"dense": {"kernel": jnp.asarray(np.random.default_rng(0).normal(
      size=(6, 5)).astype(np.float32)), "bias": jnp.zeros(5)}},
            "dec": {"kernel": jnp.ones((5, 3))}}
  spec = lojax.LoraSpec(r=2, target_modules=["dense", "dec"], init_lora_weights=False)  # s = 8/2
  lora = lojax.wrap(params, spec, key=jax.random.key(9))
  if bad is not None:
    ad = jax.tree.map(lambda x: x, lora.trainable)
    fac = dict(ad["default"]["lora"]["enc/dense"])
    fac[where] = fac[where].at[1, 0].set(bad)
    ad["default"]["lora"]["enc/dense"] = fac
    lora = lora.with_trainable(ad)
  return lora


@pytest.mark.parametrize("bad,where", [(np.nan, "lora_A"), (np.inf, "lora_B"),
                                       (-np.inf, "lora_A")])
def test_safe_merge_raises_on_non_finite(bad, where):
  lora = _dense_lora(bad, where)
  with pytest.raises(ValueError, match=r"non-finite.*enc/dense/kernel") as e:
    lojax.merge(lora, safe_merge=True)
  assert "dec/kernel" not in str(e.value)  # only the broken leaf is named
  # Without safe_merge the NaN/inf silently reaches the merged kernel.
  assert not np.all(np.isfinite(lojax.merge(lora)["enc"]["dense"]["kernel"]))


def test_safe_merge_under_jit_needs_concrete_arrays():
  lora = _dense_lora()
  with pytest.raises(ValueError, match=r"needs concrete arrays.*outside jax.jit"):
    jax.jit(lambda l: lojax.merge(l, safe_merge=True))(lora)


def test_safe_merge_on_finite_adapters_equals_merge():
  lora = _dense_lora()
  safe = lojax.merge(lora, safe_merge=True)
  plain = lojax.merge(lora)
  assert _all_leaves_equal(safe, plain)
  f = lora.adapters["default"]["lora"]["enc/dense"]
  np.testing.assert_allclose(
      safe["enc"]["dense"]["kernel"],
      _f64(lora.base["enc"]["dense"]["kernel"]) + 4.0 * _f64(f["lora_A"]) @ _f64(f["lora_B"]),
      rtol=K_RTOL, atol=K_ATOL)


def test_merge_unknown_adapter_name_raises():
  lora = _dense_lora()
  with pytest.raises(ValueError, match=r"No adapter named 'nope'.*\['default'\]"):
    lojax.merge(lora, adapter_names="nope")
  with pytest.raises(ValueError, match=r"No adapter named 'nope'"):
    lojax.merge(lora, adapter_names=["default", "nope"])
  with pytest.raises(ValueError, match=r"No adapter named 'nope'"):
    lojax.unmerge(lora, lojax.merge(lora), adapter_names="nope")


def test_safe_merge_names_a_non_finite_bias_delta():
  params = {"a": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["a"], bias="all",
                                           init_lora_weights=False), key=jax.random.key(0))
  tr = jax.tree.map(lambda x: x, lora.trainable)
  tr["default"]["bias"]["a/bias"] = jnp.array([0.0, np.nan, 0.0])
  with pytest.raises(ValueError, match=r"non-finite.* in a/bias;"):
    lojax.merge(lora.with_trainable(tr), safe_merge=True)


def test_merge_two_adapters_saving_the_same_module_raises():
  params = {"a": {"kernel": jnp.ones((4, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
  fn = lambda p, x: x @ p["a"]["kernel"] @ p["head"]["kernel"]
  spec = lojax.LoraSpec(r=2, target_modules=["a"], modules_to_save=["head"])
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  lora = lojax.set_adapter(lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="b"),
                           ["default", "b"])
  with pytest.raises(ValueError, match=r"both hold a trained copy of 'head/kernel'"):
    lojax.lorafy(fn)(lora, jnp.ones((1, 4)))
  with pytest.raises(ValueError, match=r"head/kernel"):
    lojax.merge(lora)


def test_an_eager_merge_compiles_one_program_per_kernel_layout(caplog):
  """lojax.merge / unmerge and lojax.dequantize called outside jit compile one program per
  variant and kernel layout, which the layers share, not one per op (op by op, this 6-layer
  model's DoRA merge compiled 72 programs and decoding its NF4 kernels 64); the values are
  the op-by-op ones."""
  import logging
  m = gpt.GPT(vocab=89, d=60, heads=4, layers=6, max_len=12)   # shapes of this test alone
  params, _ = gpt.init(m, batch=1, seq=12)

  def programs(call):
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
      out = call()
    return out, [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]

  layouts = 4   # c_attn, attn c_proj, c_fc, mlp c_proj
  for kw in ({}, {"use_dora": True}):
    lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules="all-linear",
                                             init_lora_weights=False, **kw), key=jax.random.key(0))
    merged, compiled = programs(lambda: lojax.merge(lora))
    assert len(compiled) <= layouts, compiled
    base, compiled = programs(lambda: lojax.unmerge(lora, merged))
    assert len(compiled) <= layouts, compiled
    with jax.disable_jit():
      by_op = lojax.merge(lora)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(by_op)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  q = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules="all-linear"), key=jax.random.key(0),
                 quantize="nf4")
  is_q = lambda x: isinstance(x, lojax.QuantizedArray)  # noqa: E731
  decoded, compiled = programs(lambda: jax.tree.map(lojax.dequantize, q.base, is_leaf=is_q))
  assert len(compiled) <= layouts, compiled
  with jax.disable_jit():
    by_op = jax.tree.map(lojax.dequantize, q.base, is_leaf=is_q)
  for a, b in zip(jax.tree.leaves(decoded), jax.tree.leaves(by_op)):
    np.testing.assert_array_equal(a, b)
