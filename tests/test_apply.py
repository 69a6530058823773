"""The factorized apply against dense float64 NumPy references."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt
import lojax

TOL = dict(rtol=2e-5, atol=2e-5)


def np64(x):
  return np.asarray(x, np.float64)


def random_adapters(lora, seed=0):
  """Gives every adapter factor random values (so no delta is zero)."""
  leaves, treedef = jax.tree.flatten(lora.trainable)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return lora.with_trainable(jax.tree.unflatten(treedef, new))


def both(f, *args, **kw):
  """f(*args) eagerly and under jit."""
  return [f(*args, **kw), jax.jit(f)(*args, **kw)]


def factors(lora, path, name="default"):
  ad = lora.adapters[name]["lora"][path]
  return np64(ad["lora_A"]), np64(ad["lora_B"])


def test_dense_plain_function():
  k = jax.random.split(jax.random.key(0), 3)
  params = {"layer": {"kernel": jax.random.normal(k[0], (6, 5)), "bias": jax.random.normal(k[1], (5,))}}
  x = jax.random.normal(k[2], (3, 6))
  f = lambda p, x: x @ p["layer"]["kernel"] + p["layer"]["bias"]
  spec = lojax.LoraSpec(r=2, lora_alpha=6, target_modules=["layer"])
  lora = random_adapters(lojax.wrap(params, spec, key=jax.random.key(1)))
  a, b = factors(lora, "layer")
  ref = np64(x) @ (np64(params["layer"]["kernel"]) + 3.0 * a @ b) + np64(params["layer"]["bias"])
  for out in both(lojax.lorafy(f), lora, x):
    np.testing.assert_allclose(out, ref, **TOL)


def test_rslora_scaling():
  params = {"l": {"kernel": jnp.ones((4, 4))}}
  x = jnp.eye(4)
  f = lambda p, x: x @ p["l"]["kernel"]
  for rs, s in ((False, 8 / 4), (True, 8 / 2)):
    spec = lojax.LoraSpec(r=4, lora_alpha=8, use_rslora=rs, target_modules=["l"])
    lora = random_adapters(lojax.wrap(params, spec, key=jax.random.key(0)))
    a, b = factors(lora, "l")
    np.testing.assert_allclose(lojax.lorafy(f)(lora, x), 1.0 + s * a @ b, **TOL)


def test_transposed_use_and_reshape():
  """A kernel used as x @ W.T and through a reshape stays factorized and exact."""
  w = jax.random.normal(jax.random.key(0), (4, 6))
  x = jax.random.normal(jax.random.key(1), (3, 6))

  def f(p, x):
    w = p["m"]["kernel"]
    y = x @ w.T                                    # contracts the output axis
    q = w.reshape(2, 2, 3, 2)                      # splits both sides
    z = jnp.einsum("nab,abcd->ncd", y.reshape(3, 2, 2), q)
    return y, z

  spec = lojax.LoraSpec(r=2, target_modules=["m"])
  lora = random_adapters(lojax.wrap({"m": {"kernel": w}}, spec, key=jax.random.key(2)))
  a, b = factors(lora, "m")
  wm = np64(w) + (8 / 2) * a @ b
  y = np64(x) @ wm.T
  z = np.einsum("nab,abcd->ncd", y.reshape(3, 2, 2), wm.reshape(2, 2, 3, 2))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no merged fallback
    for out in both(lojax.lorafy(f), lora, x):
      np.testing.assert_allclose(out[0], y, **TOL)
      np.testing.assert_allclose(out[1], z, **TOL)


def test_dense_general_axes_are_traced():
  m = gpt.GPT(general=True)
  params, ids = gpt.init(m)
  spec = lojax.LoraSpec(r=3, target_modules=["query", "out"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=m.apply, example_args=(ids,))
  t = {t.path.split("/")[-1]: t for t in lora.meta.adapters[0].targets}
  assert t["query"].in_axes == (0,) and t["query"].kernel_shape == (32, 4, 8)
  assert t["out"].in_axes == (0, 1) and t["out"].kernel_shape == (4, 8, 32)
  assert lora.adapters["default"]["lora"]["params/h_0/attn/out"]["lora_A"].shape == (4, 8, 3)
  assert lora.adapters["default"]["lora"]["params/h_0/attn/out"]["lora_B"].shape == (3, 32)
  # Reference: the plain model with kernels W + s * A@B written out in NumPy.
  merged = jax.tree.map(np64, params)
  for path in ("h_0/attn/query", "h_1/attn/query", "h_0/attn/out", "h_1/attn/out"):
    a, b = factors(lora, "params/" + path)
    node = merged["params"]
    for c in path.split("/"):
      node = node[c]
    node["kernel"] = node["kernel"] + (8 / 3) * np.tensordot(a, b, axes=([a.ndim - 1], [0])).reshape(
        node["kernel"].shape)
  with jax.enable_x64(True):
    ref = m.apply(jax.tree.map(jnp.asarray, merged), ids)
  for out in both(lojax.lorafy(m.apply), lora, ids):
    np.testing.assert_allclose(out, ref, **TOL)


def test_dense_general_needs_trace_or_axes():
  m = gpt.GPT(general=True)
  params, ids = gpt.init(m)
  with pytest.raises(ValueError, match=r"(?s)params/h_0/attn/query \(shape \(32, 4, 8\)\).*apply_fn=model.apply"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["query"]), key=jax.random.key(0))
  spec = lojax.LoraSpec(target_modules=["query", "out"], kernel_axes={"query": (0,), "out": (0, 1)})
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  traced = lojax.wrap(params, lojax.LoraSpec(target_modules=["query", "out"]), key=jax.random.key(0),
                      apply_fn=m.apply, example_args=(ids,))
  assert ([t.in_axes for t in lora.meta.adapters[0].targets]
          == [t.in_axes for t in traced.meta.adapters[0].targets])


def test_conv_any_window():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  for window, strides in (((3, 3), 1), ((5, 2), 2), ((1, 1), 1)):
    model = nn.Conv(4, window, strides=strides, padding="SAME")
    params = model.init(jax.random.key(1), x)
    spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["params"])
    lora = random_adapters(lojax.wrap(params, spec, key=jax.random.key(2), apply_fn=model.apply,
                                      example_args=(x,)))
    t = lora.meta.adapters[0].targets[0]
    assert t.kind == "conv" and t.in_axes == (0, 1, 2)
    a, b = factors(lora, "params")
    kernel = np64(params["params"]["kernel"]) + 2.0 * np.einsum("hwir,ro->hwio", a, b)
    with jax.enable_x64(True):
      ref = model.apply({"params": {"kernel": jnp.asarray(kernel),
                                    "bias": jnp.asarray(np64(params["params"]["bias"]))}}, np64(x))
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # factorized: no merged-kernel fallback warning
      for out in both(lojax.lorafy(model.apply), lora, x):
        np.testing.assert_allclose(out, ref, **TOL)


def test_embedding_lookup_and_attend():
  m = gpt.GPT(tied=True)
  params, ids = gpt.init(m)
  spec = lojax.LoraSpec(r=2, target_modules=["wte"])
  lora = random_adapters(lojax.wrap(params, spec, key=jax.random.key(0)))
  t = lora.meta.adapters[0].targets[0]
  assert t.kind == "embed" and lora.adapters["default"]["lora"]["params/wte"]["lora_A"].shape == (64, 2)
  a, b = factors(lora, "params/wte")
  table = np64(params["params"]["wte"]["embedding"]) + 4.0 * a @ b
  # Lookup: E[ids] + s * A[ids] @ B, written out.
  embed = nn.Embed(64, 32)
  out = lojax.lorafy(lambda p, i: embed.apply({"params": p["params"]["wte"]}, i))(lora, ids)
  np.testing.assert_allclose(out, table[np64(ids).astype(int)], **TOL)
  # The full tied model (lookup and logits via attend).
  merged = jax.tree.map(np64, params)
  merged["params"]["wte"]["embedding"] = table
  with jax.enable_x64(True):
    ref = m.apply(jax.tree.map(jnp.asarray, merged), ids)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for out in both(lojax.lorafy(m.apply), lora, ids):
      np.testing.assert_allclose(out, ref, **TOL)


def test_embedding_init_is_peft_like():
  m = gpt.GPT()
  params, _ = gpt.init(m)
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["wte", "c_fc"]), key=jax.random.key(0))
  emb = lora.adapters["default"]["lora"]["params/wte"]
  assert not np.any(emb["lora_A"]) and np.std(emb["lora_B"]) > 0.5        # A = 0, B ~ N(0, 1)
  fc = lora.adapters["default"]["lora"]["params/h_0/mlp/c_fc"]
  assert not np.any(fc["lora_B"]) and np.max(np.abs(fc["lora_A"])) <= 1 / np.sqrt(32)  # kaiming-uniform


def test_scan_stacked_layers_to_transform():
  m = gpt.GPT(scan=True, layers=3)
  params, ids = gpt.init(m)
  spec = lojax.LoraSpec(r=2, target_modules=["c_fc"], layers_to_transform=[0, 2])
  lora = random_adapters(lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=m.apply,
                                    example_args=(ids,)))
  (t,) = lora.meta.adapters[0].targets
  assert t.stacked == 3 and t.layers == (0, 2)
  a, b = factors(lora, "params/h/mlp/c_fc")
  assert a.shape == (2, 32, 2) and b.shape == (2, 2, 128)
  merged = jax.tree.map(np64, params)
  k = merged["params"]["h"]["mlp"]["c_fc"]["kernel"]
  for j, layer in enumerate((0, 2)):
    k[layer] += (8 / 2) * a[j] @ b[j]
  with jax.enable_x64(True):
    ref = m.apply(jax.tree.map(jnp.asarray, merged), ids)
  for out in both(lojax.lorafy(m.apply), lora, ids):
    np.testing.assert_allclose(out, ref, **TOL)


def test_remat_cond_while_inside():
  w = jax.random.normal(jax.random.key(0), (4, 4))
  x = jax.random.normal(jax.random.key(1), (2, 4))

  def f(p, x, flag):
    k = p["l"]["kernel"]
    y = jax.checkpoint(lambda v: v @ k)(x)
    y = jax.lax.cond(flag, lambda v: v @ k, lambda v: v - 1.0, y)
    return jax.lax.fori_loop(0, 2, lambda i, v: jnp.tanh(v @ k), y)

  spec = lojax.LoraSpec(r=2, target_modules=["l"])
  lora = random_adapters(lojax.wrap({"l": {"kernel": w}}, spec, key=jax.random.key(2)))
  a, b = factors(lora, "l")
  wm = np64(w) + 4.0 * a @ b
  for flag in (True, False):
    y = np64(x) @ wm
    y = y @ wm if flag else y - 1.0
    for _ in range(2):
      y = np.tanh(y @ wm)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      for out in both(lojax.lorafy(f), lora, x, jnp.asarray(flag)):
        np.testing.assert_allclose(out, y, **TOL)


def test_unfactorizable_use_warns_once_and_is_exact():
  w = jax.random.normal(jax.random.key(0), (3, 3))
  f = lambda p, x: x @ p["l"]["kernel"] + jnp.sum(p["l"]["kernel"] ** 2)
  spec = lojax.LoraSpec(r=2, target_modules=["l"])
  lora = random_adapters(lojax.wrap({"l": {"kernel": w}}, spec, key=jax.random.key(1)))
  a, b = factors(lora, "l")
  wm = np64(w) + 4.0 * a @ b
  with pytest.warns(UserWarning, match=r"'l/kernel' is used by `integer_pow`") as rec:
    out = jax.jit(lojax.lorafy(f))(lora, jnp.eye(3))
  assert sum("lojax" in str(r.message) for r in rec) == 1
  np.testing.assert_allclose(out, wm + np.sum(wm ** 2), rtol=1e-5)


def test_bf16_compute_follows_the_kernel_dtype():
  params = {"l": {"kernel": jnp.ones((8, 8), jnp.float32)}}
  f = lambda p, x: x.astype(jnp.bfloat16) @ p["l"]["kernel"].astype(jnp.bfloat16)
  lora = random_adapters(lojax.wrap(params, lojax.LoraSpec(target_modules=["l"]), key=jax.random.key(0)))
  out = jax.jit(lojax.lorafy(f))(lora, jnp.ones((2, 8)))
  assert out.dtype == jnp.bfloat16
  a, b = factors(lora, "l")
  np.testing.assert_allclose(np.asarray(out, np.float64), 8 + np.ones((2, 8)) @ (a @ b), rtol=2e-2)


def test_apply_refuses_adapters_for_other_params():
  params = {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
  lora = lojax.wrap(params, lojax.LoraSpec(target_modules=["a", "b"]), key=jax.random.key(0))
  other = lojax.LoraParams({"a": {"kernel": jnp.ones((5, 3))}, "c": {"kernel": jnp.ones((3, 2))}},
                           lora.adapters, lora.meta)
  f = lambda p, x: x
  with pytest.raises(ValueError, match=r"(?s)a/kernel: params have shape \(5, 3\), adapter was built "
                     r"for \(4, 3\).*b/kernel: not in the params"):
    lojax.lorafy(f)(other, jnp.ones(2))
  with pytest.raises(TypeError, match="LoraParams returned by lojax.wrap"):
    lojax.lorafy(f)(params, jnp.ones(2))


def test_static_args_and_kwargs_pass_through():
  params = {"l": {"kernel": jnp.ones((2, 2))}}
  lora = lojax.wrap(params, lojax.LoraSpec(target_modules=["l"]), key=jax.random.key(0))

  def f(p, x, *, double: bool, scale=None):
    y = x @ p["l"]["kernel"]
    if double:  # a Python branch on a static argument must keep working
      y = 2 * y
    return {"y": y, "scale": scale}

  out = jax.jit(lojax.lorafy(f), static_argnames="double")(lora, jnp.ones((1, 2)), double=True,
                                                           scale=jnp.ones(()))
  np.testing.assert_allclose(out["y"], 4.0)
  assert set(out) == {"y", "scale"}


def test_gradients_equal_the_merged_formulation():
  """d loss / d(A, B) through the factorized path equals it through W + s*A@B."""
  m = gpt.GPT(general=True, scan=True)
  params, ids = gpt.init(m)
  spec = lojax.LoraSpec(r=2, target_modules="all-linear", layers_to_transform=[1])
  lora = random_adapters(lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=m.apply,
                                    example_args=(ids,)))

  def factorized(t):
    return jnp.mean(lojax.lorafy(m.apply)(lora.with_trainable(t), ids) ** 2)

  def merged(t):
    return jnp.mean(m.apply(lojax.merge(lora.with_trainable(t)), ids) ** 2)

  g1 = jax.jit(jax.grad(factorized))(lora.trainable)
  g2 = jax.jit(jax.grad(merged))(lora.trainable)
  flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  assert len(flat1) == len(flat2) and any(np.abs(g).max() > 0 for g in flat1)
  for a, b in zip(flat1, flat2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_custom_jvp_and_vjp_functions_in_the_model():
  @jax.custom_vjp
  def clip_grad(x):
    return x

  clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.01, 0.01),))

  def f(p, x):
    h = jax.nn.relu(x @ p["a"]["kernel"])          # relu is a custom_jvp function
    return jnp.sum(clip_grad(h @ p["b"]["kernel"]) ** 2)

  params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (4, 4))},
            "b": {"kernel": jax.random.normal(jax.random.key(1), (4, 4))}}
  x = jax.random.normal(jax.random.key(2), (3, 4))
  lora = random_adapters(lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["a", "b"]),
                                    key=jax.random.key(3)))
  g1 = jax.grad(lambda t: lojax.lorafy(f)(lora.with_trainable(t), x))(lora.trainable)
  g2 = jax.grad(lambda t: f(lojax.merge(lora.with_trainable(t)), x))(lora.trainable)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_conv_gets_the_merged_kernel_with_a_warning():
  """A grouped convolution is no factorizable use: the merged kernel, exact, and one warning."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
  model = nn.Conv(6, (3, 3), feature_group_count=2)
  params = model.init(jax.random.key(1), x)
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["params"], kernel_axes={"params": (0, 1, 2)})
  lora = random_adapters(lojax.wrap(params, spec, key=jax.random.key(2)))
  with pytest.warns(UserWarning, match=r"'params/kernel' is used by `conv_general_dilated`"):
    out = lojax.lorafy(model.apply)(lora, x)
  a, b = factors(lora, "params")
  kernel = np64(params["params"]["kernel"]) + 2.0 * np.einsum("hwir,ro->hwio", a, b)
  with jax.enable_x64(True):
    ref = model.apply({"params": {"kernel": jnp.asarray(kernel),
                                  "bias": jnp.asarray(np64(params["params"]["bias"]))}}, np64(x))
  np.testing.assert_allclose(out, ref, **TOL)


def test_a_call_outside_jit_runs_as_one_compiled_program(caplog):
  """Called on concrete values (or under jax.grad without jax.jit), a lorafied function still
  compiles one program, not one per op it runs; a new lorafy of the same function reuses it.
  lojax.wrap compiles nothing for LoRA's inits."""
  import logging
  m = gpt.GPT()
  params, ids = gpt.init(m)
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules="all-linear",
                                           init_lora_weights=False), key=jax.random.key(0))

  def programs(call, what="Compiling"):
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
      out = call()
    return out, [r.getMessage() for r in caplog.records if r.getMessage().startswith(what)]

  # wrap's random inits are made on the host and placed, not compiled per shape (these
  # shapes are this test's own, so no earlier test compiled them in this process)
  odd = gpt.GPT(vocab=71, d=44, heads=4, layers=1, max_len=8)
  odd_params, _ = gpt.init(odd)
  spec = lojax.LoraSpec(r=3, target_modules="all-linear")
  assert programs(lambda: lojax.wrap(odd_params, spec, key=jax.random.key(1)))[1] == []
  first, second = lojax.lorafy(m.apply), lojax.lorafy(m.apply)   # both alive: distinct objects
  out, compiled = programs(lambda: first(lora, ids))
  assert len(compiled) == 1, compiled
  # the same fn: its traced program is reused (not traced, lowered and looked up again)
  assert programs(lambda: second(lora, ids), "Finished tracing")[1] == []
  with jax.disable_jit():   # op by op, as the call would run without it
    ref, by_op = programs(lambda: lojax.lorafy(m.apply)(lora, ids))
  assert len(by_op) > 20, len(by_op)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out, jax.jit(lojax.lorafy(m.apply))(lora, ids))
