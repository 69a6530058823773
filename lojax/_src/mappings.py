"""Names of lojax module paths in torch (transformers) models, for PEFT files.

A :class:`PeftMapping` turns the path of a module in a Flax param tree into
the name of the same module in the transformers model PEFT adapts, and a
Flax leaf name into the torch one. The mappings shipped here cover the model
families people fine-tune, each for the Flax layout named in its docstring,
and each is tested by a round trip through PEFT on a tiny transformers model
of that family with identical weights (``tests/test_peft_families.py``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftMapping:
  """How lojax module paths map to torch module names.

  Attributes:
    names: A callable ``path -> torch name or None``, or a table
      ``[(pattern, replacement), ...]``: the first pattern that
      ``re.fullmatch``-es the path wins and ``match.expand(replacement)`` is
      the name. Any "/" left in the result becomes ".". Layer ``i`` of a
      stacked (``nn.scan``) kernel is looked up as ``"<path>[i]"``.
    fan_in_fan_out: Regexes (``re.fullmatch`` on the module path, without
      ``[i]``) of modules whose torch weight is stored ``[in, out]`` like
      the Flax kernel (GPT-2's ``Conv1D``). PEFT's factors keep their layout;
      this sets the config's ``fan_in_fan_out`` and the layout of
      ``modules_to_save`` kernels.
    leaves: Flax leaf name -> torch parameter name (default: ``kernel``,
      ``embedding`` and ``scale`` are ``weight``; other names are kept).
    matmul_leaves: Flax leaf names of ``[in, out]`` matmul kernels, written
      transposed (unless fan-in-fan-out) when a module is saved whole.
    kernel_names: leaf names that hold weights lojax may adapt besides its
      defaults (as :attr:`lojax.LoraSpec.kernel_names`), e.g. tunix's
      ``input_embedding``; :func:`lojax.load_peft` looks for adapters there.
    splits: Fused kernels, ``[(pattern, (replacement, ...)), ...]``: a module
      whose path (``"<path>[i]"`` for layer ``i`` of a stack) the pattern
      ``re.fullmatch``-es holds, along the first axis of its (per-layer)
      kernel, the weights of one torch module per replacement, in order
      (tunix's Gemma ``qkv_einsum`` ``[3, heads, embed, head_dim]`` is
      ``q_proj``, ``k_proj``, ``v_proj``). That axis must be an output axis.
      On export the module's adapter becomes one adapter per torch module,
      sharing ``lora_A`` and each with its slice of ``lora_B`` (exact). On
      import the torch modules' adapters become one adapter of their summed
      rank: ``A = [A_1 | A_2 | ...]``, ``B`` block-diagonal with each
      module's scaling folded in, and the scaling 1 (exact).
    parameter_order: Torch parameter names (the last part of a target
      parameter's name, see :meth:`parameter_name`) in the order a torch
      module registers them. PEFT wraps the adapted parameters of one module
      in that order, each wrapper around the previous one, so the last one's
      tensors are ``<module>.lora_A.weight`` and each one before it has one
      more ``.base_layer`` (``<module>.base_layer.lora_A.weight``, ...). Two
      adapted parameters of one module that this does not order are an
      error. The default is transformers' order for MoE experts.
    swapped_parameters: Regexes (``re.fullmatch`` on the module path, without
      ``[i]``) of target parameters that PEFT reads with input and output
      swapped. PEFT reads a 3-D parameter as ``[E, out, in]`` (``nn.Linear``'s
      layout per expert) unless its module sets ``is_transposed`` (then
      ``[E, in, out]``), and a 2-D one as ``[out, in]``; a parameter stored
      the other way round (transformers' Llama 4 experts: ``[E, in, out]``
      without ``is_transposed``) gets PEFT's ``lora_A`` on its output side.

  >>> PeftMapping(names=[(r"params/(.*)", r"model/\\1")]).torch_name("params/h_0/q")
  'model.h_0.q'
  """

  names: Callable[[str], str | None] | Sequence[tuple[str, str]] = (
      (r"params/(.*)\[(\d+)\]", r"\1.\2"), (r"params/(.*)", r"\1"),
      (r"(.*)\[(\d+)\]", r"\1.\2"), (r"(.*)", r"\1"))
  fan_in_fan_out: Sequence[str] = ()
  leaves: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(_LEAVES))
  matmul_leaves: Sequence[str] = ("kernel",)
  kernel_names: Sequence[str] = ()
  splits: Sequence[tuple[str, Sequence[str]]] = ()
  parameter_order: Sequence[str] = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
  swapped_parameters: Sequence[str] = ()

  def __post_init__(self):
    if not callable(self.names):
      rules = tuple((str(p), str(r)) for p, r in self.names)
      _check_patterns("names", [p for p, _ in rules])
      object.__setattr__(self, "names", rules)
    splits = tuple((str(p), tuple(str(x) for x in r)) for p, r in self.splits)
    _check_patterns("splits", [p for p, _ in splits])
    if short := [p for p, r in splits if len(r) < 2]:
      raise ValueError(f"`splits` rules {short} name fewer than two torch modules; a fused "
                       "kernel holds several (use `names` for one).")
    object.__setattr__(self, "splits", splits)
    object.__setattr__(self, "fan_in_fan_out", tuple(self.fan_in_fan_out))
    object.__setattr__(self, "leaves", dict(self.leaves))
    object.__setattr__(self, "matmul_leaves", tuple(self.matmul_leaves))
    object.__setattr__(self, "kernel_names", tuple(self.kernel_names))
    for field in ("swapped_parameters", "parameter_order"):
      value = getattr(self, field)
      if isinstance(value, str):
        raise TypeError(f"`{field}` must be a list of str, got the str {value!r}.")
      object.__setattr__(self, field, tuple(str(x) for x in value))
    _check_patterns("swapped_parameters", self.swapped_parameters)

  def __hash__(self):
    return hash((self.names, self.fan_in_fan_out, tuple(sorted(self.leaves.items())),
                 self.matmul_leaves, self.kernel_names, self.splits, self.parameter_order,
                 self.swapped_parameters))

  def torch_names(self, path: str, layer: int | None = None) -> tuple[str, ...] | None:
    """The torch modules fused in ``path`` (layer ``layer``), in kernel order, or None.

    >>> m = PeftMapping(splits=[(r"attn/kv", ("k_proj", "v_proj"))])
    >>> m.torch_names("attn/kv"), m.torch_names("attn/q")
    (('k_proj', 'v_proj'), None)
    """
    key = path if layer is None else f"{path}[{layer}]"
    for pattern, repls in self.splits:
      if m := re.fullmatch(pattern, key):
        return tuple(m.expand(r).replace("/", ".") for r in repls)
    return None

  def torch_name(self, path: str, layer: int | None = None) -> str | None:
    """The torch module name of ``path`` (layer ``layer`` if stacked), or None (also for a
    fused module: see :meth:`torch_names`)."""
    key = path if layer is None else f"{path}[{layer}]"
    if self.torch_names(path, layer) is not None:
      return None
    if callable(self.names):
      name = self.names(key)
    else:
      name = None
      for pattern, repl in self.names:
        if m := re.fullmatch(pattern, key):
          name = m.expand(repl)
          break
    return None if name is None else name.replace("/", ".")

  def parameter_name(self, path: str, layer: int | None = None, leaf: str = "") -> str | None:
    """The torch name ``<module>.<parameter>`` of a kernel PEFT adapts as a target parameter
    (an expert kernel, or a bare array found by its use), or None.

    A bare array (``leaf=""``) is its own module path, so its :meth:`torch_name` names the
    parameter; a kernel held by a module is that module's parameter :meth:`torch_leaf`.

    >>> m = PeftMapping()
    >>> m.parameter_name("moe/wi"), m.parameter_name("moe/experts", leaf="kernel")
    ('moe.wi', 'moe.experts.weight')
    """
    name = self.torch_name(path, layer)
    return name if name is None or not leaf else f"{name}.{self.torch_leaf(leaf)}"

  def swapped(self, path: str) -> bool:
    """Whether PEFT reads target parameter ``path`` with input and output swapped
    (:attr:`swapped_parameters`)."""
    return any(re.fullmatch(p, path) for p in self.swapped_parameters)

  def torch_leaf(self, leaf: str) -> str:
    """The torch parameter name of Flax leaf ``leaf``."""
    return self.leaves.get(leaf, leaf)

  def flax_leaves(self, torch_leaf: str) -> tuple[str, ...]:
    """The Flax leaf names that torch parameter ``torch_leaf`` may stand for."""
    return tuple(k for k, v in self.leaves.items() if v == torch_leaf) + (torch_leaf,)

  def transposed(self, path: str) -> bool:
    """Whether torch stores this module's weight ``[out, in]`` (nn.Linear)."""
    return not any(re.fullmatch(p, path) for p in self.fan_in_fan_out)


def _check_patterns(field: str, patterns: Sequence[str]) -> None:
  bad = []
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      bad.append(f"{p!r} ({e})")
  if bad:
    raise ValueError(f"`{field}` has invalid regular expressions: {', '.join(bad)}.")


DEFAULT_MAPPING = PeftMapping()
"""Torch names are the lojax paths (without ``params/``) with "." for "/": right for
a Flax port that keeps the torch module names (transformers' own Flax models)."""

GPT2_MAPPING = PeftMapping(
    names=((r"params/h_(\d+)/(.+)", r"transformer.h.\1.\2"),
           (r"params/h/(.+)\[(\d+)\]", r"transformer.h.\2.\1"),
           (r"params/(wte|wpe|ln_f)", r"transformer.\1"),
           (r"params/lm_head", "lm_head")),
    fan_in_fan_out=(r"params/h(_\d+)?/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)",))
"""Flax GPT-2 (``params/h_{i}/attn/c_attn`` ... or one ``nn.scan`` stack
``params/h``) to transformers' ``GPT2LMHeadModel`` names
(``transformer.h.{i}.attn.c_attn``, ``transformer.wte``, ``lm_head``, ...);
the block projections are ``Conv1D`` (weight ``[in, out]``)."""

LLAMA_MAPPING = PeftMapping(
    names=((r"layers/(\d+)/attn/(q|k|v|o)_proj", r"model.layers.\1.self_attn.\2_proj"),
           (r"layers/(\d+)/attn/(q|k)_norm", r"model.layers.\1.self_attn.\2_norm"),
           (r"layers/(\d+)/mlp/(gate|up|down)_proj", r"model.layers.\1.mlp.\2_proj"),
           (r"layers/(\d+)/(input_layernorm|post_attention_layernorm)", r"model.layers.\1.\2"),
           (r"embedder", "model.embed_tokens"),
           (r"final_norm", "model.norm"),
           (r"lm_head", "lm_head")),
    leaves={**_LEAVES, "w": "weight", "input_embedding": "weight"},
    matmul_leaves=("kernel", "w"), kernel_names=("input_embedding",))
"""tunix's NNX Llama 3, Qwen 2 and Qwen 3 (``layers/{i}/attn/q_proj`` with the
einsum kernel ``w [embed, heads, head_dim]``, ``layers/{i}/mlp/gate_proj``,
``embedder/input_embedding``, ``final_norm``, ``lm_head``) to transformers'
``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` /
``Qwen3ForCausalLM`` names (``model.layers.{i}.self_attn.q_proj``, ...; the
four families share them). Qwen 2's q/k/v biases live beside the kernels in
tunix (``attn/q_bias``), so ``bias`` other than ``"none"`` does not map."""

BERT_MAPPING = PeftMapping(
    names=((r"params/(bert/)?embeddings/(.+)", r"\1embeddings.\2"),
           (r"params/(bert/)?encoder/layer_(\d+)/attention/(query|key|value)",
            r"\1encoder.layer.\2.attention.self.\3"),
           (r"params/(bert/)?encoder/layer_(\d+)/attention/output",
            r"\1encoder.layer.\2.attention.output.dense"),
           (r"params/(bert/)?encoder/layer_(\d+)/attention_norm",
            r"\1encoder.layer.\2.attention.output.LayerNorm"),
           (r"params/(bert/)?encoder/layer_(\d+)/(intermediate|output)",
            r"\1encoder.layer.\2.\3.dense"),
           (r"params/(bert/)?encoder/layer_(\d+)/output_norm",
            r"\1encoder.layer.\2.output.LayerNorm"),
           (r"params/(classifier)", r"\1")))
"""The linen BERT of ``examples/minilm.py`` (``params/encoder/layer_{i}/attention/query``,
``.../attention/output``, ``.../intermediate``, ``.../output``, the norms, the
embeddings; under ``params/bert/`` with a ``classifier`` head in
``MiniLMClassifier``) to transformers' ``BertModel`` names
(``encoder.layer.{i}.attention.self.query``, ``...attention.output.dense``,
``...intermediate.dense``, ``...output.dense``; ``bert.`` and ``classifier``
for ``BertForSequenceClassification``)."""

GEMMA_MAPPING = PeftMapping(
    names=((r"layers/(\d+)/attn/q_einsum", r"model.layers.\1.self_attn.q_proj"),
           (r"layers/(\d+)/attn/attn_vec_einsum", r"model.layers.\1.self_attn.o_proj"),
           (r"layers/(\d+)/attn/_query_norm", r"model.layers.\1.self_attn.q_norm"),
           (r"layers/(\d+)/attn/_key_norm", r"model.layers.\1.self_attn.k_norm"),
           (r"layers/(\d+)/mlp/(gate|up|down)_proj", r"model.layers.\1.mlp.\2_proj"),
           (r"layers/(\d+)/pre_attention_norm", r"model.layers.\1.input_layernorm"),
           (r"layers/(\d+)/post_att(n|ention)_norm", r"model.layers.\1.post_attention_layernorm"),
           (r"layers/(\d+)/(pre|post)_ffw_norm", r"model.layers.\1.\2_feedforward_layernorm"),
           (r"embedder", "model.embed_tokens"),
           (r"final_norm", "model.norm")),
    splits=((r"layers/(\d+)/attn/qkv_einsum", (r"model.layers.\1.self_attn.q_proj",
                                                r"model.layers.\1.self_attn.k_proj",
                                                r"model.layers.\1.self_attn.v_proj")),
            (r"layers/(\d+)/attn/kv_einsum", (r"model.layers.\1.self_attn.k_proj",
                                               r"model.layers.\1.self_attn.v_proj"))),
    leaves={**_LEAVES, "w": "weight", "input_embedding": "weight"},
    matmul_leaves=("kernel", "w"), kernel_names=("input_embedding",))
"""tunix's NNX Gemma 2 (``tunix.models.gemma``) and Gemma 3 (``tunix.models.gemma3``)
to transformers' ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` names. tunix
fuses the projections: ``attn/qkv_einsum`` ``[3, heads, embed, head_dim]``
(when there are as many key/value heads as query heads) holds ``q_proj``,
``k_proj`` and ``v_proj``; else ``attn/q_einsum`` is ``q_proj`` and
``attn/kv_einsum`` ``[2, kv_heads, embed, head_dim]`` holds ``k_proj`` and
``v_proj`` (see ``splits``). ``attn_vec_einsum`` is ``o_proj``; the norms map
to ``input_layernorm``, ``post_attention_layernorm``,
``pre/post_feedforward_layernorm`` and Gemma 3's ``q_norm``/``k_norm`` (Gemma 1
names its pre-MLP norm ``post_attention_layernorm``, tunix's ``pre_ffw_norm``:
its projections map, its norms do not). The embedding is tied: the logits use
``embedder/input_embedding`` too (see ``ensure_weight_tying`` in the README)."""

_T5_ATTENTION = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
T5_MAPPING = PeftMapping(
    names=(*((rf"(?:params/)?encoder/layers_(\d+)/attention/{f}",
              rf"encoder.block.\1.layer.0.SelfAttention.{t}") for f, t in _T5_ATTENTION),
           *((rf"(?:params/)?decoder/layers_(\d+)/self_attention/{f}",
              rf"decoder.block.\1.layer.0.SelfAttention.{t}") for f, t in _T5_ATTENTION),
           *((rf"(?:params/)?decoder/layers_(\d+)/encoder_decoder_attention/{f}",
              rf"decoder.block.\1.layer.1.EncDecAttention.{t}") for f, t in _T5_ATTENTION),
           (r"(?:params/)?encoder/layers_(\d+)/mlp/(wi|wi_0|wi_1|wo)",
            r"encoder.block.\1.layer.1.DenseReluDense.\2"),
           (r"(?:params/)?decoder/layers_(\d+)/mlp/(wi|wi_0|wi_1|wo)",
            r"decoder.block.\1.layer.2.DenseReluDense.\2"),
           (r"(?:params/)?encoder/layers_(\d+)/pre_attention_layer_norm",
            r"encoder.block.\1.layer.0.layer_norm"),
           (r"(?:params/)?encoder/layers_(\d+)/pre_mlp_layer_norm",
            r"encoder.block.\1.layer.1.layer_norm"),
           (r"(?:params/)?decoder/layers_(\d+)/pre_self_attention_layer_norm",
            r"decoder.block.\1.layer.0.layer_norm"),
           (r"(?:params/)?decoder/layers_(\d+)/pre_cross_attention_layer_norm",
            r"decoder.block.\1.layer.1.layer_norm"),
           (r"(?:params/)?decoder/layers_(\d+)/pre_mlp_layer_norm",
            r"decoder.block.\1.layer.2.layer_norm"),
           (r"(?:params/)?(encoder|decoder)/\1_norm", r"\1.final_layer_norm"),
           (r"(?:params/)?(encoder|decoder)/relpos_bias",
            r"\1.block.0.layer.0.SelfAttention.relative_attention_bias"),
           (r"(?:params/)?token_embedder", "shared"),
           (r"(?:params/)?decoder/logits_dense", "lm_head")),
    leaves={**_LEAVES, "rel_embedding": "weight"},
    matmul_leaves=("kernel", "rel_embedding"))
"""t5x's minimal T5 (``t5x/examples/t5/network.py``, which its T5 1.1, mT5 and
ByT5 configs share; the params with or without the ``params/`` level) to
transformers' ``T5ForConditionalGeneration`` names. ``encoder/layers_{i}/attention/query``
(``key``, ``value``, ``out``) is ``encoder.block.{i}.layer.0.SelfAttention.q``
(``k``, ``v``, ``o``); the decoder's ``self_attention`` is ``layer.0.SelfAttention``
and its ``encoder_decoder_attention`` ``layer.1.EncDecAttention``;
``mlp/wi_0``, ``wi_1``, ``wo`` (``wi`` for T5 1.0's ReLU MLP) are
``DenseReluDense`` of the last sub-layer (``layer.1`` in the encoder,
``layer.2`` in the decoder); each ``pre_*_layer_norm`` is the ``layer_norm`` of
the sub-layer it precedes, ``encoder_norm``/``decoder_norm`` the stack's
``final_layer_norm``, ``token_embedder`` is ``shared`` and the untied head
``decoder/logits_dense`` is ``lm_head``. Each stack's ``relpos_bias`` is block
0's ``relative_attention_bias`` (t5x's ``rel_embedding`` ``[heads, buckets]`` is
torch's weight transposed: ``matmul_leaves`` names it). t5x's ``DenseGeneral``
kernels are stored with two axes, ``[in, out]``: ``nn.Linear``'s weight transposed.
An adapter on ``token_embedder`` does not carry over: transformers 5 reads the
table through ``encoder.embed_tokens`` and ``decoder.embed_tokens`` (tied to
``shared``), so PEFT never applies an adapter on ``shared`` and makes one per
stack of ``embed_tokens``."""
