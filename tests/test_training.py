"""Tests for training with lojax: grads, optax, counts, bias, heads, dropout, adapters."""

import operator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gpt
import lojax

RTOL = ATOL = 1e-5   # float32 forward vs float64-merged reference


# ---------------------------------------------------------------------------
# Helpers and models
# ---------------------------------------------------------------------------

def _params(model, *args, seed=0):
  """Random params with the model's structure (eval_shape: nothing compiles).

  LayerNorm scales are 1 + noise, everything else N(0, 0.2).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(seed), *args)
  rng = np.random.default_rng(seed)

  def make(path, s):
    x = rng.normal(0.0, 0.2, s.shape) + (jax.tree_util.keystr(path).endswith("['scale']"))
    return jnp.asarray(x.astype(np.float32))

  return jax.tree_util.tree_map_with_path(make, shapes)


def _leaf(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _np_merge(params, factors, s, replace=None, add=None):
  """Plain params with W + s*A@B (NumPy float64) for 2-D kernels.

  factors: [(module path, A, B)]; replace: {leaf path: array}; add: {leaf path: delta}.
  """
  out = jax.tree.map(lambda x: np.asarray(x, np.float64), params)  # fresh dicts
  for path, a, b in factors:
    mod = _leaf(out, path)
    mod["kernel"] = mod["kernel"] + s * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  for p, x in (replace or {}).items():
    mod, leaf = p.rsplit("/", 1)
    _leaf(out, mod)[leaf] = np.asarray(x, np.float64)
  for p, d in (add or {}).items():
    mod, leaf = p.rsplit("/", 1)
    _leaf(out, mod)[leaf] = _leaf(out, mod)[leaf] + np.asarray(d, np.float64)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)


def _factors(lora, name="default"):
  return [(p, f["lora_A"], f["lora_B"]) for p, f in lora.adapters[name]["lora"].items()]


def _ce(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _changed(a, b):
  return not np.array_equal(np.asarray(a), np.asarray(b))


class Proj(nn.Module):
  """One Dense layer: the LoRA output is linear in everything, so expectations are exact."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="proj")(x)


class Classifier(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(32, 16, name="embed")(ids)
    x = jnp.tanh(nn.Dense(16, name="query")(x)).mean(axis=1)
    x = jnp.tanh(nn.Dense(16, name="dense")(x))
    return nn.Dense(3, name="classifier")(x)


GPT_KW = dict(vocab=32, d=16, heads=2, layers=1, max_len=8)
MODEL = gpt.GPT(**GPT_KW)
BIAS_PATHS = sorted(
    [f"params/h_0/{m}/bias"
     for m in ("ln_1", "attn/c_attn", "attn/c_proj", "ln_2", "mlp/c_fc", "mlp/c_proj")]
    + ["params/ln_f/bias"])


@pytest.fixture(scope="module")
def small_gpt():
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, GPT_KW["vocab"])
  return MODEL, _params(MODEL, ids), ids


@pytest.fixture(scope="module")
def apply_jit(small_gpt):
  return jax.jit(small_gpt[0].apply)


@pytest.fixture(scope="module")
def proj():
  model = Proj()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32))
  return model, _params(model, x, seed=3), x


def _loss_fn(model, ids):
  f = lojax.lorafy(model.apply)
  return lambda lora: _ce(f(lora, ids), ids)


# One spec and one jitted AdamW step shared by the GPT training tests (one compile).
STEP_SPEC = lojax.LoraSpec(r=4, lora_alpha=8, target_modules="all-linear", bias="lora_only",
                           init_lora_weights=False)
STEP_TX = optax.adamw(3e-2)
STEP_TRACES = []


@jax.jit
def _adamw_step(lora, opt_state, ids):
  STEP_TRACES.append(1)
  loss = _loss_fn(MODEL, ids)
  value, grads = jax.value_and_grad(lambda tr: loss(lora.with_trainable(tr)))(lora.trainable)
  updates, opt_state = STEP_TX.update(grads, opt_state, lora.trainable)
  new = lora.with_trainable(optax.apply_updates(lora.trainable, updates))
  return new, opt_state, value, grads


@pytest.fixture(scope="module")
def stepped(small_gpt):
  """(lora, result of one _adamw_step)."""
  _, params, ids = small_gpt
  lora = lojax.wrap(params, STEP_SPEC, key=jax.random.key(0))
  return lora, _adamw_step(lora, STEP_TX.init(lora.trainable), ids)


# ---------------------------------------------------------------------------
# Gradients and optimiser steps
# ---------------------------------------------------------------------------

def test_grads_over_trainable_match_chain_rule(small_gpt, stepped):
  _, params, ids = small_gpt
  lora, (_, _, value, grads) = stepped
  # Exactly the trainable structure: one adapter, no base leaves.
  assert jax.tree.structure(grads) == jax.tree.structure(lora.trainable)
  assert list(grads) == ["default"]
  assert len(jax.tree.leaves(grads)) == 2 * 4 + 4  # A, B and bias delta of 4 kernels
  # Reference: the plain model at W' = W + s*A@B, b' = b + delta (= b: deltas start at 0);
  # dL/dA = s*G@B^T, dL/dB = s*A^T@G, dL/d(delta) = dL/db.
  s = 8 / 4
  merged = _np_merge(params, _factors(lora), s)
  ref_value, g_ref = jax.jit(jax.value_and_grad(lambda p: _ce(MODEL.apply(p, ids), ids)))(merged)
  np.testing.assert_allclose(value, ref_value, rtol=RTOL)
  for path, a, b in _factors(lora):
    g = np.asarray(_leaf(g_ref, path + "/kernel"), np.float64)
    ga = grads["default"]["lora"][path]["lora_A"]
    gb = grads["default"]["lora"][path]["lora_B"]
    assert np.abs(ga).max() > 0 and np.abs(gb).max() > 0
    atol = 1e-4 * np.abs(g).max()
    np.testing.assert_allclose(ga, s * g @ np.asarray(b, np.float64).T, rtol=1e-3, atol=atol)
    np.testing.assert_allclose(gb, s * np.asarray(a, np.float64).T @ g, rtol=1e-3, atol=atol)
    gbias = _leaf(g_ref, path + "/bias")
    np.testing.assert_allclose(grads["default"]["bias"][path + "/bias"], gbias, rtol=1e-3,
                               atol=1e-4 * np.abs(gbias).max())


def test_jitted_adamw_step_changes_only_adapters(small_gpt, stepped):
  _, params, _ = small_gpt
  lora, (new, _, _, _) = stepped
  assert jax.tree.structure(new) == jax.tree.structure(lora)
  for x, y in zip(jax.tree.leaves(new.base), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)  # bit-identical
  old_leaves = jax.tree.leaves(lora.trainable)
  new_leaves = jax.tree.leaves(new.trainable)
  assert len(new_leaves) == 2 * 4 + 4
  assert all(_changed(x, y) for x, y in zip(new_leaves, old_leaves))


def test_short_training_run_lowers_loss_and_compiles_once(small_gpt, apply_jit, stepped):
  _, _, ids = small_gpt
  lora, (lora, opt_state, first, _) = stepped
  traces = len(STEP_TRACES)
  losses = [float(first)]
  for _ in range(30):
    trained = lora  # the loss returned by a step is the loss before its update
    lora, opt_state, loss, _ = _adamw_step(lora, opt_state, ids)
    losses.append(float(loss))
  assert len(STEP_TRACES) == traces  # 30 more steps, no retrace
  final = losses[-1]
  assert np.isfinite(final)
  assert final < 0.8 * losses[0], losses
  # The merged params reproduce the trained model's loss.
  np.testing.assert_allclose(_ce(apply_jit(lojax.merge(trained), ids), ids), final, rtol=1e-4)


# ---------------------------------------------------------------------------
# One-tree users: optax masks and labels
# ---------------------------------------------------------------------------

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="fc2")(jnp.tanh(nn.Dense(8, name="fc1")(x)))


@pytest.fixture(scope="module")
def one_tree():
  model = MLP()
  x = jnp.asarray(np.random.default_rng(4).normal(size=(5, 6)).astype(np.float32))
  params = _params(model, x, seed=4)
  spec = lojax.LoraSpec(r=2, target_modules=["fc1", "fc2"], bias="all",
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(3))
  lora = lojax.wrap(lora, spec, key=jax.random.key(4), adapter_name="inactive")
  f = lojax.lorafy(model.apply)
  grads = jax.jit(jax.grad(lambda l: jnp.sum(jnp.sin(f(l, x)))))(lora)
  return lora, grads


def test_labels_and_mask_mark_exactly_the_active_adapters(one_tree):
  lora, _ = one_tree
  labels = lojax.partition_labels(lora)
  mask = lojax.trainable_mask(lora)
  for tree in (labels, mask):
    assert jax.tree.structure(tree) == jax.tree.structure(lora)
  assert set(jax.tree.leaves(labels.base)) == {"frozen"}
  assert set(jax.tree.leaves(labels.adapters["inactive"])) == {"frozen"}
  assert set(jax.tree.leaves(labels.adapters["default"])) == {"trainable"}
  assert set(jax.tree.leaves(mask.base)) == {False}
  assert set(jax.tree.leaves(mask.adapters["inactive"])) == {False}
  assert set(jax.tree.leaves(mask.adapters["default"])) == {True}
  # After set_adapter the labels follow the active adapter.
  switched = lojax.partition_labels(lojax.set_adapter(lora, "inactive"))
  assert set(jax.tree.leaves(switched.adapters["inactive"])) == {"trainable"}
  assert set(jax.tree.leaves(switched.adapters["default"])) == {"frozen"}


def _check_one_tree_update(lora, grads, updates):
  new = optax.apply_updates(lora, updates)
  for x, y in zip(jax.tree.leaves(new.base), jax.tree.leaves(lora.base)):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(new.adapters["inactive"]),
                  jax.tree.leaves(lora.adapters["inactive"])):
    np.testing.assert_array_equal(x, y)
  assert all(_changed(x, y) for x, y in zip(jax.tree.leaves(new.adapters["default"]),
                                            jax.tree.leaves(lora.adapters["default"])))
  # The trainable part got exactly adam's update computed on lora.trainable alone.
  adam = optax.adam(1e-2)
  ref, _ = jax.jit(adam.update)({"default": grads.adapters["default"]},
                                adam.init(lora.trainable))
  for x, y in zip(jax.tree.leaves(updates.adapters["default"]), jax.tree.leaves(ref)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)


def test_multi_transform_with_partition_labels(one_tree):
  lora, grads = one_tree
  # The base is frozen by construction: jax.grad over the whole tree gives
  # exactly zero base gradients (lorafy stops them) ...
  assert all(not np.any(g) for g in jax.tree.leaves(grads.base))
  tx = optax.multi_transform({"trainable": optax.adam(1e-2), "frozen": optax.set_to_zero()},
                             lojax.partition_labels(lora))
  updates, _ = jax.jit(tx.update)(grads, tx.init(lora), lora)
  # ... and the "frozen" label keeps the base out of the optimizer too.
  _check_one_tree_update(lora, grads, updates)


def test_trainable_mask_with_optax_masked(one_tree):
  lora, grads = one_tree
  mask = lojax.trainable_mask(lora)
  frozen = jax.tree.map(operator.not_, mask)
  tx = optax.chain(optax.masked(optax.adam(1e-2), mask),
                   optax.masked(optax.set_to_zero(), frozen))
  updates, _ = jax.jit(tx.update)(grads, tx.init(lora), lora)
  _check_one_tree_update(lora, grads, updates)


def test_optax_masked_alone_keeps_base_frozen(one_tree):
  lora, grads = one_tree
  tx = optax.masked(optax.adam(1e-2), lojax.trainable_mask(lora))
  updates, _ = jax.jit(tx.update)(grads, tx.init(lora), lora)
  _check_one_tree_update(lora, grads, updates)


# ---------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------

def test_count_parameters_small_dict_model(capsys):
  params = {"d1": {"kernel": jnp.ones((5, 7)), "bias": jnp.ones(7)},
            "d2": {"kernel": jnp.ones((7, 3)), "bias": jnp.ones(3)}}
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["d1", "d2"]),
                    key=jax.random.key(0))
  c = lojax.count_parameters(lora)
  assert isinstance(c, lojax.ParameterCount)
  trainable = 2 * (5 + 7) + 2 * (7 + 3)          # 44
  base = 5 * 7 + 7 + 7 * 3 + 3                   # 66
  assert (c.trainable, c.total) == (trainable, base + trainable)  # 44, 110
  assert c.percent == pytest.approx(40.0)
  lojax.print_trainable_parameters(lora)
  assert capsys.readouterr().out == (
      "trainable params: 44 || all params: 110 || trainable%: 40.0000\n")
  # An inactive second adapter counts in "all" but not in "trainable".
  lora2 = lojax.wrap(lora, lojax.LoraSpec(r=1, target_modules=["d1"]), key=jax.random.key(1),
                     adapter_name="b")
  c2 = lojax.count_parameters(lora2)
  assert (c2.trainable, c2.total) == (44, 110 + (5 + 7))
  c3 = lojax.count_parameters(lojax.set_adapter(lora2, "b"))
  assert (c3.trainable, c3.total) == (12, 122)


def test_count_parameters_gpt_with_modules_to_save(small_gpt, capsys):
  _, params, _ = small_gpt
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules="all-linear",
                                           modules_to_save=["lm_head"]), key=jax.random.key(0))
  d, v, m = 16, 32, 8
  per_layer_lora = 2 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))       # 512
  per_layer_base = (2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d
                    + (d * 4 * d + 4 * d) + (4 * d * d + d))                    # 3280
  base = v * d + m * d + per_layer_base + 2 * d + d * v                          # 4464
  trainable = per_layer_lora + d * v                                             # 1024
  c = lojax.count_parameters(lora)
  assert (c.trainable, c.total) == (trainable, base + trainable) == (1024, 5488)
  assert c.percent == pytest.approx(100 * 1024 / 5488)
  lojax.print_trainable_parameters(lora)
  assert capsys.readouterr().out == (
      "trainable params: 1,024 || all params: 5,488 || trainable%: 18.6589\n")


# ---------------------------------------------------------------------------
# bias modes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode,expected", [
    ("none", []),
    ("lora_only", ["params/h_0/attn/c_attn/bias"]),
    ("all", BIAS_PATHS),
])
def test_bias_mode_selects_bias_paths(small_gpt, mode, expected):
  _, params, _ = small_gpt
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["c_attn"], bias=mode),
                    key=jax.random.key(0))
  assert sorted(lora.trainable["default"]["bias"]) == expected
  assert lora.meta.adapters[0].bias_paths == tuple(expected)
  for p, d in lora.trainable["default"]["bias"].items():
    assert d.shape == _leaf(params, p).shape
    np.testing.assert_array_equal(d, 0.0)  # deltas start at zero
  labels = lojax.partition_labels(lora)
  assert set(labels.adapters["default"]["bias"].values()) <= {"trainable"}


def test_bias_delta_changes_output_exactly(small_gpt, apply_jit):
  model, params, ids = small_gpt
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["c_fc"], bias="all",
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(5))
  rng = np.random.default_rng(0)
  tr = jax.tree.map(lambda x: x, lora.trainable)
  deltas = {p: jnp.asarray(rng.normal(0, 0.5, np.shape(_leaf(params, p))).astype(np.float32))
            for p in ("params/h_0/mlp/c_fc/bias", "params/h_0/ln_2/bias", "params/ln_f/bias")}
  tr["default"]["bias"].update(deltas)
  lora = lora.with_trainable(tr)
  ref = apply_jit(_np_merge(params, _factors(lora), 2.0, add=deltas), ids)
  without = apply_jit(_np_merge(params, _factors(lora), 2.0), ids)
  assert np.abs(np.asarray(ref) - np.asarray(without)).max() > 1e-2
  out = jax.jit(lojax.lorafy(model.apply))(lora, ids)
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# modules_to_save and classification heads
# ---------------------------------------------------------------------------

def test_modules_to_save_lm_head(small_gpt, apply_jit):
  model, params, ids = small_gpt
  spec = lojax.LoraSpec(r=2, lora_alpha=2, target_modules="all-linear",
                        modules_to_save=["lm_head"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(6))
  assert "params/lm_head" not in lora.adapters["default"]["lora"]
  saved = lora.trainable["default"]["modules_to_save"]
  assert list(saved) == ["params/lm_head/kernel"]
  np.testing.assert_array_equal(saved["params/lm_head/kernel"],
                                params["params"]["lm_head"]["kernel"])
  new_head = saved["params/lm_head/kernel"] + 0.5
  tr = jax.tree.map(lambda x: x, lora.trainable)
  tr["default"]["modules_to_save"]["params/lm_head/kernel"] = new_head
  lora = lora.with_trainable(tr)
  ref = apply_jit(_np_merge(params, _factors(lora), 1.0,
                            replace={"params/lm_head/kernel": new_head}), ids)
  out = jax.jit(lojax.lorafy(model.apply))(lora, ids)
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(lora.base["params"]["lm_head"]["kernel"],
                                params["params"]["lm_head"]["kernel"])


def test_seq_cls_classifier_head_is_saved_not_adapted():
  model = Classifier()
  ids = jax.random.randint(jax.random.key(7), (4, 5), 0, 32)
  params = _params(model, ids, seed=7)
  spec = lojax.LoraSpec(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS",
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(8))
  assert [t.path for t in lora.meta.adapters[0].targets] == ["params/dense", "params/query"]
  assert lora.meta.adapters[0].modules_to_save == ("params/classifier",)
  saved = lora.trainable["default"]["modules_to_save"]
  assert sorted(saved) == ["params/classifier/bias", "params/classifier/kernel"]
  # Without task_type the head is still not a target, but nothing is saved.
  plain = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules="all-linear"),
                     key=jax.random.key(8))
  assert "params/classifier" not in plain.adapters["default"]["lora"]
  assert plain.adapters["default"]["modules_to_save"] == {}

  # Changing the copy changes the output as the plain model with that copy would.
  tr = jax.tree.map(lambda x: x, lora.trainable)
  new = {k: v + 0.3 for k, v in saved.items()}
  tr["default"]["modules_to_save"] = new
  lora = lora.with_trainable(tr)
  ref = jax.jit(model.apply)(_np_merge(params, _factors(lora), 2.0, replace=new), ids)
  f = lojax.lorafy(model.apply)
  np.testing.assert_allclose(jax.jit(f)(lora, ids), ref, rtol=RTOL, atol=ATOL)

  # The copy is trainable; the base head is untouched.
  labels = lojax.partition_labels(lora)
  assert set(labels.adapters["default"]["modules_to_save"].values()) == {"trainable"}
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(lora.base["params"]["classifier"][k],
                                  params["params"]["classifier"][k])


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------

def test_dropout_needs_rng_or_deterministic(proj):
  model, params, x = proj
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["proj"], lora_dropout=0.5),
                    key=jax.random.key(0))
  f = lojax.lorafy(model.apply)
  with pytest.raises(ValueError, match=r"lora_dropout=0\.5.*lora_rng=key.*lora_deterministic"):
    f(lora, x)
  with pytest.raises(ValueError, match=r"lora_dropout=0\.5"):
    jax.jit(f)(lora, x)


def test_dropout_deterministic_equals_no_dropout(proj):
  model, params, x = proj
  kw = dict(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
  drop = lojax.wrap(params, lojax.LoraSpec(lora_dropout=0.5, **kw), key=jax.random.key(0))
  nodrop = lojax.wrap(params, lojax.LoraSpec(**kw), key=jax.random.key(0))
  fd, fn = drop.adapters["default"]["lora"]["params/proj"], nodrop.adapters["default"]["lora"][
      "params/proj"]
  np.testing.assert_array_equal(fd["lora_B"], fn["lora_B"])
  f = lojax.lorafy(model.apply)
  ref = model.apply(_np_merge(params, _factors(drop), 2.0), x)
  det = lambda l, x: f(l, x, lora_deterministic=True)
  for g in (det, jax.jit(det)):
    np.testing.assert_allclose(g(drop, x), ref, rtol=RTOL, atol=ATOL)
  for g in (f, jax.jit(f)):
    np.testing.assert_allclose(g(nodrop, x), ref, rtol=RTOL, atol=ATOL)


def test_dropout_with_zero_b_leaves_base_output_exactly(proj):
  model, params, x = proj
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["proj"], lora_dropout=0.5),
                    key=jax.random.key(0))  # default init: B = 0
  np.testing.assert_array_equal(lora.adapters["default"]["lora"]["params/proj"]["lora_B"], 0.0)
  base = model.apply(params, x)
  f = lojax.lorafy(model.apply)
  for seed in range(3):
    np.testing.assert_array_equal(f(lora, x, lora_rng=jax.random.key(seed)), base)
    np.testing.assert_array_equal(jax.jit(f)(lora, x, lora_rng=jax.random.key(seed)), base)


def test_dropout_is_random_and_unbiased(proj):
  model, params, x = proj
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, lora_alpha=8, target_modules=["proj"],
                                           lora_dropout=0.5, init_lora_weights=False),
                    key=jax.random.key(0))
  f = lojax.lorafy(model.apply)
  base = np.asarray(model.apply(params, x), np.float64)
  det = np.asarray(f(lora, x, lora_deterministic=True), np.float64)
  o1 = f(lora, x, lora_rng=jax.random.key(1))
  o2 = f(lora, x, lora_rng=jax.random.key(2))
  assert np.abs(np.asarray(o1) - np.asarray(o2)).max() > 1e-2
  assert np.abs(np.asarray(o1) - det).max() > 1e-2
  # Same key, same mask: jit and eager agree.
  np.testing.assert_allclose(jax.jit(f)(lora, x, lora_rng=jax.random.key(1)), o1,
                             rtol=RTOL, atol=ATOL)
  # Mean over many masks: the adapter contribution is unbiased (scaled by 1/keep).
  # For this linear model E[out] = det exactly; with 2000 samples the relative error
  # of the mean is ~3% (an unscaled dropout would be off by 50%).
  keys = jax.random.split(jax.random.key(42), 2000)
  outs = jax.jit(jax.vmap(lambda k: f(lora, x, lora_rng=k)))(keys)
  mean_delta = np.asarray(outs, np.float64).mean(0) - base
  rel = np.linalg.norm(mean_delta - (det - base)) / np.linalg.norm(det - base)
  assert rel < 0.08, rel
  # The base path is not dropped: every sample keeps x@W + b.
  assert np.abs(np.asarray(outs[0], np.float64) - base).max() < 10 * np.abs(det - base).max()


def test_dropout_inside_scan_model():
  model = gpt.GPT(scan=True, **{**GPT_KW, "layers": 2})
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, GPT_KW["vocab"])
  params = _params(model, ids, seed=9)
  kw = dict(apply_fn=model.apply, example_args=(ids,))
  spec = lojax.LoraSpec(r=2, target_modules=["c_fc"], lora_dropout=0.5,
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0), **kw)
  assert [(t.path, t.stacked) for t in lora.meta.adapters[0].targets] == [("params/h/mlp/c_fc", 2)]
  f = jax.jit(lojax.lorafy(model.apply))
  apply = jax.jit(model.apply)
  det = jax.jit(lambda l, x: lojax.lorafy(model.apply)(l, x, lora_deterministic=True))(lora, ids)
  np.testing.assert_allclose(det, apply(lojax.merge(lora), ids), rtol=RTOL, atol=ATOL)
  o1 = f(lora, ids, lora_rng=jax.random.key(1))
  o2 = f(lora, ids, lora_rng=jax.random.key(2))
  assert np.all(np.isfinite(o1))
  assert np.abs(np.asarray(o1) - np.asarray(o2)).max() > 1e-3
  assert np.abs(np.asarray(o1) - np.asarray(det)).max() > 1e-3
  np.testing.assert_array_equal(f(lora, ids, lora_rng=jax.random.key(1)), o1)  # reproducible
  # B = 0: dropout only touches the adapter input, the base output is unchanged.
  zero = lora.with_trainable(jax.tree.map(lambda x: x, lora.trainable))
  for fac in zero.adapters["default"]["lora"].values():
    fac["lora_B"] = jnp.zeros_like(fac["lora_B"])
  np.testing.assert_allclose(f(zero, ids, lora_rng=jax.random.key(1)), apply(params, ids),
                             rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Several adapters
# ---------------------------------------------------------------------------

def test_set_adapter(proj):
  model, params, x = proj
  spec = lojax.LoraSpec(r=2, lora_alpha=3, target_modules=["proj"], init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  two = lojax.wrap(lora, spec, key=jax.random.key(1), adapter_name="b")
  (_, a0, b0), = _factors(two, "default")
  (_, a1, b1), = _factors(two, "b")
  assert _changed(a0, a1) and _changed(b0, b1)
  s = 1.5
  f = lojax.lorafy(model.apply)
  out_default = model.apply(_np_merge(params, [("params/proj", a0, b0)], s), x)
  out_b = model.apply(_np_merge(params, [("params/proj", a1, b1)], s), x)
  out_both = model.apply(_np_merge(params, [("params/proj", a0, b0), ("params/proj", a1, b1)],
                                   s), x)

  # The new adapter starts inactive: not trainable, not applied.
  assert two.meta.active == ("default",) and list(two.trainable) == ["default"]
  np.testing.assert_allclose(f(two, x), out_default, rtol=RTOL, atol=ATOL)

  only_b = lojax.set_adapter(two, "b")
  assert list(only_b.trainable) == ["b"]
  for g in (f, jax.jit(f)):
    np.testing.assert_allclose(g(only_b, x), out_b, rtol=RTOL, atol=ATOL)
  grads = jax.grad(lambda t: jnp.sum(f(only_b.with_trainable(t), x) ** 2))(only_b.trainable)
  assert list(grads) == ["b"]

  both = lojax.set_adapter(two, ["default", "b"])
  assert sorted(both.trainable) == ["b", "default"]
  for g in (f, jax.jit(f)):
    np.testing.assert_allclose(g(both, x), out_both, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(model.apply(lojax.merge(both), x), out_both, rtol=RTOL, atol=ATOL)

  with pytest.raises(ValueError, match=r"Unknown adapter names \['zzz'\].*\['default', 'b'\]"):
    lojax.set_adapter(two, ["default", "zzz"])
  with pytest.raises(ValueError, match=r"repeated"):
    lojax.set_adapter(two, ["b", "b"])
  with pytest.raises(ValueError, match=r"already carr.*'b'"):
    lojax.wrap(two, spec, key=jax.random.key(2), adapter_name="b")
  with pytest.raises(ValueError, match=r"already carr.*'default'"):
    lojax.wrap(lora, spec, key=jax.random.key(2))


def test_training_one_adapter_leaves_the_other_alone(proj):
  model, params, x = proj
  spec = lojax.LoraSpec(r=2, target_modules=["proj"], init_lora_weights=False)
  two = lojax.wrap(lojax.wrap(params, spec, key=jax.random.key(0)), spec,
                   key=jax.random.key(1), adapter_name="b")
  only_b = lojax.set_adapter(two, "b")
  f = lojax.lorafy(model.apply)
  g = jax.grad(lambda t: jnp.sum(f(only_b.with_trainable(t), x) ** 2))(only_b.trainable)
  new = only_b.with_trainable(jax.tree.map(lambda p, d: p - 0.1 * d, only_b.trainable, g))
  for k in ("lora_A", "lora_B"):
    np.testing.assert_array_equal(new.adapters["default"]["lora"]["params/proj"][k],
                                  two.adapters["default"]["lora"]["params/proj"][k])
    assert _changed(new.adapters["b"]["lora"]["params/proj"][k],
                    two.adapters["b"]["lora"]["params/proj"][k])


# ---------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------

def test_jitted_train_step_traces_once(proj):
  model, params, x = proj
  spec = lojax.LoraSpec(r=2, target_modules=["proj"], lora_dropout=0.1, bias="all")
  lora = lojax.wrap(params, spec, key=jax.random.key(0))
  tx = optax.adamw(1e-2)
  f = lojax.lorafy(model.apply)
  traces = []

  @jax.jit
  def step(lora, opt_state, rng):
    traces.append(1)
    loss = lambda t: jnp.mean(f(lora.with_trainable(t), x, lora_rng=rng) ** 2)
    l, g = jax.value_and_grad(loss)(lora.trainable)
    updates, opt_state = tx.update(g, opt_state, lora.trainable)
    return lora.with_trainable(optax.apply_updates(lora.trainable, updates)), opt_state, l

  opt_state = tx.init(lora.trainable)
  losses = []
  for i in range(5):
    lora, opt_state, l = step(lora, opt_state, jax.random.key(i))
    losses.append(float(l))
  assert len(traces) == 1
  assert len(set(losses)) == 5  # the steps did run on changing values
  # A freshly wrapped tree with an equal (not identical) spec has equal static
  # metadata: no retrace either.
  fresh = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["proj"], lora_dropout=0.1,
                                            bias="all"), key=jax.random.key(7))
  step(fresh, tx.init(fresh.trainable), jax.random.key(9))
  assert len(traces) == 1


def test_a_step_returning_the_whole_lora_writes_a_copy_of_the_base():
  """Why the quickstart's step returns only the trained part (README, Quickstart)."""
  params = {"d": {"kernel": jnp.ones((256, 256))}}
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["d"]), key=jax.random.key(0))
  bump = lambda t: jax.tree.map(lambda x: x + 1, t)
  whole = jax.jit(lambda lo: lo.with_trainable(bump(lo.trainable)))
  part = jax.jit(lambda lo: bump(lo.trainable))
  base_bytes = params["d"]["kernel"].nbytes
  assert whole.lower(lora).compile().memory_analysis().output_size_in_bytes >= base_bytes
  assert part.lower(lora).compile().memory_analysis().output_size_in_bytes < base_bytes // 10
  out = whole(lora)
  assert (out.base["d"]["kernel"].unsafe_buffer_pointer()
          != params["d"]["kernel"].unsafe_buffer_pointer())  # a new buffer: the copy
