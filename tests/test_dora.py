"""DoRA: magnitude init, factorized forward, gradients, merge, conv / N-D, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt
import lojax


def np64(x):
  return np.asarray(x, np.float64)


def dense_setup(init=False):
  k = jax.random.split(jax.random.key(0), 2)
  params = {"l": {"kernel": jax.random.normal(k[0], (6, 5))}}
  x = jax.random.normal(k[1], (4, 6))
  spec = lojax.LoraSpec(r=2, lora_alpha=4, use_dora=True, target_modules=["l"],
                        init_lora_weights=init)
  return params, x, lojax.wrap(params, spec, key=jax.random.key(1))


f = lambda p, x: x @ p["l"]["kernel"]


def test_magnitude_init_is_the_column_norm_and_output_is_unchanged():
  params, x, lora = dense_setup(init=False)          # random A and B: delta != 0
  ad = lora.adapters["default"]["lora"]["l"]
  W = np64(params["l"]["kernel"]) + 2.0 * np64(ad["lora_A"]) @ np64(ad["lora_B"])
  np.testing.assert_allclose(ad["lora_magnitude"], np.linalg.norm(W, axis=0), rtol=1e-5)
  # m = n at init, so W' = W + s*A@B.
  np.testing.assert_allclose(jax.jit(lojax.lorafy(f))(lora, x), np64(x) @ W, rtol=1e-5, atol=1e-5)
  _, _, plain = dense_setup(init=True)               # B = 0: the model is unchanged
  np.testing.assert_allclose(lojax.lorafy(f)(plain, x), f(params, x), rtol=1e-6)


def with_magnitude(lora, m):
  t = jax.tree.map(lambda z: z, lora.trainable)
  t["default"]["lora"]["l"]["lora_magnitude"] = jnp.asarray(m, jnp.float32)
  return lora.with_trainable(t)


def test_forward_and_gradients_against_numpy():
  params, x, lora = dense_setup(init=False)
  m = np.linspace(0.5, 2.0, 5)
  lora = with_magnitude(lora, m)
  ad = lora.adapters["default"]["lora"]["l"]
  V = np64(params["l"]["kernel"]) + 2.0 * np64(ad["lora_A"]) @ np64(ad["lora_B"])
  n = np.linalg.norm(V, axis=0)
  ref = (np64(x) @ V) * (m / n)
  for fn in (lojax.lorafy(f), jax.jit(lojax.lorafy(f))):
    np.testing.assert_allclose(fn(lora, x), ref, rtol=1e-5, atol=1e-5)
  # d sum(out) / dm_j = sum_i (x @ V)_ij / n_j ; the norm is a constant for the gradient.
  g = jax.grad(lambda t: jnp.sum(lojax.lorafy(f)(lora.with_trainable(t), x)))(lora.trainable)
  np.testing.assert_allclose(g["default"]["lora"]["l"]["lora_magnitude"],
                             (np64(x) @ V).sum(0) / n, rtol=1e-4)
  # dL/dB with n constant: s * A^T x^T (G * m/n), G = dL/dout = 1.
  gb = 2.0 * np64(ad["lora_A"]).T @ np64(x).T @ (np.ones((4, 5)) * (m / n))
  np.testing.assert_allclose(g["default"]["lora"]["l"]["lora_B"], gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(), dict(general=True, scan=True)])
def test_model_merge_unmerge_and_gradients(variant):
  m = gpt.GPT(**variant)
  params, ids = gpt.init(m)
  spec = lojax.LoraSpec(r=3, target_modules="all-linear", use_dora=True, init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=m.apply, example_args=(ids,))
  leaves, treedef = jax.tree.flatten(lora.trainable)
  lora = lora.with_trainable(jax.tree.unflatten(treedef, [
      x * (1 + 0.2 * jax.random.normal(jax.random.key(i), x.shape)) for i, x in enumerate(leaves)]))
  out = jax.jit(lojax.lorafy(m.apply))(lora, ids)
  merged = jax.jit(lojax.merge)(lora)
  np.testing.assert_allclose(out, jax.jit(m.apply)(merged, ids), rtol=1e-5, atol=1e-5)
  back = jax.jit(lojax.unmerge)(lora, merged)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  g1 = jax.jit(jax.grad(
      lambda t: jnp.mean(lojax.lorafy(m.apply)(lora.with_trainable(t), ids) ** 2)))(lora.trainable)
  g2 = jax.jit(jax.grad(
      lambda t: jnp.mean(m.apply(lojax.merge(lora.with_trainable(t)), ids) ** 2)))(lora.trainable)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_conv():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  conv = nn.Conv(4, (3, 3))
  params = conv.init(jax.random.key(1), x)
  spec = lojax.LoraSpec(r=2, target_modules=["params"], use_dora=True, init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(2), apply_fn=conv.apply, example_args=(x,))
  mag = lora.adapters["default"]["lora"]["params"]["lora_magnitude"]
  assert mag.shape == (4,)
  lora = lora.with_trainable(jax.tree.map(lambda z: z, lora.trainable))
  t = lora.trainable
  t["default"]["lora"]["params"]["lora_magnitude"] = mag * jnp.arange(1.0, 5.0)
  lora = lora.with_trainable(t)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(conv.apply))(lora, x),
                             conv.apply(lojax.merge(lora), x), rtol=1e-5, atol=1e-5)


def test_errors():
  m = gpt.GPT()
  params, ids = gpt.init(m)
  with pytest.raises(ValueError, match="DoRA on the embedding 'params/wte'"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["wte"], use_dora=True), key=jax.random.key(0))
  ms = gpt.GPT(scan=True)
  ps, ids_s = gpt.init(ms)
  with pytest.raises(ValueError, match="DoRA on a subset of the stacked layers"):
    lojax.wrap(ps, lojax.LoraSpec(target_modules=["c_fc"], use_dora=True, layers_to_transform=[0]),
               key=jax.random.key(0), apply_fn=ms.apply, example_args=(ids_s,))
  lora = lojax.wrap(params, lojax.LoraSpec(target_modules=["c_fc"], use_dora=True),
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match="DoRA adapters cannot serve mixed-adapter batches"):
    lojax.lorafy(m.apply)(lora, ids, lora_adapter_ids=jnp.zeros(ids.shape[0], jnp.int32))


def test_dora_on_a_quantized_base():
  m = gpt.GPT()
  params, ids = gpt.init(m)
  spec = lojax.LoraSpec(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), quantize="nf4")
  assert isinstance(lora.base["params"]["h_0"]["mlp"]["c_fc"]["kernel"], lojax.QuantizedArray)
  # At init m = n, so the model is the dequantized base plus the plain LoRA delta.
  out = jax.jit(lojax.lorafy(m.apply))(lora, ids)
  np.testing.assert_allclose(out, m.apply(lojax.merge(lora), ids), rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda t: jnp.mean(lojax.lorafy(m.apply)(lora.with_trainable(t), ids) ** 2))(
      lora.trainable)
  assert np.abs(g["default"]["lora"]["params/h_0/mlp/c_fc"]["lora_magnitude"]).max() > 0


def test_dora_peft_round_trip(tmp_path):
  params, x, lora = dense_setup(init=False)
  lora = with_magnitude(lora, np.linspace(0.5, 2.0, 5))
  mapping = lojax.PeftMapping(names=[(r"l", "model.l")])
  lojax.save_peft(tmp_path / "dora", lora, mapping=mapping)
  import json
  cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
  assert cfg["use_dora"] is True
  from safetensors.numpy import load_file
  tensors = load_file(str(tmp_path / "dora" / "adapter_model.safetensors"))
  np.testing.assert_allclose(tensors["base_model.model.model.l.lora_magnitude_vector"],
                             np.linspace(0.5, 2.0, 5), rtol=1e-6)
  back = lojax.load_peft(tmp_path / "dora", params, mapping=mapping)
  np.testing.assert_allclose(lojax.lorafy(f)(back, x), lojax.lorafy(f)(lora, x), rtol=1e-5)


def test_magnitude_of_a_rewritten_base_keeps_the_output_at_init():
  """PiSSA rewrites W into a residual; the magnitude is the norm of what the model computes."""
  k = jax.random.split(jax.random.key(2), 2)
  params = {"l": {"kernel": jax.random.normal(k[0], (6, 5))}}
  x = jax.random.normal(k[1], (4, 6))
  spec = lojax.LoraSpec(r=2, lora_alpha=4, use_dora=True, target_modules=["l"],
                        init_lora_weights="pissa")
  lora = lojax.wrap(params, spec, key=jax.random.key(1))
  ad = lora.adapters["default"]["lora"]["l"]
  W = np64(lora.base["l"]["kernel"]) + 2.0 * np64(ad["lora_A"]) @ np64(ad["lora_B"])
  np.testing.assert_allclose(W, np64(params["l"]["kernel"]), atol=1e-5)   # residual + s*A@B = W
  np.testing.assert_allclose(ad["lora_magnitude"], np.linalg.norm(W, axis=0), rtol=1e-5)
  np.testing.assert_allclose(lojax.lorafy(f)(lora, x), np64(x) @ np64(params["l"]["kernel"]),
                             rtol=1e-5, atol=1e-5)


def test_dora_adapters_cannot_be_combined():
  params, x, lora = dense_setup(init=False)
  with pytest.raises(ValueError, match=r"'default' rescales 'l' by a learned magnitude \(dora\)"):
    lojax.add_weighted_adapter(lora, ["default"], [1.0], "combined", combination_type="cat")


def test_stacked_dora_against_float64_numpy():
  """A kernel stacked over 3 layers used by a lax.scan: per layer W' = m * V / ||V||, V = W + sAB."""
  k = jax.random.split(jax.random.key(4), 2)
  params = {"w": {"kernel": jax.random.normal(k[0], (3, 6, 6)) * 0.3}}
  x = jax.random.normal(k[1], (4, 6))

  def f(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"]["kernel"])[0]

  spec = lojax.LoraSpec(r=2, lora_alpha=4, use_dora=True, target_modules=["w"],
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=f, example_args=(x,))
  t = jax.tree.map(lambda z: z, lora.trainable)
  ad = t["default"]["lora"]["w"]
  assert ad["lora_A"].shape == (3, 6, 2) and ad["lora_magnitude"].shape == (3, 6)
  ad["lora_magnitude"] = ad["lora_magnitude"] * jnp.linspace(0.5, 1.5, 18).reshape(3, 6)
  lora = lora.with_trainable(t)
  h = np64(x)
  for layer in range(3):
    v = np64(params["w"]["kernel"][layer]) + 2.0 * np64(ad["lora_A"][layer]) @ np64(
        ad["lora_B"][layer])
    h = np.tanh(h @ (np64(ad["lora_magnitude"][layer]) * v / np.linalg.norm(v, axis=0)))
  for fn in (lojax.lorafy(f), jax.jit(lojax.lorafy(f))):
    np.testing.assert_allclose(fn(lora, x), h, rtol=1e-5, atol=1e-5)


def test_a_use_lojax_cannot_factorize_gets_the_exact_dora_kernel():
  """`sum(W**2)` is no matmul: it gets the merged DoRA kernel m * V / ||V|| (V = W + s*A@B),
  written out in float64, with one warning."""
  params, x, lora = dense_setup(init=False)
  m = np.linspace(0.5, 2.0, 5)
  lora = with_magnitude(lora, m)
  g = lambda p, x: x @ p["l"]["kernel"] + jnp.sum(p["l"]["kernel"] ** 2)
  ad = lora.adapters["default"]["lora"]["l"]
  V = np64(params["l"]["kernel"]) + 2.0 * np64(ad["lora_A"]) @ np64(ad["lora_B"])
  W = V * (m / np.linalg.norm(V, axis=0))
  with pytest.warns(UserWarning, match=r"'l/kernel' is used by `integer_pow`"):
    out = lojax.lorafy(g)(lora, x)
  np.testing.assert_allclose(out, np64(x) @ W + np.sum(W ** 2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("conv", [False, True])
def test_dropout_placement_is_peft_s(conv):
  # PEFT / DoRA paper: y = x@W + (m/n - 1)*(drop(x)@W) + (m/n)*s*(drop(x)@A)@B. Each row of x
  # has one non-zero entry, so drop(x) is per row either 0 or x/keep: every output row must be
  # one of the two float64 alternatives, and both must occur.
  rng = np.random.default_rng(0)
  n_rows, c, d, rate = 64, 6, 5, 0.5
  x = np.zeros((n_rows, c))
  x[np.arange(n_rows), rng.integers(0, c, n_rows)] = rng.normal(size=n_rows) + 3.0
  w = rng.normal(size=(c, d))
  if conv:  # a 1x1 convolution over NHWC with the rows as the batch: the same algebra
    params = {"l": {"kernel": jnp.asarray(w.reshape(1, 1, c, d), jnp.float32)}}
    fn = lambda p, x: jax.lax.conv_general_dilated(
        x.reshape(n_rows, 1, 1, c), p["l"]["kernel"], (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(n_rows, d)
  else:
    params = {"l": {"kernel": jnp.asarray(w, jnp.float32)}}
    fn = f
  spec = lojax.LoraSpec(r=2, lora_alpha=4, use_dora=True, target_modules=["l"],
                        init_lora_weights=False, lora_dropout=rate)
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=fn,
                    example_args=(jnp.asarray(x, jnp.float32),))
  m = np.linspace(0.5, 2.0, d)
  t = jax.tree.map(lambda z: z, lora.trainable)
  t["default"]["lora"]["l"]["lora_magnitude"] = jnp.asarray(m.reshape(
      t["default"]["lora"]["l"]["lora_magnitude"].shape), jnp.float32)
  lora = lora.with_trainable(t)
  ad = lora.adapters["default"]["lora"]["l"]
  a, b = np64(ad["lora_A"]).reshape(c, -1), np64(ad["lora_B"]).reshape(-1, d)
  mn = m / np.linalg.norm(w + 2.0 * a @ b, axis=0)
  xd = x / (1 - rate)
  kept = x @ w + (mn - 1) * (xd @ w) + mn * (2.0 * (xd @ a) @ b)
  dropped = x @ w
  out = np64(jax.jit(lojax.lorafy(fn))(lora, jnp.asarray(x, jnp.float32),
                                       lora_rng=jax.random.key(3)))
  is_kept = np.all(np.isclose(out, kept, rtol=1e-4, atol=1e-4), axis=1)
  is_dropped = np.all(np.isclose(out, dropped, rtol=1e-4, atol=1e-4), axis=1)
  assert np.all(is_kept | is_dropped), np.flatnonzero(~(is_kept | is_dropped))
  assert 10 < is_kept.sum() < n_rows - 10
  # Evaluating, dropout is off: the merged DoRA kernel's output.
  np.testing.assert_allclose(lojax.lorafy(fn)(lora, jnp.asarray(x, jnp.float32),
                                             lora_deterministic=True),
                             x @ ((w + 2.0 * a @ b) * mn), rtol=1e-4, atol=1e-4)
