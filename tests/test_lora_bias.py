"""``lora_bias=True``: a trainable bias on lora_B (PEFT's ``LoraConfig(lora_bias=True)``).

PEFT's own numbers (outputs, gradients, counts, files both ways, on the unrolled
and the scanned GPT) are checked in ``tests/test_peft_oracle.py`` (cases
``lora_bias`` and ``lora_bias_scan``). Here, against float64 NumPy with the
formula written out: a dense module computes ``x@W + b + s*((x@A)@B + c)``, a
conv ``conv(x, W) + b + s*(conv(x, A)@B + c)``; merging adds ``s*c`` to the
module's bias; mixed-adapter batches give each example its own adapter's ``c``;
dropout leaves ``c`` alone; hotswap rescales it with B; and every use lojax
cannot give a bias to is an error.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lojax

S = 4.0 / 2   # lora_alpha / r


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6, name="fc1")(x))
    return nn.Dense(3, name="fc2")(h)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(5, (3, 3), padding="SAME", name="conv")(x)


class Scanned(nn.Module):
  """Three stacked dense layers, ``nn.scan`` over the layer axis."""

  @nn.compact
  def __call__(self, x):
    body = nn.scan(lambda m, h, _: (jnp.tanh(nn.Dense(4, name="fc")(h)), None),
                   variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return body(self, x, None)[0]


def _drawn(lora, seed=0):
  """``lora`` with every trainable leaf drawn from N(0, 1) (B and the biases non-zero)."""
  rng = np.random.default_rng(seed)
  return lora.with_trainable(jax.tree.map(
      lambda v: jnp.asarray(rng.normal(size=v.shape), v.dtype), lora.trainable))


def _f64(tree):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def _mlp(seed=0, name="default", lora=None, spec=None):
  model = Mlp()
  x = jax.random.normal(jax.random.key(1), (5, 4))
  params = model.init(jax.random.key(0), x)
  spec = spec or lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_bias=True)
  lora = lojax.wrap(lora if lora is not None else params, spec, key=jax.random.key(seed),
                    adapter_name=name)
  return model, x, params, lora


def _ref_mlp(params, entries, x):
  """The MLP with ``x@W + b + s*((x@A)@B + c)`` per layer, float64."""
  p = _f64(params)["params"]
  e = _f64(entries)

  def dense(h, name):
    q, f = p[name], e.get(f"params/{name}")
    y = h @ q["kernel"] + q["bias"]
    return y if f is None else y + S * ((h @ f["lora_A"]) @ f["lora_B"] + f["lora_B_bias"])

  return dense(np.maximum(dense(np.asarray(x, np.float64), "fc1"), 0.0), "fc2")


def test_init_is_zero_and_trainable():
  _, x, params, lora = _mlp()
  entry = lora.trainable["default"]["lora"]["params/fc2"]
  assert entry["lora_B_bias"].shape == (3,) and not np.any(entry["lora_B_bias"])
  assert lojax.count_parameters(lora).trainable == (4 * 2 + 2 * 6 + 6) + (6 * 2 + 2 * 3 + 3)


def test_forward_gradient_merge_unmerge():
  model, x, params, lora = _mlp()
  lora = _drawn(lora)
  want = _ref_mlp(params, lora.trainable["default"]["lora"], x)
  got = jax.jit(lojax.lorafy(model.apply))(lora, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # d(sum out)/dc of the last layer is s per row: 5 rows
  g = jax.grad(lambda t: lojax.lorafy(model.apply)(lora.with_trainable(t), x).sum())(
      lora.trainable)
  np.testing.assert_allclose(g["default"]["lora"]["params/fc2"]["lora_B_bias"], [S * 5] * 3,
                             rtol=1e-6)
  merged = lojax.merge(lora)
  c = np.asarray(lora.trainable["default"]["lora"]["params/fc2"]["lora_B_bias"], np.float64)
  np.testing.assert_allclose(merged["params"]["fc2"]["bias"],
                             np.asarray(params["params"]["fc2"]["bias"], np.float64) + S * c,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.apply(merged, x), want, rtol=1e-5, atol=1e-5)
  back = lojax.unmerge(lora, merged)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_dropout_leaves_the_bias_alone():
  model = Mlp()
  x = jax.random.normal(jax.random.key(1), (5, 4))
  params = model.init(jax.random.key(0), x)
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["fc2"], lora_bias=True,
                        lora_dropout=0.5)
  lora = _drawn(lojax.wrap(params, spec, key=jax.random.key(0)))
  entry = lora.trainable["default"]["lora"]["params/fc2"]
  # With B = 0 the dropped path adds nothing: whatever the mask, the delta is exactly s*c.
  no_b = {"default": dict(lora.trainable["default"], lora={"params/fc2": dict(
      entry, lora_B=jnp.zeros_like(entry["lora_B"]))})}
  f = lojax.lorafy(model.apply)
  for seed in range(3):
    got = f(lora.with_trainable(no_b), x, lora_rng=jax.random.key(seed)) - model.apply(params, x)
    np.testing.assert_allclose(got, np.broadcast_to(S * np.asarray(entry["lora_B_bias"]),
                                                    got.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other", [["fc1", "fc2"], ["fc1"]])
def test_mixed_batch_gives_each_example_its_bias(other):
  # Both adapters on fc2: one gathered pass; one only: its term masked to its examples.
  model, x, params, lora = _mlp(seed=0)
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=other, lora_bias=True)
  _, _, _, lora = _mlp(seed=1, name="other", lora=lora, spec=spec)
  lora = _drawn(lojax.set_adapter(lora, ["default", "other"]))
  ids = jnp.array([0, 1, -1, 1, 0])
  got = jax.jit(lojax.lorafy(model.apply))(lora, x, lora_adapter_ids=ids)
  for i, k in enumerate(np.asarray(ids)):
    if k < 0:
      want = model.apply(params, x[i:i + 1])[0]
    else:
      want = _ref_mlp(params, lora.adapters[lora.meta.active[k]]["lora"], x[i:i + 1])[0]
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_stacked_layers_subset():
  model = Scanned()
  x = jax.random.normal(jax.random.key(1), (2, 4))
  params = model.init(jax.random.key(0), x)
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["fc"], lora_bias=True,
                        layers_to_transform=[0, 2])
  lora = _drawn(lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                           example_args=(x,)))
  (t,) = lora.meta.adapters[0].targets
  entry = _f64(lora.trainable["default"]["lora"][t.path])
  layers = [0, 2]
  assert t.layers == (0, 2) and entry["lora_B_bias"].shape == (2, 4)
  fc = _f64(params)["params"]["fc"]
  h = np.asarray(x, np.float64)
  for i in range(3):
    y = h @ fc["kernel"][i] + fc["bias"][i]
    if i in layers:
      j = layers.index(i)
      y = y + S * ((h @ entry["lora_A"][j]) @ entry["lora_B"][j] + entry["lora_B_bias"][j])
    h = np.tanh(y)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(model.apply))(lora, x), h, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(model.apply(lojax.merge(lora), x), h, rtol=1e-5, atol=1e-5)


def test_conv():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  params = model.init(jax.random.key(0), x)
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["conv"], lora_bias=True)
  lora = _drawn(lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=model.apply,
                           example_args=(x,)))
  e = lora.trainable["default"]["lora"]["params/conv"]
  w = np.asarray(params["params"]["conv"]["kernel"], np.float64)
  merged_w = w + S * np.einsum("hwir,ro->hwio", np.asarray(e["lora_A"], np.float64),
                               np.asarray(e["lora_B"], np.float64))
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))   # SAME, 3x3
  want = sum(np.einsum("nijc,co->nijo", xp[:, h:h + 6, v:v + 6], merged_w[h, v])
             for h in range(3) for v in range(3))
  want = want + np.asarray(params["params"]["conv"]["bias"], np.float64) + S * np.asarray(
      e["lora_B_bias"], np.float64)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(model.apply))(lora, x), want, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(model.apply(lojax.merge(lora), x), want, rtol=1e-5, atol=1e-5)


def test_hotswap_rescales_the_bias():
  model, x, params, server = _mlp()
  spec = lojax.LoraSpec(r=1, lora_alpha=3, target_modules=["fc1", "fc2"], lora_bias=True)
  new = _drawn(lojax.wrap(params, spec, key=jax.random.key(5)), seed=3)
  swapped = lojax.hotswap(server, new)
  np.testing.assert_allclose(lojax.lorafy(model.apply)(swapped, x),
                             lojax.lorafy(model.apply)(new, x), rtol=1e-5, atol=1e-5)


def test_refusals():
  with pytest.raises(ValueError, match="use_dora"):
    lojax.LoraSpec(target_modules=["q"], lora_bias=True, use_dora=True)
  with pytest.raises(ValueError, match="init_lora_weights"):
    lojax.LoraSpec(target_modules=["q"], lora_bias=True, init_lora_weights="pissa")
  with pytest.raises(ValueError, match="lora_bias"):
    lojax.AdaLoraSpec(target_modules=["q"], lora_bias=True, total_step=10)
  table = {"emb": {"embedding": jnp.ones((10, 4))}}
  with pytest.raises(ValueError, match="embedding tables"):
    lojax.wrap(table, lojax.LoraSpec(target_modules=["emb"], lora_bias=True),
               key=jax.random.key(0))
  # No bias leaf: trains and applies (a warning), but cannot merge.
  params = {"dense": {"kernel": jnp.ones((4, 3))}}
  with pytest.warns(UserWarning, match="no bias leaf"):
    lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"], lora_bias=True),
                      key=jax.random.key(0))
  with pytest.raises(ValueError, match="no bias leaf to merge"):
    lojax.merge(lora)
  # A transposed use (x @ Wᵀ) and a use lojax cannot factorize have no output to add c to.
  with pytest.raises(ValueError, match="transposed use"):
    lojax.lorafy(lambda p, x: x @ p["dense"]["kernel"].T)(lora, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="cannot factorize"):
    lojax.lorafy(lambda p, x: x @ jnp.sin(p["dense"]["kernel"]))(lora, jnp.ones((2, 4)))
