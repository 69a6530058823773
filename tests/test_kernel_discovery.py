"""Which leaves are kernels: by name (kernel, embedding, w, weight, spec.kernel_names) or,
with ``apply_fn``, by use as a matmul weight whatever the name (lojax._src.analysis).

The models are written the way equinox (``weight`` [out, in], ``x @ W.T``), gemma /
tunix (``Einsum`` modules holding ``w``) and hand-written MoE-style code (bare arrays)
store their weights. References are float64 NumPy with the delta written out.
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lojax

D, H, N, F = 6, 3, 2, 10


def _rand(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32))


def _np(x):
  return np.asarray(x, np.float64)


def equinox_like():
  """Two layers of ``{"weight": [out, in], "bias": [out]}`` applied as ``x @ W.T + b``."""
  params = {"layers": [{"fc": {"weight": _rand(i, F, D), "bias": _rand(10 + i, F)},
                        "norm": {"weight": jnp.ones(F)}} for i in range(2)]}

  def fn(p, x):
    for layer in p["layers"]:
      x = jnp.tanh(x @ layer["fc"]["weight"].T + layer["fc"]["bias"]) * layer["norm"]["weight"]
      x = x[..., :D]
    return x

  return params, fn, _rand(99, 4, D)


def test_equinox_weight_is_a_kernel_with_its_input_axis_traced():
  params, fn, x = equinox_like()
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=fn, example_args=(x,))
  targets = {t.path: t for t in lora.meta.adapter("default").targets}
  assert sorted(targets) == ["layers/0/fc", "layers/1/fc"]  # the 1-D norm `weight`s are not
  assert all(t.leaf == "weight" and t.in_axes == (1,) for t in targets.values())
  f = lora.adapters["default"]["lora"]["layers/0/fc"]
  assert f["lora_A"].shape == (D, 2) and f["lora_B"].shape == (2, F)  # A on the input side
  # Reference: the [out, in] weight plus s * (A @ B).T, in float64.
  w = _np(params["layers"][0]["fc"]["weight"]) + 2.0 * (_np(f["lora_A"]) @ _np(f["lora_B"])).T
  np.testing.assert_allclose(lojax.merge(lora)["layers"][0]["fc"]["weight"], w, rtol=1e-6,
                             atol=1e-6)
  out = jax.jit(lojax.lorafy(fn))(lora, x)
  np.testing.assert_allclose(out, fn(lojax.merge(lora), x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, fn(params, x), atol=1e-3)


def test_weight_without_apply_fn_is_refused_not_guessed():
  params, _, _ = equinox_like()
  with pytest.raises(ValueError, match=r"layers/0/fc.*no layout convention.*apply_fn"):
    lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["fc"]), key=jax.random.key(0))
  # kernel_axes names the input axis instead of tracing
  spec = lojax.LoraSpec(r=2, target_modules=["fc"], kernel_axes={"fc": (1,)})
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  assert lora.adapters["default"]["lora"]["layers/1/fc"]["lora_A"].shape == (D, 2)


def test_einsum_w_with_head_axes():
  """A gemma / tunix ``Einsum`` query ``w`` [D, N, H] used as ``btd,dnh->btnh``."""
  params = {"attn": {"q_einsum": {"w": _rand(1, D, N, H)}},
            "out": {"kernel": _rand(2, N * H, D)}}

  def fn(p, x):
    q = jnp.einsum("btd,dnh->btnh", x, p["attn"]["q_einsum"]["w"])
    return q.reshape(*q.shape[:2], N * H) @ p["out"]["kernel"]

  x = _rand(3, 2, 5, D)
  spec = lojax.LoraSpec(r=2, target_modules="all-linear", init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=fn, example_args=(x,))
  f = lora.adapters["default"]["lora"]
  assert sorted(f) == ["attn/q_einsum", "out"]
  assert f["attn/q_einsum"]["lora_A"].shape == (D, 2)
  assert f["attn/q_einsum"]["lora_B"].shape == (2, N, H)
  a, b = _np(f["attn/q_einsum"]["lora_A"]), _np(f["attn/q_einsum"]["lora_B"])
  w = _np(params["attn"]["q_einsum"]["w"]) + 4.0 * np.einsum("dr,rnh->dnh", a, b)  # s = 8 / 2
  np.testing.assert_allclose(lojax.merge(lora)["attn"]["q_einsum"]["w"], w, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(fn))(lora, x), fn(lojax.merge(lora), x),
                             rtol=1e-5, atol=1e-5)


def bare_array_model():
  """A projection stored as a bare array ``mlp/proj`` next to a ``router`` Dense."""
  params = {"mlp": {"proj": _rand(1, D, F), "scale": _rand(2, 4, F),
                    "router": {"kernel": _rand(3, D, 4), "bias": jnp.zeros(4)}}}

  def fn(p, x):
    gate = jax.nn.softmax(x @ p["mlp"]["router"]["kernel"] + p["mlp"]["router"]["bias"])
    return (gate @ p["mlp"]["scale"]) * (x @ p["mlp"]["proj"])

  return params, fn, _rand(4, 3, D)


def test_a_bare_array_used_as_a_matmul_weight_is_its_own_module():
  params, fn, x = bare_array_model()
  found = lojax.kernel_paths(params, apply_fn=fn, example_args=(x,))
  assert found["mlp/proj"] == {"leaf": "", "shape": (D, F), "kind": "dense", "in_axes": (0,),
                               "expert_axes": (), "stacked": None, "tied": False}
  # `scale` is the weight of `gate @ scale` (contracted with the gate): found by use too.
  assert "mlp/scale" in found and "mlp/router" in found
  # "all-linear" takes a bare projection too (no expert axes: a PEFT Linear); an expert
  # array is left to target_modules (test_moe.py), as PEFT's target_parameters.
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules="all-linear"),
                    key=jax.random.key(0), apply_fn=fn, example_args=(x,))
  assert sorted(lora.adapters["default"]["lora"]) == ["mlp/proj", "mlp/router", "mlp/scale"]
  # Named in target_modules (PEFT's target_parameters), it is adapted.
  spec = lojax.LoraSpec(r=2, lora_alpha=2, target_modules=["mlp/proj"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  f = lora.adapters["default"]["lora"]["mlp/proj"]
  merged = lojax.merge(lora)
  np.testing.assert_allclose(merged["mlp"]["proj"],
                             _np(params["mlp"]["proj"]) + _np(f["lora_A"]) @ _np(f["lora_B"]),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(fn))(lora, x), fn(merged, x), rtol=1e-5,
                             atol=1e-5)
  back = lojax.unmerge(lora, merged)
  np.testing.assert_allclose(back["mlp"]["proj"], params["mlp"]["proj"], atol=1e-6)
  # Its gradient flows through the factors.
  g = jax.jit(jax.grad(lambda t: jnp.sum(lojax.lorafy(fn)(lora.with_trainable(t), x))))(
      lora.trainable)
  assert float(jnp.abs(g["default"]["lora"]["mlp/proj"]["lora_A"]).max()) > 0


def test_a_bare_array_adapter_checkpoints(tmp_path):
  params, fn, x = bare_array_model()
  spec = lojax.LoraSpec(r=2, target_modules=["mlp/proj"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  lojax.save_adapters(tmp_path / "ckpt", lora, step=1)
  back = lojax.restore_adapters(tmp_path / "ckpt", params)
  assert back.meta == lora.meta
  for a, b in zip(jax.tree.leaves(back.trainable), jax.tree.leaves(lora.trainable)):
    np.testing.assert_array_equal(a, b)


def test_leaves_only_used_elementwise_are_not_kernels():
  params, fn, x = bare_array_model()
  params["mlp"]["table"] = _rand(5, 3, 4)  # a 2-D float leaf added elementwise: not a kernel
  g = lambda p, x: fn(p, x) + p["mlp"]["table"].sum()
  found = lojax.kernel_paths(params, apply_fn=g, example_args=(x,))
  assert "mlp/table" not in found
  with pytest.raises(ValueError, match="mlp/table"):
    lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["mlp/table"]), key=jax.random.key(0),
               apply_fn=g, example_args=(x,))


def test_kernel_names_adds_leaf_names():
  params = {"proj": {"proj_weight": _rand(1, D, F)}}
  fn = lambda p, x: x @ p["proj"]["proj_weight"]
  x = _rand(2, 3, D)
  # Without the name and without apply_fn the leaf is not a kernel at all ...
  with pytest.raises(ValueError, match="matched only module paths that are not a matmul kernel"):
    lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["proj"]), key=jax.random.key(0))
  # ... named, its module is its parent, and its layout comes from tracing or kernel_axes.
  spec = lojax.LoraSpec(r=2, target_modules="all-linear", kernel_names=["proj_weight"])
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=fn, example_args=(x,))
  [t] = lora.meta.adapter("default").targets
  assert (t.path, t.leaf, t.in_axes) == ("proj", "proj_weight", (0,))


def test_two_named_kernels_in_one_dict_are_two_modules():
  params = {"block": {"w": _rand(1, D, F), "kernel": _rand(2, F, D)}}
  fn = lambda p, x: (x @ p["block"]["w"]) @ p["block"]["kernel"]
  x = _rand(3, 2, D)
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules="all-linear",
                                           init_lora_weights=False),
                    key=jax.random.key(0), apply_fn=fn, example_args=(x,))
  assert sorted(lora.adapters["default"]["lora"]) == ["block/kernel", "block/w"]
  np.testing.assert_allclose(jax.jit(lojax.lorafy(fn))(lora, x), fn(lojax.merge(lora), x),
                             rtol=1e-5, atol=1e-5)


def test_a_bare_array_target_is_a_peft_target_parameter(tmp_path):
  """In a PEFT file a bare array is parameter ``proj`` of torch module ``mlp``
  (``target_parameters``; the layout: tests/test_moe_peft.py)."""
  params, fn, x = bare_array_model()
  spec = lojax.LoraSpec(r=2, target_modules=["mlp/proj", "router"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=fn, example_args=(x,))
  lojax.save_peft(tmp_path / "out", lora, mapping=lojax.PeftMapping())
  config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
  assert config["target_modules"] == ["mlp.router"] and config["target_parameters"] == ["mlp.proj"]
  back = lojax.load_peft(tmp_path / "out", params, apply_fn=fn, example_args=(x,))
  np.testing.assert_array_equal(jax.jit(lojax.lorafy(fn))(back, x),
                                jax.jit(lojax.lorafy(fn))(lora, x))


def test_head_rule_reads_the_traced_output_axis():
  """A [vocab, d] head applied as ``h @ W.T`` produces vocab outputs: a head, left out of
  "all-linear" (its last axis is d, which the rule read before tracing told it otherwise)."""
  V = 11
  params = {"embed": {"embedding": _rand(1, V, D)}, "mid": {"kernel": _rand(2, D, D)},
            "proj_out": {"kernel": _rand(3, V, D)}}

  def fn(p, ids):
    h = jnp.tanh(p["embed"]["embedding"][ids] @ p["mid"]["kernel"])
    return h @ p["proj_out"]["kernel"].T

  ids = jnp.zeros((2, 4), jnp.int32)
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules="all-linear"),
                    key=jax.random.key(0), apply_fn=fn, example_args=(ids,))
  assert sorted(lora.adapters["default"]["lora"]) == ["mid"]
  assert lora.meta.adapter("default").heads == ("proj_out",)


def test_an_out_in_kernel_taken_by_convention_warns_at_lorafy():
  """A 2-D ``kernel`` wrapped without ``apply_fn`` is taken as [in, out]; a function that only
  contracts its other axis (``x @ W.T``, transformers' GPT-2 Conv1D) gets a warning. With
  ``apply_fn`` the layout is traced and nothing is said."""
  params = {"c_attn": {"kernel": jax.random.normal(jax.random.key(0), (12, 4))}}
  f = lambda p, x: x @ p["c_attn"]["kernel"].T  # noqa: E731
  x = jnp.ones((2, 4))
  spec = lojax.LoraSpec(r=2, target_modules=["c_attn"])
  guessed = lojax.wrap(params, spec, key=jax.random.key(1))
  with pytest.warns(UserWarning, match=r"'c_attn/kernel' \[12, 4\] was wrapped as an \[in, out\]"):
    jax.jit(lojax.lorafy(f))(guessed, x)
  traced = lojax.wrap(params, spec, key=jax.random.key(1), apply_fn=f, example_args=(x,))
  assert traced.meta.adapter("default").target("c_attn").in_axes == (1,)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(lojax.lorafy(f))(traced, x)
    # a kernel used both ways (a tied encoder/decoder) is not a wrong guess
    both = lambda p, x: (x @ p["c_attn"]["kernel"].T) @ p["c_attn"]["kernel"]  # noqa: E731
    jax.jit(lojax.lorafy(both))(guessed, x)
