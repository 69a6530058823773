"""Bad input gets lojax's own error naming the argument (issue 21 item 1).

Each case is one the fuzzer of issue 21 found crashing with a foreign exception
(AttributeError, KeyError, ZeroDivisionError, JAX's own TypeError) or passing
silently. The error must be a ValueError or TypeError raised in lojax's code,
and its message must name the argument.
"""

import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lojax

PARAMS = {"params": {"d": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
                     "e": {"kernel": jnp.ones((3, 2))}}}
SPEC = lojax.LoraSpec(r=2, target_modules=["d"])


def lora():
  return lojax.wrap(PARAMS, SPEC, key=jax.random.key(0))


def raised_by_lojax(excinfo):
  where = traceback.extract_tb(excinfo.tb)[-1].filename
  assert "/lojax/" in where, f"raised in {where}, not by lojax"


CASES = {
    "wrap key=None": (lambda: lojax.wrap(PARAMS, SPEC, key=None), TypeError, "`key`"),
    "wrap key=0": (lambda: lojax.wrap(PARAMS, SPEC, key=0), TypeError, "`key`"),
    "wrap adapter_name=5": (lambda: lojax.wrap(PARAMS, SPEC, key=jax.random.key(0),
                                               adapter_name=5), TypeError, "`adapter_name`"),
    "wrap dtype='junk'": (lambda: lojax.wrap(PARAMS, SPEC, key=jax.random.key(0), dtype="junk"),
                          TypeError, "`dtype`"),
    "wrap dtype=int32": (lambda: lojax.wrap(PARAMS, SPEC, key=jax.random.key(0),
                                            dtype=jnp.int32), TypeError, "`dtype`"),
    "wrap apply_fn=5": (lambda: lojax.wrap(PARAMS, SPEC, key=jax.random.key(0), apply_fn=5),
                        TypeError, "`apply_fn`"),
    "wrap bare example_args": (lambda: lojax.wrap(PARAMS, SPEC, key=jax.random.key(0),
                                                  apply_fn=lambda p, x: x,
                                                  example_args=jnp.ones(3)),
                               TypeError, "`example_args`"),
    "wrap int kernel": (lambda: lojax.wrap({"d": {"kernel": jnp.ones((4, 3), jnp.int32)}}, SPEC,
                                           key=jax.random.key(0)), ValueError, "int32 values"),
    "wrap bool kernel": (lambda: lojax.wrap({"d": {"kernel": jnp.ones((4, 3), bool)}}, SPEC,
                                            key=jax.random.key(0)), ValueError, "bool values"),
    "wrap zero-size kernel": (lambda: lojax.wrap({"d": {"kernel": jnp.ones((0, 3))}}, SPEC,
                                                 key=jax.random.key(0)), ValueError, "zero-size"),
    "lorafy lora_rng=0": (lambda: lojax.lorafy(lambda p, x: x @ p["params"]["d"]["kernel"])(
        lora(), jnp.ones((2, 4)), lora_rng=0), TypeError, "`lora_rng`"),
    "lorafy lora_deterministic='no'": (
        lambda: lojax.lorafy(lambda p, x: x @ p["params"]["d"]["kernel"])(
            lora(), jnp.ones((2, 4)), lora_deterministic="no"), TypeError, "`lora_deterministic`"),
    "unmerge another tree": (lambda: lojax.unmerge(lora(), {"params": {"x": jnp.ones(3)}}),
                             ValueError, "params/d/kernel: missing"),
    "unmerge wrong shape": (lambda: lojax.unmerge(lora(), jax.tree.map(
        lambda x: jnp.ones((1,) + x.shape), PARAMS)), ValueError, "shape"),
    "with_trainable extra target": (lambda: (lambda l: l.with_trainable({"default": {
        **l.trainable["default"], "lora": {**l.trainable["default"]["lora"], "params/e": {
            "lora_A": jnp.ones((3, 2)), "lora_B": jnp.ones((2, 2))}}}}))(lora()),
        ValueError, "adds \\['lora/params/e"),
    "AdaLoraSpec orth_reg_weight=nan": (lambda: lojax.AdaLoraSpec(
        init_r=4, target_r=2, total_step=10, target_modules=["d"], orth_reg_weight=float("nan")),
        ValueError, "`orth_reg_weight`"),
    "AdaLoraSpec lists the shared fields too": (lambda: lojax.AdaLoraSpec(
        init_r=-3, target_r=2, total_step=10, target_modules=5), ValueError,
        "`init_r`(.|\n)*`target_modules`"),
}
for fn_name in ("set_adapter", "delete_adapter", "count_parameters", "trainable_mask",
                "partition_labels", "disable_adapters", "adapter_ids", "add_weighted_adapter",
                "print_trainable_parameters", "merge"):
  fn = getattr(lojax, fn_name)
  args = {"set_adapter": ("default",), "delete_adapter": ("default",), "adapter_ids": (["a"],),
          "add_weighted_adapter": (["default"], [1.0], "m")}.get(fn_name, ())
  CASES[f"{fn_name} on a dict"] = (lambda fn=fn, args=args: fn({"a": 1}, *args), TypeError,
                                   "`lora` must be the LoraParams")
CASES["save_peft on a dict"] = (lambda: lojax.save_peft("/tmp/never", {"a": 1}), TypeError,
                                "`lora` must be the LoraParams")


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_lojax_s_own_error(name):
  call, kind, match = CASES[name]
  with pytest.raises(kind, match=match) as e:
    call()
  raised_by_lojax(e)


def test_good_input_still_works():
  """The checks accept what users pass: legacy uint32 keys, NumPy scalars, bfloat16 adapters."""
  lojax.wrap(PARAMS, SPEC, key=jax.random.PRNGKey(0), dtype=jnp.bfloat16, adapter_name="x")
  spec = lojax.LoraSpec(r=np.int64(2), lora_alpha=np.float32(4), target_modules=["d"])
  assert type(spec.r) is int and type(spec.lora_alpha) is float
  l = lora()
  out = lojax.lorafy(lambda p, x: x @ p["params"]["d"]["kernel"])(
      l, jnp.ones((2, 4)), lora_rng=jax.random.key(1), lora_deterministic=np.bool_(True))
  assert out.shape == (2, 3)
  np.testing.assert_allclose(lojax.unmerge(l, lojax.merge(l))["params"]["d"]["kernel"],
                             PARAMS["params"]["d"]["kernel"])
