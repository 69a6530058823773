"""The memory-lean dense path (default, ``lorafy(fn, remat=True)``) against the plain factorized path.

The lean path runs ``x @ W + s(x@A)@B`` as one matmul under a custom VJP and
recomputes the kernel input in the backward from the values it was made from
(LayerNorm inputs, an activation's input). These tests pin that it computes
the same values and the same gradients as ``remat=False`` (the plain
path, itself checked against float64 NumPy in test_apply.py), including
gradients that flow *through* the recomputed chain into trainable leaves
(a LayerNorm in ``modules_to_save``, trainable biases), and that it refuses
forward mode with JAX's error while ``remat=False`` supports it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lojax

from gpt import GPT, init


def _setup(spec_kwargs, **model_kwargs):
  model = GPT(vocab=64, d=32, heads=4, layers=2, max_len=16, **model_kwargs)
  params, ids = init(model, batch=3, seq=16)
  spec = lojax.LoraSpec(r=4, lora_alpha=8, init_lora_weights=False, **spec_kwargs)
  lora = lojax.wrap(params, spec, key=jax.random.key(3), apply_fn=model.apply,
                    example_args=(ids,))
  return model, lora, ids


def _loss(model, lora, ids, remat):
  labels = jnp.roll(ids, -1, axis=1)
  apply = lojax.lorafy(model.apply, remat=remat)

  def f(trainable):
    logits = apply(lora.with_trainable(trainable), ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return f


CASES = {
    # ln_1/ln_2 outputs are adapted kernels' inputs, recomputed in the backward: their
    # trainable copies get their gradients through the recomputation.
    "ln in modules_to_save, bias all": (
        dict(target_modules="all-linear", modules_to_save=["ln_2", "ln_1"], bias="all"), {}),
    "tied + scan": (dict(target_modules=["c_attn", "c_fc", "c_proj"]), dict(tied=True, scan=True)),
    "DenseGeneral": (dict(target_modules=["query", "value", "out", "c_fc"]), dict(general=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_values_and_gradients_as_the_plain_path(case):
  spec_kwargs, model_kwargs = CASES[case]
  model, lora, ids = _setup(spec_kwargs, **model_kwargs)
  lean = jax.jit(jax.value_and_grad(_loss(model, lora, ids, True)))(lora.trainable)
  plain = jax.jit(jax.value_and_grad(_loss(model, lora, ids, False)))(lora.trainable)
  np.testing.assert_allclose(lean[0], plain[0], rtol=1e-6)
  flat_lean = jax.tree_util.tree_leaves_with_path(lean[1])
  flat_plain = jax.tree.leaves(plain[1])
  assert len(flat_lean) == len(flat_plain)
  for (path, g1), g2 in zip(flat_lean, flat_plain):
    scale = float(jnp.abs(g2).max())
    assert scale > 0, f"no gradient reached {jax.tree_util.keystr(path)}"
    np.testing.assert_allclose(g1, g2, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_second_order_gradients_match():
  model, lora, ids = _setup(dict(target_modules=["c_fc", "c_proj"]))
  direction = jax.tree.map(jnp.ones_like, lora.trainable)

  def hvp(remat):
    grad = jax.grad(_loss(model, lora, ids, remat))
    inner = lambda t: sum(jnp.vdot(a, b) for a, b in
                          zip(jax.tree.leaves(grad(t)), jax.tree.leaves(direction)))
    return jax.grad(inner)(lora.trainable)

  for a, b in zip(jax.tree.leaves(jax.jit(lambda: hvp(True))()),
                  jax.tree.leaves(jax.jit(lambda: hvp(False))())):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max() + 1e-30))


def test_forward_mode_needs_remat_false():
  model, lora, ids = _setup(dict(target_modules=["c_fc"]))
  apply = lojax.lorafy(model.apply)
  tangent = jax.tree.map(jnp.ones_like, lora.trainable)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda t: apply(lora.with_trainable(t), ids), (lora.trainable,), (tangent,))
  plain = lojax.lorafy(model.apply, remat=False)
  out, dout = jax.jvp(lambda t: plain(lora.with_trainable(t), ids),
                      (lora.trainable,), (tangent,))
  assert out.shape == dout.shape and float(jnp.abs(dout).max()) > 0


def test_remat_is_a_bool_given_to_lorafy():
  model, lora, ids = _setup(dict(target_modules=["c_fc"]))
  with pytest.raises(TypeError, match="remat"):
    lojax.lorafy(model.apply, remat=jnp.array(True))
  with pytest.raises(TypeError, match=r"lorafy\(fn, remat=False\)"):
    lojax.lorafy(model.apply)(lora, ids, lora_remat=False)


def test_split_kernels_runs_two_matmuls_with_the_same_numbers():
  """lorafy(split_kernels=True) (for tensor-parallel kernels on Auto meshes): x@W + (x@A)@B as
  two matmuls, no concatenation, with values and adapter gradients of the written-out
  float64 formula."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 5)).astype(np.float32)
  w1, w2 = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32)
  params = {"l1": {"kernel": jnp.asarray(w1)}, "l2": {"kernel": jnp.asarray(w2)}}
  f = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["l1", "l2"],
                                           init_lora_weights=False), key=jax.random.key(0))
  fac = {n: {k: np.asarray(v, np.float64) for k, v in lora.adapters["default"]["lora"][n].items()}
         for n in ("l1", "l2")}

  def ref(fac):   # float64: y = tanh(x W1 + 2 x A1 B1) W2 + 2 tanh(.) A2 B2, L = sum(y**2)
    h = np.tanh(x @ w1 + 2 * x @ fac["l1"]["lora_A"] @ fac["l1"]["lora_B"])
    return h, h @ w2 + 2 * h @ fac["l2"]["lora_A"] @ fac["l2"]["lora_B"]

  h, y = ref(fac)
  g = 2 * y   # dL/dy
  dh = (g @ w2.T + 2 * g @ fac["l2"]["lora_B"].T @ fac["l2"]["lora_A"].T) * (1 - h ** 2)
  want = {"l2": {"lora_A": 2 * h.T @ g @ fac["l2"]["lora_B"].T,
                 "lora_B": 2 * (h @ fac["l2"]["lora_A"]).T @ g},
          "l1": {"lora_A": 2 * x.T @ dh @ fac["l1"]["lora_B"].T,
                 "lora_B": 2 * (x @ fac["l1"]["lora_A"]).T @ dh}}
  split = lojax.lorafy(f, split_kernels=True)
  loss = lambda t: jnp.sum(split(lora.with_trainable(t), jnp.asarray(x)) ** 2)
  np.testing.assert_allclose(jax.jit(split)(lora, jnp.asarray(x)), y, rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(loss))(lora.trainable)["default"]["lora"]
  for n in want:
    for k in want[n]:
      np.testing.assert_allclose(grads[n][k], want[n][k], rtol=1e-4, atol=1e-4, err_msg=n + k)
  hlo = lambda fn: jax.jit(jax.grad(lambda t: jnp.sum(fn(lora.with_trainable(t),
                                                         jnp.asarray(x)) ** 2))
                           ).lower(lora.trainable).as_text()
  assert "concatenate" in hlo(lojax.lorafy(f)) and "concatenate" not in hlo(split)
  with pytest.raises(TypeError, match="split_kernels"):
    lojax.lorafy(f, split_kernels=1)
