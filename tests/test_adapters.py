"""Several named adapters: delete, disable, combine, mixed batches, merge/unmerge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt
import lojax


def np64(x):
  return np.asarray(x, np.float64)


def randomize(lora, name, seed):
  ad = lora.adapters[name]
  leaves, treedef = jax.tree.flatten(ad["lora"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  adapters = dict(lora.adapters, **{name: dict(ad, lora=new)})
  return lojax.LoraParams(lora.base, adapters, lora.meta)


def two_adapters(spec_a=None, spec_b=None):
  params = {"l": {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}}
  spec_a = spec_a or lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["l"])
  spec_b = spec_b or lojax.LoraSpec(r=3, lora_alpha=3, target_modules=["l"])
  lora = lojax.wrap(params, spec_a, key=jax.random.key(1), adapter_name="a")
  lora = lojax.wrap(lora, spec_b, key=jax.random.key(2), adapter_name="b")
  return randomize(randomize(lora, "a", 3), "b", 4)


def dense_delta(lora, name, path="l"):
  t = lora.meta.adapter(name).target(path)
  ad = lora.adapters[name]["lora"][path]
  return t.scaling * np64(ad["lora_A"]) @ np64(ad["lora_B"])


f = lambda p, x: x @ p["l"]["kernel"]
X = jax.random.normal(jax.random.key(9), (4, 6))


def test_delete_disable_and_errors():
  lora = two_adapters()
  assert lora.meta.active == ("a",)
  base = f(lora.base, X)
  np.testing.assert_allclose(lojax.lorafy(f)(lojax.disable_adapters(lora), X), base, rtol=1e-6)
  assert lojax.disable_adapters(lora).trainable == {}
  gone = lojax.delete_adapter(lora, "a")
  assert gone.meta.names == ("b",) and gone.meta.active == () and "a" not in gone.adapters
  assert gone.base is lora.base
  with pytest.raises(ValueError, match=r"No adapter named 'zz'.*\['a', 'b'\]"):
    lojax.delete_adapter(lora, "zz")
  with pytest.raises(ValueError, match=r"Unknown adapter names \['zz'\]"):
    lojax.set_adapter(lora, ["a", "zz"])


@pytest.mark.parametrize("rslora", [False, True])
def test_cat_is_exact_with_true_scalings(rslora):
  lora = two_adapters(lojax.LoraSpec(r=2, lora_alpha=4, use_rslora=rslora, target_modules=["l"]),
                      lojax.LoraSpec(r=3, lora_alpha=3, use_rslora=rslora, target_modules=["l"]))
  s_a = 4 / np.sqrt(2) if rslora else 2.0
  assert lora.meta.adapter("a").target("l").scaling == pytest.approx(s_a)
  new = lojax.add_weighted_adapter(lora, ["a", "b"], [0.7, -1.3], "mix", combination_type="cat")
  assert new.meta.active == ("a",)                      # the new adapter starts inactive
  t = new.meta.adapter("mix").target("l")
  assert (t.r, t.scaling) == (5, 1.0)
  want = 0.7 * dense_delta(lora, "a") - 1.3 * dense_delta(lora, "b")
  np.testing.assert_allclose(dense_delta(new, "mix"), want, rtol=1e-5, atol=1e-6)
  out = lojax.lorafy(f)(lojax.set_adapter(new, "mix"), X)
  np.testing.assert_allclose(out, np64(X) @ (np64(lora.base["l"]["kernel"]) + want), rtol=1e-5,
                             atol=1e-5)


def test_svd_single_adapter_is_exact_and_truncation_is_optimal():
  lora = two_adapters()
  one = lojax.add_weighted_adapter(lora, ["b"], [1.0], "copy", combination_type="svd")
  np.testing.assert_allclose(dense_delta(one, "copy"), dense_delta(lora, "b"), rtol=1e-4,
                             atol=1e-5)
  full = lojax.add_weighted_adapter(lora, ["a", "b"], [1.0, 2.0], "full", combination_type="svd",
                                    svd_rank=5)
  want = dense_delta(lora, "a") + 2.0 * dense_delta(lora, "b")
  np.testing.assert_allclose(dense_delta(full, "full"), want, rtol=1e-4, atol=1e-5)
  low = lojax.add_weighted_adapter(lora, ["a", "b"], [1.0, 2.0], "low", combination_type="svd",
                                   svd_rank=2)
  assert low.adapters["low"]["lora"]["l"]["lora_A"].shape == (6, 2)
  s = np.linalg.svd(want, compute_uv=False)
  err = np.linalg.norm(dense_delta(low, "low") - want)
  np.testing.assert_allclose(err, np.sqrt(np.sum(s[2:] ** 2)), rtol=1e-4)   # Eckart-Young


def test_linear_is_peft_rule_with_cross_terms():
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["l"])
  lora = two_adapters(spec, spec)
  new = lojax.add_weighted_adapter(lora, ["a", "b"], [0.5, 1.5], "lin", combination_type="linear")
  ca, cb = np.sqrt(0.5 * 2.0), np.sqrt(1.5 * 2.0)
  A = ca * np64(lora.adapters["a"]["lora"]["l"]["lora_A"]) + cb * np64(lora.adapters["b"]["lora"]["l"]["lora_A"])
  B = ca * np64(lora.adapters["a"]["lora"]["l"]["lora_B"]) + cb * np64(lora.adapters["b"]["lora"]["l"]["lora_B"])
  np.testing.assert_allclose(dense_delta(new, "lin"), A @ B, rtol=1e-5, atol=1e-6)
  exact = 0.5 * dense_delta(lora, "a") + 1.5 * dense_delta(lora, "b")
  assert np.abs(A @ B - exact).max() > 1e-2                 # cross terms: not the weighted sum
  with pytest.raises(ValueError, match="needs equal ranks"):
    lojax.add_weighted_adapter(two_adapters(), ["a", "b"], [1, 1], "x", combination_type="linear")
  with pytest.raises(ValueError, match="non-negative"):
    lojax.add_weighted_adapter(lora, ["a", "b"], [-1, 1], "x", combination_type="linear")
  with pytest.raises(ValueError, match="already exists"):
    lojax.add_weighted_adapter(lora, ["a"], [1], "b")
  with pytest.raises(ValueError, match="one weight per adapter"):
    lojax.add_weighted_adapter(lora, ["a", "b"], [1], "x")


def test_combining_stacked_adapters_with_different_layers():
  m = gpt.GPT(scan=True, layers=3)
  params, ids = gpt.init(m)
  kw = dict(key=jax.random.key(0), apply_fn=m.apply, example_args=(ids,))
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["c_fc"], layers_to_transform=[0],
                                           init_lora_weights=False), adapter_name="a", **kw)
  lora = lojax.wrap(lora, lojax.LoraSpec(r=2, target_modules=["c_fc"], layers_to_transform=[1, 2],
                                         init_lora_weights=False), adapter_name="b", **kw)
  new = lojax.add_weighted_adapter(lora, ["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
  both = lojax.merge(lojax.set_adapter(lora, ["a", "b"]))
  np.testing.assert_allclose(lojax.merge(lojax.set_adapter(new, "ab"))["params"]["h"]["mlp"]["c_fc"]["kernel"],
                             both["params"]["h"]["mlp"]["c_fc"]["kernel"], rtol=1e-5, atol=1e-6)


def test_mixed_batch_equals_each_example_alone():
  m = gpt.GPT(scan=True, layers=2)
  params, ids = gpt.init(m, batch=5)
  kw = dict(apply_fn=m.apply, example_args=(ids,))
  spec = lojax.LoraSpec(r=2, target_modules="all-linear", init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), adapter_name="a", **kw)
  for i, n in enumerate("bcd"):   # "d": another rank, and rsLoRA scaling
    sp = spec if n != "d" else lojax.LoraSpec(r=3, use_rslora=True, target_modules="all-linear",
                                              init_lora_weights=False)
    lora = lojax.wrap(lora, sp, key=jax.random.key(i + 1), adapter_name=n, **kw)
  lora = lojax.set_adapter(lora, ["a", "b", "c", "d"])
  names = ["c", "__base__", "a", "d", "c"]
  sel = lojax.adapter_ids(lora, names)
  apply = jax.jit(lojax.lorafy(m.apply))
  out = apply(lora, ids, lora_adapter_ids=sel)
  for i, n in enumerate(names):
    alone = jax.jit(m.apply)(params, ids[i:i + 1]) if n == "__base__" else \
        apply(lojax.set_adapter(lora, n), ids[i:i + 1])
    np.testing.assert_allclose(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"Adapters \['zz'\] are not active"):
    lojax.adapter_ids(lora, ["a", "zz"])
  # Gradients: the mixed batch's equal the sum of each example's own, adapter by adapter.
  mixed = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(lojax.lorafy(m.apply)(
      lora.with_trainable(t), ids, lora_adapter_ids=sel)))))(lora.trainable)
  for n in "acd":
    single = lojax.set_adapter(lora, n)
    rows = [i for i, name in enumerate(names) if name == n]
    g = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(lojax.lorafy(m.apply)(
        single.with_trainable(t), ids[np.array(rows)])))))(single.trainable)[n]
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(mixed[n]), jax.tree.leaves(g)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * float(jnp.abs(want).max()),
                                 err_msg=jax.tree_util.keystr(path))  # float32 sums of ~30
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(mixed["b"]))  # unused


def test_mixed_batch_costs_one_adapter_pass():
  params = {"l": {"kernel": jnp.ones((64, 64))}}
  spec = lojax.LoraSpec(r=4, target_modules=["l"])
  lora = lojax.wrap(params, spec, key=jax.random.key(0), adapter_name="a0")
  for k in range(1, 4):
    lora = lojax.wrap(lora, spec, key=jax.random.key(k), adapter_name=f"a{k}")
  x = jnp.ones((32, 64))

  def flops(lo, ids):
    fn = jax.jit(lambda lo, x, ids: lojax.lorafy(f)(lo, x, lora_adapter_ids=ids))
    cost = fn.lower(lo, x, ids).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  base = 2 * 32 * 64 * 64
  one = flops(lojax.set_adapter(lora, "a0"), jnp.zeros(32, jnp.int32)) - base
  four = flops(lojax.set_adapter(lora, ["a0", "a1", "a2", "a3"]), jnp.arange(32, dtype=jnp.int32) % 4) - base
  # Each example gathers its own adapter's factors: 4 adapters cost one adapter's pass.
  assert 0.9 * one <= four <= 1.1 * one, (one, four)


def test_merge_several_and_unmerge_in_reverse_order():
  lora = lojax.set_adapter(two_adapters(), ["a", "b"])
  merged = lojax.merge(lora)
  want = np64(lora.base["l"]["kernel"]) + dense_delta(lora, "a") + dense_delta(lora, "b")
  np.testing.assert_allclose(merged["l"]["kernel"], want, rtol=1e-5, atol=1e-6)
  step = lojax.unmerge(lora, merged, adapter_names=["b"])
  np.testing.assert_allclose(step["l"]["kernel"], np64(lora.base["l"]["kernel"]) + dense_delta(lora, "a"),
                             rtol=1e-5, atol=1e-6)
  back = lojax.unmerge(lora, step, adapter_names=["a"])
  np.testing.assert_allclose(back["l"]["kernel"], lora.base["l"]["kernel"], rtol=1e-5, atol=1e-6)


def test_mixed_batch_with_dropout_runs_each_adapter_masked():
  """With dropout each adapter runs over the whole batch with the other examples masked out;
  each row still gets its own adapter's model, written out here in float64 NumPy."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  f = lambda p, x: jnp.tanh(x @ p["l"]["kernel"])
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["l"], init_lora_weights=False,
                        lora_dropout=0.5)
  lora = lojax.wrap({"l": {"kernel": jnp.asarray(w)}}, spec, key=jax.random.key(0),
                    adapter_name="a")
  lora = lojax.set_adapter(lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="b"),
                           ["a", "b"])
  names = ["b", "__base__", "a", "b"]
  ids = lojax.adapter_ids(lora, names)
  assert ids.tolist() == [1, -1, 0, 1]  # "__base__" is -1: raw ids work the same
  out = lojax.lorafy(f)(lora, jnp.asarray(x), lora_adapter_ids=ids, lora_deterministic=True)
  for i, n in enumerate(names):
    k = w.astype(np.float64)
    if n != "__base__":
      fac = lora.adapters[n]["lora"]["l"]
      k = k + 2.0 * np.asarray(fac["lora_A"], np.float64) @ np.asarray(fac["lora_B"], np.float64)
    np.testing.assert_allclose(out[i], np.tanh(x[i] @ k), rtol=1e-5, atol=1e-5)
  # Training mode: a base example stays the base model, whatever the masks.
  train = lojax.lorafy(f)(lora, jnp.asarray(x), lora_adapter_ids=ids, lora_rng=jax.random.key(2))
  np.testing.assert_allclose(train[1], np.tanh(x[1] @ w.astype(np.float64)), rtol=1e-6,
                             atol=1e-6)
  assert not np.allclose(train[0], out[0], atol=1e-4)  # the masks did act on adapted rows


def test_mixed_batch_refuses_a_merged_kernel_use():
  """A use lojax cannot factorize gets one merged kernel for the whole batch: refused."""
  f = lambda p, x: x @ p["l"]["kernel"] + jnp.sum(p["l"]["kernel"] ** 2)
  spec = lojax.LoraSpec(r=2, target_modules=["l"], init_lora_weights=False)
  lora = lojax.wrap({"l": {"kernel": jnp.ones((6, 5))}}, spec, key=jax.random.key(0),
                    adapter_name="a")
  lora = lojax.set_adapter(lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="b"),
                           ["a", "b"])
  with pytest.raises(ValueError, match=r"'l/kernel' is used by `integer_pow`.*mixed-adapter"):
    lojax.lorafy(f)(lora, jnp.ones((2, 6)), lora_adapter_ids=lojax.adapter_ids(lora, ["a", "b"]))


def test_lora_only_bias_of_a_scanned_stack_trains_the_adapted_layers_only():
  """bias="lora_only" with layers_to_transform on a scanned stack: the bias delta covers the
  adapted layers ([1, d] here), as PEFT trains only the wrapped modules' biases; apply, merge
  and add_weighted_adapter put it in its layer."""
  import gpt
  model = gpt.GPT(vocab=32, d=16, heads=2, layers=3, max_len=8, scan=True)
  params, ids = gpt.init(model)
  spec = lojax.LoraSpec(r=2, target_modules=["c_attn"], bias="lora_only",
                        layers_to_transform=[1], layers_pattern="h", init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                    example_args=(ids,))
  path = "params/h/attn/c_attn/bias"
  delta = lora.trainable["default"]["bias"][path]
  assert delta.shape == (1, 3 * 16)
  lora = lora.with_trainable({"default": dict(lora.trainable["default"],
                                              bias={path: delta + 0.5})})
  merged = lojax.merge(lora)
  base = np.asarray(params["params"]["h"]["attn"]["c_attn"]["bias"])
  got = np.asarray(merged["params"]["h"]["attn"]["c_attn"]["bias"])
  np.testing.assert_allclose(got[[0, 2]], base[[0, 2]])
  np.testing.assert_allclose(got[1], base[1] + 0.5)
  np.testing.assert_allclose(lojax.lorafy(model.apply)(lora, ids), model.apply(merged, ids),
                             rtol=1e-5, atol=1e-5)
  combined = lojax.add_weighted_adapter(lora, ["default"], [1.0], "twice",
                                        combination_type="cat")
  got = np.asarray(combined.adapters["twice"]["bias"][path])
  assert got.shape == base.shape and not got[[0, 2]].any() and np.allclose(got[1], 0.5)
