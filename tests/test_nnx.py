"""lojax on Flax NNX models: wrap an ``nnx.split`` state, apply via ``nnx.merge``."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lojax

V, D, HEADS = 32, 16, 2
RTOL = ATOL = 1e-5


class Block(nnx.Module):
  def __init__(self, rngs):
    self.query = nnx.Linear(D, D, rngs=rngs)
    self.value = nnx.Linear(D, D, rngs=rngs)
    self.fc = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    x = x + jnp.tanh(self.query(x)) * self.value(x)
    return x + jnp.tanh(self.fc(x))


class Model(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(2)])
    self.head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


class GeneralModel(nnx.Module):
  """Attention-style N-D kernels: [embed, heads, hd], [heads, hd, embed]."""

  def __init__(self, rngs):
    hd = D // HEADS
    self.query = nnx.LinearGeneral(D, (HEADS, hd), rngs=rngs)
    self.out = nnx.LinearGeneral((HEADS, hd), D, axis=(-2, -1), rngs=rngs)
    self.mix = nnx.Einsum("bthd,hdo->bto", (HEADS, hd, D), rngs=rngs)

  def __call__(self, x):
    q = jnp.tanh(self.query(x))
    return self.out(q) + self.mix(q)


def _f64(x):
  return np.asarray(x, np.float64)


def _flat(state):
  """{"/"-path: array} of an NNX state."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    parts = []
    for k in kp:
      if isinstance(k, jax.tree_util.DictKey):
        parts.append(str(k.key))
      elif isinstance(k, jax.tree_util.SequenceKey):
        parts.append(str(k.idx))
      else:
        assert isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value", k  # Param box
    out["/".join(parts)] = np.asarray(leaf)
  return out


@pytest.fixture(scope="module")
def nnx_model():
  model = Model(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids = jax.random.randint(jax.random.key(1), (2, 6), 0, V)
  apply = lojax.lorafy(lambda st, x: nnx.merge(graphdef, st)(x))
  plain = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  return model, graphdef, state, ids, apply, plain


def test_target_paths(nnx_model):
  _, _, state, _, _, _ = nnx_model
  key = jax.random.key(0)
  lora = lojax.wrap(state, lojax.LoraSpec(target_modules="all-linear"), key=key)
  assert [t.path for t in lora.meta.adapters[0].targets] == [
      f"blocks/{i}/{m}" for i in range(2) for m in ("fc", "query", "value")]
  assert "head" in lora.meta.adapters[0].heads
  lora = lojax.wrap(state, lojax.LoraSpec(r=3, target_modules=["query", "value"]), key=key)
  paths = [t.path for t in lora.meta.adapters[0].targets]
  assert paths == ["blocks/0/query", "blocks/0/value", "blocks/1/query", "blocks/1/value"]
  assert lora.adapters["default"]["lora"]["blocks/1/value"]["lora_A"].shape == (D, 3)
  assert lora.adapters["default"]["lora"]["blocks/1/value"]["lora_B"].shape == (3, D)
  # NNX list indices are layer indices.
  lora = lojax.wrap(state, lojax.LoraSpec(target_modules=["query"], layers_to_transform=[1]),
                    key=key)
  assert [t.path for t in lora.meta.adapters[0].targets] == ["blocks/1/query"]
  lora = lojax.wrap(state, lojax.LoraSpec(target_modules="blocks/0/(query|fc)"), key=key)
  assert [t.path for t in lora.meta.adapters[0].targets] == ["blocks/0/fc", "blocks/0/query"]
  with pytest.raises(ValueError, match=r"'qurey'.*blocks/0/query"):
    lojax.wrap(state, lojax.LoraSpec(target_modules=["qurey"]), key=key)


@pytest.mark.parametrize("use_jit", [False, True])
def test_output_matches_merged_state(nnx_model, use_jit):
  model, graphdef, state, ids, apply, plain = nnx_model
  r, alpha = 2, 5
  spec = lojax.LoraSpec(r=r, lora_alpha=alpha, target_modules="all-linear",
                        init_lora_weights=False)
  lora = lojax.wrap(state, spec, key=jax.random.key(0))
  merged = lojax.merge(lora)
  assert type(merged) is type(state)
  # Merged kernels are W + s*A@B (float64 reference), other leaves unchanged.
  flat_m, flat_s = _flat(merged), _flat(state)
  assert flat_m.keys() == flat_s.keys()
  for path, fac in lora.adapters["default"]["lora"].items():
    np.testing.assert_allclose(
        flat_m[path + "/kernel"],
        _f64(flat_s[path + "/kernel"]) + alpha / r * _f64(fac["lora_A"]) @ _f64(fac["lora_B"]),
        rtol=1e-6, atol=1e-6)
  for p in ("head/kernel", "embed/embedding", "blocks/0/query/bias"):
    np.testing.assert_array_equal(flat_m[p], flat_s[p])

  ref = nnx.merge(graphdef, merged)(ids)
  base = model(ids)
  assert np.abs(np.asarray(ref) - np.asarray(base)).max() > 1e-2
  out = (jax.jit(apply) if use_jit else apply)(lora, ids)
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  # The original model is not modified by any of this.
  np.testing.assert_array_equal(model(ids), base)
  np.testing.assert_array_equal(plain(state, ids), plain(lora.base, ids))


def test_jitted_adamw_training_on_nnx(nnx_model):
  _, _, state, ids, apply, _ = nnx_model
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules="all-linear")  # default init
  lora = lojax.wrap(state, spec, key=jax.random.key(0))
  tx = optax.adamw(3e-2)

  def loss_fn(tr):
    logits = apply(lora.with_trainable(tr), ids)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

  @jax.jit
  def step(tr, opt_state):
    loss, g = jax.value_and_grad(loss_fn)(tr)
    updates, opt_state = tx.update(g, opt_state, tr)
    return optax.apply_updates(tr, updates), opt_state, loss

  tr, opt_state = lora.trainable, tx.init(lora.trainable)
  losses = []
  for _ in range(20):
    tr, opt_state, loss = step(tr, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  # Only the adapters moved: the wrapped state is bit-identical to the original.
  trained = lora.with_trainable(tr)
  for x, y in zip(jax.tree.leaves(trained.base), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)
  for path, fac in tr["default"]["lora"].items():  # B started at 0 and was trained
    assert np.abs(np.asarray(fac["lora_B"])).max() > 0, path


@pytest.fixture(scope="module")
def general():
  model = GeneralModel(nnx.Rngs(3))
  graphdef, state = nnx.split(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, D)).astype(np.float32))
  fn = lambda st, x: nnx.merge(graphdef, st)(x)
  return graphdef, state, x, fn


def test_nd_kernels_need_apply_fn(general):
  _, state, _, _ = general
  spec = lojax.LoraSpec(r=2, target_modules=["out", "mix"])
  with pytest.raises(ValueError, match=r"(?s)out \(shape \(2, 8, 16\)\).*apply_fn=model.apply"):
    lojax.wrap(state, spec, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"(?s)mix \(shape \(2, 8, 16\)\)"):
    lojax.wrap(state, spec, key=jax.random.key(0))


def test_nd_kernels_with_apply_fn(general):
  graphdef, state, x, fn = general
  spec = lojax.LoraSpec(r=2, lora_alpha=3, target_modules=["query", "out", "mix"],
                        init_lora_weights=False)
  lora = lojax.wrap(state, spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  t = {t.path: t for t in lora.meta.adapters[0].targets}
  assert set(t) == {"query", "out", "mix"}
  assert t["query"].in_axes == (0,) and t["query"].shape == (D, HEADS, D // HEADS)
  assert t["out"].in_axes == (0, 1) and t["out"].shape == (HEADS, D // HEADS, D)
  assert t["mix"].in_axes == (0, 1)
  s = 3 / 2
  flat_m, flat_s = _flat(lojax.merge(lora)), _flat(state)
  for path, sub in (("query", "ir,rhd->ihd"), ("out", "hdr,ro->hdo"), ("mix", "hdr,ro->hdo")):
    fac = lora.adapters["default"]["lora"][path]
    np.testing.assert_allclose(
        flat_m[path + "/kernel"],
        _f64(flat_s[path + "/kernel"]) + s * np.einsum(sub, _f64(fac["lora_A"]),
                                                       _f64(fac["lora_B"])),
        rtol=1e-6, atol=1e-6)
  ref = nnx.merge(graphdef, lojax.merge(lora))(x)
  assert np.abs(np.asarray(ref) - np.asarray(nnx.merge(graphdef, state)(x))).max() > 1e-2
  apply = lojax.lorafy(fn)
  for out in (apply(lora, x), jax.jit(apply)(lora, x)):
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


class RematModel(Model):
  """Blocks under ``nnx.remat``: the checkpointed function returns the block's state."""

  def __call__(self, ids):
    x = self.embed(ids)
    for block in self.blocks:
      x = nnx.remat(lambda b, x: b(x))(block, x)
    return self.head(x)


def test_nnx_remat_keeps_kernels_factorized():
  """A kernel the checkpointed body hands back is no use of it: no merged-kernel warning;
  outputs and factor gradients are the merged model's."""
  model = RematModel(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  fn = lambda s, ids: nnx.merge(graphdef, s)(ids)  # noqa: E731
  ids = jnp.arange(12).reshape(2, 6) % V
  spec = lojax.LoraSpec(r=2, target_modules=["query", "value", "fc"], init_lora_weights=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    lora = lojax.wrap(state, spec, key=jax.random.key(1), apply_fn=fn, example_args=(ids,))
    got = jax.jit(lojax.lorafy(fn))(lora, ids)
    grads = jax.jit(jax.grad(lambda t: jnp.sum(lojax.lorafy(fn)(lora.with_trainable(t), ids)
                                               ** 2)))(lora.trainable)
  np.testing.assert_allclose(got, fn(lojax.merge(lora), ids), rtol=RTOL, atol=ATOL)
  # the gradient of one factor against the merged model's, by the chain rule
  w_grad = jax.grad(lambda s: jnp.sum(fn(s, ids) ** 2))(lojax.merge(lora))
  t = lora.meta.adapter("default").target("blocks/0/query")
  entry = lora.trainable["default"]["lora"]["blocks/0/query"]
  want_a = t.scaling * w_grad["blocks"][0]["query"]["kernel"] @ entry["lora_B"].T
  np.testing.assert_allclose(grads["default"]["lora"]["blocks/0/query"]["lora_A"], want_a,
                             rtol=1e-4, atol=1e-5)


def test_nnx_lora_step_compiles_to_the_linen_program():
  """The same GPT as an NNX and a linen model: lojax's LoRA training steps compile to the
  same program (FLOPs, bytes accessed, temp memory, matmul count), so NNX costs nothing
  beyond what jit dispatch of its state tree does."""
  import os
  import re
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
  from models import Config, LinenGPT, NnxGPT, batch
  cfg = Config(vocab=256, d=64, heads=4, layers=2, seq=32, batch=2)
  ids, labels = batch(cfg)
  tx = optax.adamw(1e-3)
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules="all-linear")
  xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(apply, lora):
    def f(lora, opt_state, ids):
      loss, g = jax.value_and_grad(lambda t: xent(apply(lora.with_trainable(t), ids)))(
          lora.trainable)
      updates, opt_state = tx.update(g, opt_state, lora.trainable)
      return optax.apply_updates(lora.trainable, updates), opt_state, loss
    c = jax.jit(f).lower(lora, tx.init(lora.trainable), ids).compile()
    cost = c.cost_analysis()
    return (cost["flops"], cost["bytes accessed"], c.memory_analysis().temp_size_in_bytes,
            len(re.findall(r" dot\(", c.as_text())))

  linen = LinenGPT(cfg)
  params = linen.init(jax.random.key(0), ids)
  graphdef, state = nnx.split(NnxGPT(cfg, nnx.Rngs(0)))
  got = step(lojax.lorafy(lambda st, x: nnx.merge(graphdef, st)(x)),
             lojax.wrap(state, spec, key=jax.random.key(1)))
  want = step(lojax.lorafy(linen.apply), lojax.wrap(params, spec, key=jax.random.key(1)))
  assert got == want
