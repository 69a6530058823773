"""wrap: structure of the LoRA tree, nesting, and its error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt
import lojax


@pytest.fixture(scope="module")
def model_params():
  m = gpt.GPT()
  params, ids = gpt.init(m)
  return m, params, ids


def test_tree_structure_and_shapes(model_params):
  _, params, _ = model_params
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["c_attn", "c_fc"]), key=jax.random.key(0))
  lp = lora.trainable["default"]["lora"]
  assert sorted(lp) == ["params/h_0/attn/c_attn", "params/h_0/mlp/c_fc",
                        "params/h_1/attn/c_attn", "params/h_1/mlp/c_fc"]
  assert lp["params/h_0/attn/c_attn"]["lora_A"].shape == (32, 4)
  assert lp["params/h_0/attn/c_attn"]["lora_B"].shape == (4, 96)
  assert lora.base is params  # the base is not copied
  assert lora.with_trainable(jax.tree.map(jnp.zeros_like, lora.trainable)).base is params
  # LoraParams is a pytree: jit passes it through unchanged.
  out = jax.jit(lambda l: l)(lora)
  assert out.meta == lora.meta
  np.testing.assert_array_equal(out.trainable["default"]["lora"]["params/h_0/mlp/c_fc"]["lora_A"],
                                lp["params/h_0/mlp/c_fc"]["lora_A"])


def test_same_key_same_adapters_and_independent_of_order(model_params):
  _, params, _ = model_params
  a = lojax.wrap(params, lojax.LoraSpec(target_modules=["c_fc", "c_attn"]), key=jax.random.key(3))
  b = lojax.wrap(params, lojax.LoraSpec(target_modules=["c_attn"]), key=jax.random.key(3))
  c = lojax.wrap(params, lojax.LoraSpec(target_modules=["c_attn"]), key=jax.random.key(4))
  pa = a.trainable["default"]["lora"]["params/h_0/attn/c_attn"]["lora_A"]
  np.testing.assert_array_equal(pa, b.trainable["default"]["lora"]["params/h_0/attn/c_attn"]["lora_A"])
  assert not np.allclose(pa, c.trainable["default"]["lora"]["params/h_0/attn/c_attn"]["lora_A"])


def test_rewrapping_same_name_is_refused(model_params):
  _, params, _ = model_params
  lora = lojax.wrap(params, lojax.LoraSpec(target_modules=["c_fc"]), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"already carry an adapter named 'default'.*adapter_name="):
    lojax.wrap(lora, lojax.LoraSpec(target_modules=["c_fc"]), key=jax.random.key(0))


def test_params_holding_lora_factors_are_refused():
  params = {"l": {"kernel": jnp.ones((2, 2)), "lora_A": jnp.ones((2, 1))}}
  with pytest.raises(ValueError, match=r"already contain LoRA factors at \['l/lora_A'\]"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["l"]), key=jax.random.key(0))


def test_second_all_linear_adapter_never_nests(model_params):
  m, params, ids = model_params
  spec = lojax.LoraSpec(r=2, target_modules="all-linear", init_lora_weights=False)
  one = lojax.wrap(params, spec, key=jax.random.key(0))
  two = lojax.wrap(one, spec, key=jax.random.key(1), adapter_name="second")
  n1 = lojax.count_parameters(one).trainable
  both = lojax.set_adapter(two, ["default", "second"])
  assert lojax.count_parameters(both).trainable == 2 * n1
  assert [t.path for t in two.meta.adapter("second").targets] == \
      [t.path for t in two.meta.adapter("default").targets]
  # Outputs: base + delta1 + delta2.
  merged = lojax.merge(both)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(m.apply))(both, ids), m.apply(merged, ids),
                             rtol=1e-5, atol=1e-5)


def test_errors_for_bad_targets(model_params):
  m, params, ids = model_params
  with pytest.raises(ValueError, match=r"c_atn. matched no module path.*closest first: params/h_0/attn/c_attn"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["c_atn"]), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"ln_1.*scale"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["ln_1"]), key=jax.random.key(0))
  with pytest.raises(TypeError, match="must be a lojax.LoraSpec"):
    lojax.wrap(params, {"r": 8}, key=jax.random.key(0))


def test_unused_kernel_cannot_be_targeted():
  params = {"used": {"kernel": jnp.ones((2, 2))}, "unused": {"kernel": jnp.ones((2, 2))}}
  f = lambda p, x: x @ p["used"]["kernel"]
  with pytest.raises(ValueError, match=r"unused \(shape \(2, 2\)\): the function never reads it"):
    lojax.wrap(params, lojax.LoraSpec(target_modules=["used", "unused"]), key=jax.random.key(0),
               apply_fn=f, example_args=(jnp.ones((1, 2)),))


def test_kernel_axes_must_fit():
  params = {"l": {"kernel": jnp.ones((2, 3, 4))}}
  spec = lojax.LoraSpec(target_modules=["l"], kernel_axes={"l": (0, 1, 2)})
  with pytest.raises(ValueError, match=r"kernel_axes\['l'\]=\[0, 1, 2\]` does not fit shape \(2, 3, 4\)"):
    lojax.wrap(params, spec, key=jax.random.key(0))


def test_abstract_example_args(model_params):
  m, params, ids = model_params
  spec = lojax.LoraSpec(target_modules="all-linear")
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=m.apply,
                    example_args=(jax.ShapeDtypeStruct(ids.shape, ids.dtype),))
  assert len(lora.meta.adapters[0].targets) == 8


@pytest.mark.parametrize("tied", [False, True])
def test_all_linear_excludes_the_head(tied):
  m = gpt.GPT(tied=tied)
  params, ids = gpt.init(m)
  lora = lojax.wrap(params, lojax.LoraSpec(target_modules="all-linear"), key=jax.random.key(0),
                    apply_fn=m.apply, example_args=(ids,))
  paths = [t.path for t in lora.meta.adapters[0].targets]
  assert paths == [f"params/h_{i}/{p}" for i in range(2)
                   for p in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]
  assert lora.meta.adapters[0].heads == (() if tied else ("params/lm_head",))


def test_task_type_does_not_change_the_math(model_params):
  """CAUSAL_LM, SEQ_2_SEQ_LM, TOKEN_CLS... select the same targets with the same adapters."""
  _, params, _ = model_params
  spec = lojax.LoraSpec(r=2, target_modules="all-linear")
  plain = lojax.wrap(params, spec, key=jax.random.key(0))
  for task in ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"):
    typed = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules="all-linear", task_type=task),
                       key=jax.random.key(0))
    assert typed.meta.adapter("default").targets == plain.meta.adapter("default").targets
    for a, b in zip(jax.tree.leaves(typed.trainable), jax.tree.leaves(plain.trainable)):
      np.testing.assert_array_equal(a, b)


def test_apply_fn_is_traced_once_abstractly_with_keyword_inputs():
  """`example_kwargs` carries keyword inputs; the function runs once, on abstract values."""
  calls = []

  def fn(p, x, *, scale):
    calls.append(type(x).__name__)
    return jnp.einsum("bi,ijk->bjk", x, p["q"]["kernel"]) * scale

  params = {"q": {"kernel": jnp.ones((4, 2, 3))}}
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["q"]), key=jax.random.key(0),
                    apply_fn=fn, example_args=(jax.ShapeDtypeStruct((5, 4), jnp.float32),),
                    example_kwargs={"scale": jnp.float32(2.0)})
  assert len(calls) == 1 and calls[0] != "ArrayImpl"  # a tracer, not a computed array
  [t] = lora.meta.adapter("default").targets
  assert t.in_axes == (0,) and lora.adapters["default"]["lora"]["q"]["lora_B"].shape == (2, 2, 3)
