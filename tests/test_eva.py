"""EVA initialisation (``lojax.eva_init``, PEFT's ``init_lora_weights="eva"``).

* PEFT live (skipped without torch/peft): a tiny torch MLP and the tiny GPT-2
  of ``tests/test_peft_oracle.py`` (right-padded batches, PEFT's default
  attention-mask handling against ``token_mask``) get the same per-layer ranks
  and alphas, and the same ``lora_A`` rows up to sign. PEFT's IncrementalPCA
  truncates to the kept components after each batch and uses a randomized
  SVD; lojax's PCA is exact for the data each kernel saw, so the rows agree to
  |cos| >= 0.999 on a clear spectrum (the MLP) and >= 0.98 on GPT-2's flat one.
* NumPy (float64) references: the components of a dense and an N-D kernel are
  the right-singular vectors of the stacked, masked, centered inputs of the
  batches seen before convergence; the convergence and redistribution rules on
  constructed data.
* Stacked kernels (``nn.scan``, rho = 1): each layer gets its unrolled twin's components.
* Memory: the jitted statistics step holds no kernel-sized ``[in, out]`` buffer.
* PEFT files: lojax's EVA adapter loads in PEFT with its ranks and alphas, and back.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lojax
from lojax._src import eva


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------

def ref_pca(x: np.ndarray, k: int):
  """(components [k, C], singular values [k], explained-variance ratios [k]) of rows ``x``."""
  xc = x - x.mean(0)
  _, s, vh = np.linalg.svd(xc, full_matrices=False)
  return vh[:k], s[:k], s[:k] ** 2 / np.sum(xc ** 2)


def assert_rows(got: np.ndarray, want: np.ndarray, tol: float):
  """Rows equal up to sign: |cos| >= 1 - tol and equal norms (to tol)."""
  assert got.shape == want.shape, (got.shape, want.shape)
  cos = np.abs(np.sum(got * want, 1)) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
  assert cos.min() >= 1 - tol, cos
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=tol)


def rows_of(lora, path):
  """lojax's lora_A of ``path`` as PEFT's rows ``[r, fan_in]``."""
  a = np.asarray(lora.adapters["default"]["lora"][path]["lora_A"], np.float64)
  return a.reshape(-1, a.shape[-1]).T


def spectrum(rng, n_in, decay, scale=1.0):
  return rng.standard_normal((n_in, n_in)) * (scale * decay ** np.arange(n_in))[:, None]


def mlp(p, x):
  h = jnp.tanh(x @ p["a"]["kernel"])
  return h @ p["b"]["kernel"]


def mlp_params(rng, n_in=8, n_hid=6, n_out=5):
  return {"a": {"kernel": jnp.asarray(rng.standard_normal((n_in, n_hid)), jnp.float32)},
          "b": {"kernel": jnp.asarray(rng.standard_normal((n_hid, n_out)), jnp.float32)}}


def test_components_are_the_pca_of_the_masked_inputs_seen():
  """Dense kernels: batches 1 and 2 converge (tau 0.5, a clear spectrum); batch 3, very
  different, is never seen; padding tokens are dropped; whiten divides by sqrt(S)."""
  rng = np.random.default_rng(0)
  params = mlp_params(rng)
  params["a"]["kernel"] = params["a"]["kernel"] * 0.1   # b's input keeps a clear spectrum
  mix = spectrum(rng, 8, 0.5, 3.0)
  xs = [rng.standard_normal((3, 10, 8)) @ mix + 2.0 for _ in range(2)]   # mean != 0
  xs.append(100.0 * rng.standard_normal((3, 10, 8)))
  masks = [rng.random((3, 10)) < 0.7 for _ in xs]
  batches = [{"x": jnp.asarray(x, jnp.float32), "mask": jnp.asarray(m)} for x, m in zip(xs, masks)]
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["a", "b"]), key=jax.random.key(0))
  for whiten in (False, True):
    out = lojax.eva_init(lora, lambda p, b: mlp(p, b["x"]), batches, token_mask=lambda b: b["mask"],
                         eva_config={"rho": 1.0, "tau": 0.5, "whiten": whiten})
    seen = np.concatenate([x[m] for x, m in zip(xs[:2], masks[:2])])
    hidden = np.tanh(seen @ np.asarray(params["a"]["kernel"], np.float64))
    for path, x in (("a", seen), ("b", hidden)):
      u, s, _ = ref_pca(x, 2)
      assert_rows(rows_of(out, path), u / np.sqrt(s)[:, None] if whiten else u, 1e-4)
      assert not np.any(np.asarray(out.adapters["default"]["lora"][path]["lora_B"]))
  # B = 0: the model is unchanged.
  np.testing.assert_allclose(jax.jit(lojax.lorafy(lambda p, b: mlp(p, b["x"])))(out, batches[0]),
                             mlp(params, batches[0]["x"]), rtol=1e-6)


def test_nd_kernel_components_follow_its_input_axes():
  """An attention-output kernel [heads, head_dim, d] (two input axes): its components are
  the PCA of the input flattened in the kernel's (heads, head_dim) order."""
  rng = np.random.default_rng(1)
  params = {"q": {"kernel": jnp.asarray(rng.standard_normal((6, 2, 3)), jnp.float32)},
            "o": {"kernel": jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)}}

  def f(p, x):
    h = jnp.einsum("btd,dhk->bthk", x, p["q"]["kernel"])
    # the input's axes in another order than the kernel's: (k, h)
    return jnp.einsum("btkh,hko->bto", jnp.swapaxes(jnp.sin(h), 2, 3), p["o"]["kernel"])

  xs = [rng.standard_normal((2, 12, 6)) @ spectrum(rng, 6, 0.4, 2.0) for _ in range(3)]
  spec = lojax.LoraSpec(r=2, target_modules=["q", "o"])
  lora = lojax.wrap(params, spec, key=jax.random.key(0), apply_fn=f,
                    example_args=(jnp.zeros((2, 12, 6)),))
  out = lojax.eva_init(lora, f, [jnp.asarray(x, jnp.float32) for x in xs],
                       eva_config={"rho": 1.0, "tau": 0.0})
  seen = np.concatenate([x.reshape(-1, 6) for x in xs[:2]])
  h = np.sin(np.einsum("nd,dhk->nhk", seen, np.asarray(params["q"]["kernel"], np.float64)))
  assert_rows(rows_of(out, "q"), ref_pca(seen, 2)[0], 1e-4)
  assert_rows(rows_of(out, "o"), ref_pca(h.reshape(-1, 6), 2)[0], 1e-4)
  assert out.adapters["default"]["lora"]["o"]["lora_A"].shape == (2, 3, 2)


def test_rank_distribution_rule():
  ratios = {"a": [0.5, 0.3, 0.1, 0.05], "b": [0.4, 0.2, 0.01, 0.001]}
  assert eva.rank_distribution(ratios, 4, {}) == {"a": 2, "b": 2}
  ratios = {"a": [0.5, 0.45, 0.4, 0.35], "b": [0.1, 0.05, 0.01, 0.0]}
  assert eva.rank_distribution(ratios, 4, {}) == {"a": 4, "b": 0}
  assert eva.rank_distribution(ratios, 5, {}) == {"a": 4, "b": 1}
  # ties go in the order given; a kernel sharing another's input: the one holding the
  # statistics ("a") keeps the larger rank
  same = {"a": [0.3, 0.2], "b": [0.3, 0.2], "c": [0.25, 0.0]}
  assert eva.rank_distribution(same, 3, {}) == {"a": 1, "b": 1, "c": 1}
  assert eva.rank_distribution({"b": [0.3, 0.2], "a": [0.3, 0.2]}, 3, {"b": "a"}) == {
      "b": 1, "a": 2}


def test_redistribution_end_to_end_drops_a_rank_zero_kernel():
  """Kernel a's input has 4 strong directions (ratios ~0.25), b's is isotropic (ratios
  ~1/6): the budget (2 + 2) goes to a (rank 4, alpha scaled by 4/2); b is no longer
  adapted."""
  rng = np.random.default_rng(2)
  params = mlp_params(rng)
  basis = np.linalg.qr(rng.standard_normal((8, 8)))[0]
  batches = [{"x": jnp.asarray(rng.standard_normal((256, 8)) * [4, 3.9, 3.8, 3.7, .1, .1, .1, .1]
                               @ basis.T, jnp.float32),
              "z": jnp.asarray(rng.standard_normal((256, 6)), jnp.float32)} for _ in range(4)]

  def f(p, b):
    return b["x"] @ p["a"]["kernel"], b["z"] @ p["b"]["kernel"]

  lora = lojax.wrap(params, lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["a", "b"]),
                    key=jax.random.key(0))
  out = lojax.eva_init(lora, f, batches, eva_config={"rho": 2.0, "tau": 0.0})
  (t,) = out.meta.adapter("default").targets
  assert (t.path, t.r, t.alpha, t.scaling) == ("a", 4, 8.0, 2.0)
  assert set(out.adapters["default"]["lora"]) == {"a"}
  for got, want in zip(jax.jit(lojax.lorafy(f))(out, batches[0]), f(params, batches[0])):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # without adjust_scaling_factors alpha stays, so the scaling changes
  out = lojax.eva_init(lora, f, batches,
                       eva_config={"rho": 2.0, "tau": 0.0, "adjust_scaling_factors": False})
  (t,) = out.meta.adapter("default").targets
  assert (t.r, t.alpha, t.scaling) == (4, 4.0, 1.0)


def test_convergence_rule():
  """A kernel converges when each kept component's cosine with the previous batch's is
  >= tau; it then stops collecting. tau = 1 on noisy data never converges."""
  rng = np.random.default_rng(3)
  mix = spectrum(rng, 5, 0.3, 1.0)
  k = eva._Kernel(2, 0.99)
  x1 = rng.standard_normal((200, 5)) @ mix
  k.update(*eva.batch_moments(jnp.asarray(x1)))
  assert not k.converged.any()          # nothing to compare with yet
  k.update(*eva.batch_moments(jnp.asarray(rng.standard_normal((200, 5)) @ mix)))
  assert k.converged.all()
  k.update(*eva.batch_moments(jnp.asarray(rng.standard_normal((200, 5)) * 10)))
  assert not k.converged.all()          # a different distribution moves the components
  small = eva._Kernel(3, 0.5)           # a batch with fewer tokens than components is skipped
  small.update(*eva.batch_moments(jnp.asarray(x1[:2])))
  assert small.components is None
  params = mlp_params(rng, n_in=5)
  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["a"]), key=jax.random.key(0))
  noisy = [jnp.asarray(rng.standard_normal((4, 5)), jnp.float32) for _ in range(3)]
  with pytest.raises(ValueError, match="not converged after 7 batches"):
    lojax.eva_init(lora, mlp, noisy, eva_config={"tau": 1.0}, max_steps=7)
  # A kernel that converged stops collecting while another goes on: a sees batches 1 and 2
  # only (batch 3 would turn its components), b (isotropic input) needs more passes.
  params = mlp_params(rng, n_in=5, n_hid=6)
  xs = [rng.standard_normal((64, 5)) @ mix for _ in range(2)] + [
      100 * rng.standard_normal((64, 5)) for _ in range(2)]
  batches = [{"x": jnp.asarray(x, jnp.float32),
              "z": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)} for x in xs]

  def f(p, b):
    return b["x"] @ p["a"]["kernel"], b["z"] @ p["b"]["kernel"]

  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["a", "b"]), key=jax.random.key(0))
  out = lojax.eva_init(lora, f, batches, eva_config={"rho": 1.0, "tau": 0.99})
  assert_rows(rows_of(out, "a"), ref_pca(np.concatenate(xs[:2]), 2)[0], 1e-4)


def test_refusals():
  rng = np.random.default_rng(4)
  lora = lojax.wrap(mlp_params(rng), lojax.LoraSpec(r=2, target_modules=["a"]),
                    key=jax.random.key(0))
  x = [jnp.ones((4, 8))]
  with pytest.raises(ValueError, match="rho"):
    lojax.eva_init(lora, mlp, x, eva_config={"rho": 0.5})
  with pytest.raises(ValueError, match="token_mask"):
    lojax.eva_init(lora, mlp, x, eva_config={"use_label_mask": True})
  with pytest.raises(ValueError, match="empty"):
    lojax.eva_init(lora, mlp, [])
  with pytest.raises(ValueError, match="more than its 8 input features"):
    lojax.eva_init(lojax.wrap(mlp_params(rng), lojax.LoraSpec(r=5, target_modules=["a"]),
                              key=jax.random.key(0)), mlp, x)
  # a stacked kernel under a scan
  stacked = {"w": {"kernel": jnp.ones((2, 8, 8))}}

  def scanned(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"]["kernel"])[0]

  lora = lojax.wrap(stacked, lojax.LoraSpec(r=2, target_modules=["w"]), key=jax.random.key(0),
                    apply_fn=scanned, example_args=(jnp.ones((4, 8)),))
  with pytest.raises(ValueError, match="layers of a stacked kernel share one rank"):
    lojax.eva_init(lora, scanned, x)   # rho = 2 would give each layer its own rank


@pytest.mark.parametrize("layers", [None, [1]], ids=["all_layers", "layers_to_transform"])
def test_stacked_layers_match_unrolled(layers):
  """The tiny GPT with its blocks in one nn.scan stack (rho = 1): each adapted layer of a
  stacked kernel gets the components its unrolled twin gets, and the model is unchanged."""
  import test_peft_oracle as oracle
  rng = np.random.default_rng(1)
  batches = [{"input_ids": jnp.asarray(rng.integers(0, oracle.VOCAB, (8, 12))),
              "attention_mask": jnp.asarray(np.arange(12)[None] < rng.integers(4, 13, 8)[:, None])}
             for _ in range(4)]
  spec = lojax.LoraSpec(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                        layers_to_transform=layers)
  out = {}
  for scan in (False, True):
    model = oracle.flax_model(scan)
    lora = lojax.wrap(oracle.flax_params(scan), spec, key=jax.random.key(0), apply_fn=model.apply,
                      example_args=(batches[0]["input_ids"],))
    out[scan] = lojax.eva_init(lora, lambda p, b, m=model: m.apply(p, b["input_ids"]), batches,
                               eva_config={"rho": 1.0, "tau": 0.99},
                               token_mask=lambda b: b["attention_mask"])
  kept = layers or [0, 1]
  for name in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
    a = out[True].adapters["default"]["lora"][f"params/h/{name}"]["lora_A"]
    assert a.shape[0] == len(kept)
    for j, i in enumerate(kept):
      np.testing.assert_allclose(
          a[j], out[False].adapters["default"]["lora"][f"params/h_{i}/{name}"]["lora_A"],
          atol=1e-6, err_msg=f"{name} layer {i}")
  ids = batches[0]["input_ids"]
  model = oracle.flax_model(True)
  np.testing.assert_allclose(jax.jit(lojax.lorafy(model.apply))(out[True], ids),
                             model.apply(oracle.flax_params(True), ids), atol=1e-5)


# ---------------------------------------------------------------------------
# Memory: the statistics step
# ---------------------------------------------------------------------------

def test_statistics_step_holds_no_kernel_sized_buffer():
  """A [16, 4096] kernel (256 KiB) whose output feeds the next target, on 4 tokens: the
  compiled step reads the kernel in place (no instruction but the parameter has its
  shape), its temp is well under the kernel's size, and it returns the moments only."""
  n_in, n_out = 16, 4096
  rng = np.random.default_rng(5)
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32)},
            "proj": jnp.asarray(rng.standard_normal((n_out, 8)), jnp.float32),
            "c": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)}}

  def f(p, x):
    return (jnp.tanh(x @ p["a"]["kernel"]) @ p["proj"]) @ p["c"]["kernel"]

  lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["a", "c"]), key=jax.random.key(0))
  meta = lora.meta.adapter("default")
  run = eva.statistics_fn(lora, f, {t.path: t for t in meta.targets})
  x = jnp.ones((4, n_in))
  found, stats = run(x, None)
  assert found == {"a": [0], "c": [1]}
  run(x + 1, None)
  assert run.step._cache_size() == 1   # one compiled step per batch shape
  leaves = jax.tree_util.tree_leaves(lora.base)
  assert [tuple(o.shape) for o in jax.tree_util.tree_leaves(run.step.eval_shape(
      leaves, x, None))] == [(), (16,), (16, 16), (), (8,), (8, 8)]
  compiled = run.step.lower(leaves, x, None).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < n_in * n_out * 4 // 2, temp
  made = re.findall(r"=\s*f32\[(?:16,4096|4096,16)\]\{[^}]*\}\s*([a-z-]+)\(",
                    compiled.as_text())
  assert made and set(made) == {"parameter"}, made   # the kernel itself (and fusions'
  # views of it), read in place


# ---------------------------------------------------------------------------
# PEFT live
# ---------------------------------------------------------------------------

def _peft():
  torch = pytest.importorskip("torch", reason="torch is not installed: the live PEFT check skips")
  peft = pytest.importorskip("peft", reason="peft is not installed: the live PEFT check skips")
  from peft.tuners.lora import EvaConfig
  from peft.tuners.lora.eva import initialize_lora_eva_weights
  return torch, peft, EvaConfig, initialize_lora_eva_weights


def _targets(lora):
  return {t.path: (t.r, t.alpha, t.scaling) for t in lora.meta.adapter("default").targets}


@pytest.mark.parametrize("decay,whiten,ranks", [
    (0.3, False, {"l0": 3, "l1": 4, "l2": 5}),
    (0.9, False, {"l0": 5, "l1": 3, "l2": 4}),
    (0.9, True, {"l0": 5, "l1": 3, "l2": 4}),
])
def test_matches_peft_on_an_mlp(decay, whiten, ranks):
  torch, peft, EvaConfig, initialize = _peft()
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 20),
                            torch.nn.Tanh(), torch.nn.Linear(20, 12))
  rng = np.random.default_rng(0)
  mix = spectrum(rng, 16, decay)
  data = [(rng.standard_normal((8, 10, 16)) @ mix).astype(np.float32) for _ in range(8)]
  params = {f"l{i}": {"kernel": jnp.asarray(net[2 * i].weight.detach().numpy().T),
                      "bias": jnp.asarray(net[2 * i].bias.detach().numpy())} for i in range(3)}

  def f(p, x):
    for i in range(3):
      x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
      x = jnp.tanh(x) if i < 2 else x
    return x

  config = dict(rho=2.0, tau=0.99, whiten=whiten)
  pm = peft.get_peft_model(net, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["0", "2", "4"], init_lora_weights="eva",
      eva_config=EvaConfig(**config)))
  initialize(pm, [torch.tensor(d) for d in data], forward_fn=lambda m, x: m(x),
             prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, lora_alpha=8, target_modules=["l0", "l1", "l2"]),
                    key=jax.random.key(0))
  out = lojax.eva_init(lora, f, [jnp.asarray(d) for d in data], eva_config=config)
  got = _targets(out)
  assert {p: r for p, (r, _, _) in got.items()} == ranks
  for i in range(3):
    mod = pm.get_submodule(f"base_model.model.{2 * i}")
    r, alpha, scaling = got[f"l{i}"]
    assert (r, alpha, scaling) == (mod.r["default"], mod.lora_alpha["default"],
                                   mod.scaling["default"])
    assert_rows(rows_of(out, f"l{i}"), mod.lora_A["default"].weight.detach().double().numpy(),
                1e-3)


class ExactPCA:
  """A stand-in for PEFT's IncrementalPCA (test only): the exact PCA of all rows seen."""

  def __init__(self, n_components, **unused):
    self.n_components, self.rows = n_components, []

  def partial_fit(self, x):
    import torch
    self.rows.append(x.double())
    xc = torch.cat(self.rows)
    xc = xc - xc.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    vh = vh * torch.sign(vh[torch.arange(len(vh)), vh.abs().argmax(1)])[:, None]
    k = self.n_components
    self.components_, self.singular_values_ = vh[:k].float(), s[:k].float()
    self.explained_variance_ratio_ = (s[:k] ** 2 / xc.square().sum()).float()


@pytest.mark.parametrize("exact", [False, True], ids=["peft_ipca", "peft_loop_exact_pca"])
def test_matches_peft_on_gpt2_with_padding(exact, monkeypatch, tmp_path):
  """The tiny GPT-2 (every c_attn, c_proj, c_fc), right-padded batches: PEFT drops the
  padding with its default attention-mask functions, lojax with ``token_mask``. Same ranks
  and alphas; the rows agree to |cos| >= 0.97 (PEFT's truncated, randomized IPCA on the
  flat spectrum of h_0's layer-normed embeddings), and to 1e-5 when PEFT's loop runs with
  an exact PCA in place of its IncrementalPCA."""
  torch, peft, EvaConfig, initialize = _peft()
  pytest.importorskip("transformers")
  import test_peft_oracle as oracle
  if exact:
    monkeypatch.setattr(peft.tuners.lora.eva, "IncrementalPCA", ExactPCA)
  rng = np.random.default_rng(1)
  batches = []
  for _ in range(4):
    lens = rng.integers(4, 13, 8)
    batches.append({"input_ids": rng.integers(0, oracle.VOCAB, (8, 12)),
                    "attention_mask": (np.arange(12)[None] < lens[:, None]).astype(np.int64)})
  targets = ["c_attn", "c_proj", "c_fc"]
  pm = peft.get_peft_model(oracle.torch_base_model(), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
      eva_config=EvaConfig(rho=2.0, tau=0.99)))
  initialize(pm, [{k: torch.tensor(v) for k, v in b.items()} for b in batches],
             show_progress_bar=False)
  model = oracle.flax_model(False)
  lora = lojax.wrap(oracle.flax_params(False),
                    lojax.LoraSpec(r=4, lora_alpha=8, target_modules=targets),
                    key=jax.random.key(0))
  out = lojax.eva_init(lora, lambda p, b: model.apply(p, b["input_ids"]),
                       [jax.tree.map(jnp.asarray, b) for b in batches],
                       eva_config={"rho": 2.0, "tau": 0.99},
                       token_mask=lambda b: b["attention_mask"] > 0)
  got = _targets(out)
  assert len(got) == 8 and len({r for r, _, _ in got.values()}) > 1   # ranks were moved
  worst = 1.0
  for path, (r, alpha, scaling) in got.items():
    mod = pm.get_submodule("base_model.model." + oracle.torch_module(path))
    assert (r, alpha, scaling) == (mod.r["default"], mod.lora_alpha["default"],
                                   mod.scaling["default"]), path
    want = mod.lora_A["default"].weight.detach().double().numpy()
    a = rows_of(out, path)
    cos = np.abs(np.sum(a * want, 1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(want, axis=1))
    worst = min(worst, cos.min())
  assert worst >= (1 - 1e-5 if exact else 0.97), worst
  if not exact:
    return
  # The EVA ranks and alphas travel through PEFT files both ways.
  lojax.save_peft(tmp_path / "lojax", out, mapping=lojax.GPT2_MAPPING)
  back = peft.PeftModel.from_pretrained(oracle.torch_base_model(), str(tmp_path / "lojax"))
  pm.save_pretrained(str(tmp_path / "peft"))
  again = lojax.load_peft(tmp_path / "peft", oracle.flax_params(False),
                          mapping=lojax.GPT2_MAPPING)
  assert _targets(again) == got
  for path, (r, alpha, _) in got.items():
    mod = back.get_submodule("base_model.model." + oracle.torch_module(path))
    assert (mod.r["default"], mod.lora_alpha["default"]) == (r, alpha), path
    np.testing.assert_allclose(mod.lora_A["default"].weight.detach().numpy(),
                               rows_of(out, path), rtol=1e-6, atol=1e-7)
