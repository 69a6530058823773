"""The PEFT-torch row of the benchmark: the benchmark GPT trained with PEFT LoRA on torch.

``models.py``'s GPT is GPT-2's architecture: token + position embeddings,
pre-LayerNorm blocks with a fused q/k/v projection ``attn.c_attn``, causal
softmax attention scaled by ``1/sqrt(head_dim)``, ``attn.c_proj``, an MLP
``mlp.c_fc`` -> tanh-approximated GELU (``jax.nn.gelu``'s default, GPT-2's
``gelu_new``) -> ``mlp.c_proj``, a final LayerNorm and a bias-free head. So the
torch side is transformers' ``GPT2LMHeadModel`` of the same shape, with
LayerNorm epsilon 1e-6 (flax's default), dropout 0, an untied ``lm_head`` and
no KV cache, in float32 — what a PEFT user would build. GPT-2's linears are
``Conv1D`` layers whose weight is ``(in, out)``, the layout of a flax kernel,
so the weights of one copy load into the other unchanged (``load_linen_params``).

The adapters are PEFT's: ``peft.get_peft_model(model, LoraConfig(r, alpha,
target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))``, the four
linears of every block (``c_proj`` names both the attention and the MLP output
projection), not ``lm_head``, the embeddings or the LayerNorms: the targets of
lojax's ``"all-linear"`` on the flax model. PEFT freezes the base
(``requires_grad=False``). A training step is forward, cross-entropy over all
tokens, backward, ``torch.optim.AdamW`` on the adapters (optax's defaults:
weight decay 1e-4, eps 1e-8).

Two torch variants are offered (``peft_lora_step(..., compiled=...)``): eager
(transformers' default SDPA attention) and ``torch.compile`` of the forward and
loss (Inductor, which also compiles the backward). ``check_equal_work`` builds
both models with identical weights and adapters (B != 0) at a tiny shape and
returns the largest logit, loss and adapter-gradient differences.

Both steps do the same matmuls: ``analytic_flops`` writes them out (153.5
GFLOPs at the benchmark shape); torch's FlopCounterMode counts exactly that for
the PEFT step with eager attention (with SDPA it misses the CPU flash-attention
kernel), and the dots of lojax's compiled step add up to it too
(``hlo_dot_flops``; tests/test_peft_row.py checks both).
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from models import Config, batch  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]
# lojax "all-linear" paths of one block, and the GPT-2 module names holding the same kernels.
_BLOCK_LINEARS = {"attn/c_attn": "attn.c_attn", "attn/c_proj": "attn.c_proj",
                  "mlp/c_fc": "mlp.c_fc", "mlp/c_proj": "mlp.c_proj"}


def set_threads():
  """torch's CPU setting a PEFT user would choose: one intra-op thread per core."""
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  return torch.get_num_threads()


def gpt2(cfg: Config, *, seed: int = 0, attn_implementation: str = "sdpa"):
  """transformers' GPT2LMHeadModel with the architecture and shape of ``models.LinenGPT(cfg)``."""
  import torch
  import transformers
  conf = transformers.GPT2Config(
      vocab_size=cfg.vocab, n_positions=cfg.seq, n_embd=cfg.d, n_layer=cfg.layers,
      n_head=cfg.heads, n_inner=4 * cfg.d, activation_function="gelu_new",
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-6,
      tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None)
  conf._attn_implementation = attn_implementation
  torch.manual_seed(seed)
  return transformers.GPT2LMHeadModel(conf).float()


def peft_model(cfg: Config, r: int = 16, alpha: float = 32.0, *, seed: int = 0,
               attn_implementation: str = "sdpa"):
  """``peft.get_peft_model`` of ``gpt2(cfg)``: rank ``r`` on every block linear, base frozen."""
  import peft
  config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                           fan_in_fan_out=True, bias="none")
  model = peft.get_peft_model(gpt2(cfg, seed=seed, attn_implementation=attn_implementation),
                              config)
  return model


def load_linen_params(model, params, lora=None):
  """Copy ``LinenGPT`` params (and ``lojax.wrap`` adapters, if given) into the PEFT GPT-2."""
  import torch
  p = params["params"]
  base = model.get_base_model()
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  sd = {"transformer.wte.weight": t(p["wte"]["embedding"]),
        "transformer.wpe.weight": t(p["wpe"]["embedding"]),
        "transformer.ln_f.weight": t(p["ln_f"]["scale"]),
        "transformer.ln_f.bias": t(p["ln_f"]["bias"]),
        "lm_head.weight": t(p["lm_head"]["kernel"]).T}
  layers = sorted(int(k[2:]) for k in p if k.startswith("h_"))
  for i in layers:
    h, pre = p[f"h_{i}"], f"transformer.h.{i}."
    for ln in ("ln_1", "ln_2"):
      sd[pre + ln + ".weight"], sd[pre + ln + ".bias"] = t(h[ln]["scale"]), t(h[ln]["bias"])
    for flax_name, torch_name in _BLOCK_LINEARS.items():
      mod, lin = flax_name.split("/")
      sd[pre + torch_name + ".weight"] = t(h[mod][lin]["kernel"])  # Conv1D: (in, out)
      sd[pre + torch_name + ".bias"] = t(h[mod][lin]["bias"])
  names = dict(base.named_modules())
  with torch.no_grad():
    for k, v in sd.items():
      mod, leaf = k.rsplit(".", 1)
      target = getattr(names[mod], "base_layer", names[mod])
      getattr(target, leaf).copy_(v)
    if lora is not None:
      factors = lora.trainable["default"]["lora"]
      for i in layers:
        for flax_name, torch_name in _BLOCK_LINEARS.items():
          f = factors[f"params/h_{i}/{flax_name}"]
          layer = names[f"transformer.h.{i}.{torch_name}"]
          layer.lora_A["default"].weight.copy_(t(f["lora_A"]).T)  # (r, in)
          layer.lora_B["default"].weight.copy_(t(f["lora_B"]).T)  # (out, r)
  return model


def _loss(model, ids, labels):
  import torch
  logits = model(input_ids=ids).logits
  return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           labels.reshape(-1))


def peft_lora_step(cfg: Config, r: int = 16, alpha: float = 32.0, lr: float = 1e-3, *,
                   compiled: bool = False, attn_implementation: str = "sdpa"):
  """One PEFT LoRA AdamW training step on ``peft_model(cfg, r, alpha)``, as a callable.

  Returns ``(step, model)``. ``step()`` runs forward, cross-entropy against
  ``models.batch(cfg)``'s labels, backward and the AdamW update on the adapters
  (the only params with ``requires_grad``), and returns the loss as a float
  (so the step has finished when it returns). With ``compiled=True`` the
  forward and loss go through ``torch.compile`` (the first call compiles).
  ``attn_implementation`` is transformers' (``"sdpa"``, its default, or ``"eager"``).
  """
  import torch
  model = peft_model(cfg, r, alpha, attn_implementation=attn_implementation)
  model.train()
  ids, labels = (torch.from_numpy(np.asarray(a, np.int64)) for a in batch(cfg))
  trainable = [q for q in model.parameters() if q.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=1e-4, eps=1e-8)
  loss_fn = torch.compile(_loss) if compiled else _loss

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids, labels)
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step, model


def counted_flops(cfg: Config, r: int = 16, alpha: float = 32.0, *,
                  attn_implementation: str = "sdpa") -> float:
  """FLOPs of one eager ``peft_lora_step`` as torch's FlopCounterMode counts them.

  It counts matmuls; with ``"sdpa"`` on CPU it misses the flash-attention
  kernel, with ``"eager"`` attention it counts everything ``analytic_flops`` does.
  """
  from torch.utils.flop_counter import FlopCounterMode
  step, _ = peft_lora_step(cfg, r, alpha, attn_implementation=attn_implementation)
  step()
  counter = FlopCounterMode(display=False)
  with counter:
    step()
  return float(counter.get_total_flops())


def analytic_flops(cfg: Config, r: int = 16) -> dict:
  """Matmul FLOPs of one LoRA step on the benchmark GPT, written out (both implementations).

  Forward: the four block linears, q@k and p@v over all (query, key) pairs,
  the adapters' x@A and (x@A)@B, the head. Backward: the input gradient of all
  of these down to the first block's ``c_attn`` input (not below: nothing there
  is trained), plus the adapters' weight gradients. No base weight gradient.
  """
  n, d, t, v, L = cfg.batch * cfg.seq, cfg.d, cfg.seq, cfg.vocab, cfg.layers
  lin = {"c_attn": (d, 3 * d), "attn_proj": (d, d), "c_fc": (d, 4 * d), "mlp_proj": (4 * d, d)}
  base = sum(2 * n * i * o for i, o in lin.values())
  attn = 2 * 2 * cfg.batch * t * t * d
  ad = sum(2 * n * r * (i + o) for i, o in lin.values())
  head = 2 * n * d * v
  fwd = L * (base + attn + ad) + head
  bwd = head + L * (base + 2 * attn + 2 * ad) - 2 * n * d * 3 * d - 2 * n * d * r
  return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


def hlo_dot_flops(hlo_text: str) -> float:
  """Sum of 2 * output size * contracted size over the ``dot`` ops of an HLO module's text.

  Applied to ``jax.jit(step).lower(...).compile().as_text()`` it gives the
  matmul FLOPs XLA runs, for comparison with ``analytic_flops``.
  """
  shapes = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?(%[\w.-]+) = \w+\[([\d,]*)\]", line)
    if m:
      shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
  total = 0
  for line in hlo_text.splitlines():
    m = re.search(r"= \w+\[([\d,]*)\]\S* dot\((%[\w.-]+),", line)
    if m:
      lhs = shapes[m.group(2)]
      contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
      k = int(np.prod([lhs[int(i)] for i in contracted.split(",") if i]))
      total += 2 * int(np.prod([int(x) for x in m.group(1).split(",") if x])) * k
  return float(total)


def check_equal_work(cfg: Config | None = None, r: int = 4, alpha: float = 8.0, seed: int = 0):
  """Largest |difference| of logits, loss and adapter gradients, lojax vs PEFT, same weights.

  Builds ``LinenGPT(cfg)`` (default: a tiny shape), ``lojax.wrap``s it with
  random, non-zero A and B (``init_lora_weights=False``) on ``"all-linear"``,
  loads the same weights and adapters into ``peft_model(cfg)`` and compares
  float32 logits, the cross-entropy and its gradient with respect to every
  lora_A and lora_B. Returns ``{"logits": ..., "loss": ..., "grads": ...,
  "logit_scale": ...}`` (max-abs differences; the scale is max |logit|).
  """
  import jax
  import torch
  import lojax
  import optax
  from models import LinenGPT
  cfg = cfg or Config(vocab=64, d=32, heads=4, layers=2, seq=16, batch=2)
  ids, labels = batch(cfg, seed)
  flax_model = LinenGPT(cfg)
  params = flax_model.init(jax.random.key(seed), ids)
  # Non-zero biases and LayerNorm affines: an untrained flax init has them at 0 / 1.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  spec = lojax.LoraSpec(r=r, lora_alpha=alpha, target_modules="all-linear",
                        init_lora_weights=False)
  lora = lojax.wrap(params, spec, key=jax.random.key(seed + 1))
  apply = lojax.lorafy(flax_model.apply)

  def loss_fn(tr):
    logits = apply(lora.with_trainable(tr), ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  (j_loss, j_logits), j_grads = jax.value_and_grad(loss_fn, has_aux=True)(lora.trainable)

  model = load_linen_params(peft_model(cfg, r, alpha, seed=seed), params, lora)
  tids, tlabels = (torch.from_numpy(np.asarray(a, np.int64)) for a in (ids, labels))
  t_logits = model(input_ids=tids).logits
  t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, cfg.vocab), tlabels.reshape(-1))
  t_loss.backward()
  names = dict(model.get_base_model().named_modules())
  grad_diff = 0.0
  n_factors = 0
  for path, f in j_grads["default"]["lora"].items():
    i, rest = path.split("/", 2)[1], path.split("/", 2)[2]
    layer = names[f"transformer.h.{i[2:]}.{_BLOCK_LINEARS[rest]}"]
    for key, t_mod in (("lora_A", layer.lora_A["default"]), ("lora_B", layer.lora_B["default"])):
      g = t_mod.weight.grad.numpy().T
      grad_diff = max(grad_diff, float(np.abs(g - np.asarray(f[key])).max()))
      n_factors += 1
  return {"logits": float(np.abs(t_logits.detach().numpy() - np.asarray(j_logits)).max()),
          "loss": abs(float(t_loss.detach()) - float(j_loss)), "grads": grad_diff,
          "logit_scale": float(np.abs(np.asarray(j_logits)).max()), "factors": n_factors,
          "trainable_torch": sum(q.numel() for q in model.parameters() if q.requires_grad),
          "trainable_lojax": sum(x.size for x in jax.tree.leaves(lora.trainable))}


VARIANTS = {"PEFT LoRA (torch, eager)": False, "PEFT LoRA (torch.compile)": True}


def candidates(cfg: Config, r: int, alpha: float, lr: float):
  """The benchmark's PEFT rows, eager and ``torch.compile``, as ``(name, step, result, note)``.

  ``step`` is None (and ``note`` says why) for a variant that cannot run here,
  or for the single ``("PEFT LoRA (torch)", None, {}, reason)`` when torch,
  transformers or peft are missing. The compiled variant is called once here
  (it compiles then: ``result["compile_s"]``); ``run.time_rows`` times the rest.
  """
  reason = peft_unavailable_reason()
  if reason:
    return [("PEFT LoRA (torch)", None, {}, f"not measured: {reason}")]
  threads = set_threads()
  flops = analytic_flops(cfg, r)["total"]
  out = []
  for name, compiled in VARIANTS.items():
    try:
      step, _ = peft_lora_step(cfg, r, alpha, lr, compiled=compiled)
      t0 = time.perf_counter()
      step()
      first = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - the reason is reported in the row
      out.append((name, None, {}, "not measured: " + " ".join(f"{type(e).__name__}: {e}"
                                                               .split())[:300]))
      continue
    out.append((name, step, dict(matmul_flops=flops, torch_threads=threads,
                                 **({"compile_s": first} if compiled else {})), ""))
  return out


def pick(variants: dict, same_run: dict):
  """``(best name or None, result, note)`` of the ``PEFT LoRA (torch)`` row.

  ``variants`` maps each candidate's name to its timing result (a dict with
  ``step_s`` and ``step_s_all``) or to the reason it was not measured;
  ``same_run`` maps "lojax LoRA" and "frozen limit" to theirs, timed with it.
  The row is the faster candidate; its note and result record both, the
  versions, the load average and ``same_run``.
  """
  timed = {k: v for k, v in variants.items() if isinstance(v, dict) and "step_s" in v}
  if not timed:
    return None, {}, "; ".join(f"{k}: {v}" for k, v in variants.items())
  name = min(timed, key=lambda k: timed[k]["step_s"])
  best = timed[name]
  from importlib.metadata import version
  v = {m: version(m) for m in ("torch", "transformers", "peft")}
  load = [round(x, 2) for x in os.getloadavg()]
  spread = lambda res: (f"{res['step_s']:.3f} s (steps {min(res['step_s_all']):.3f}-"
                        f"{max(res['step_s_all']):.3f})" if "step_s" in res else "not timed")
  label = lambda k: "torch.compile" if VARIANTS[k] else "eager"
  variant = label(name)
  note = (f"peft {v['peft']} on transformers {v['transformers']}'s GPT2LMHeadModel of the same "
          f"shape, torch {v['torch']}, {best['torch_threads']} threads; the row is {variant}, "
          "the faster of " + " and ".join(
              f"{label(k)} {spread(res)}" if k in timed else f"{label(k)} ({res})"
              for k, res in variants.items())
          + f"; in the same run lojax LoRA {spread(same_run.get('lojax LoRA', {}))} and the "
          f"limit {spread(same_run.get('frozen limit', {}))} (load average {load[1]:.1f} "
          f"over the last 5 minutes); {best['matmul_flops'] / 1e9:.1f} matmul GFLOPs written out, "
          "the same as lojax's step (peft_row.analytic_flops); compile (s) is torch.compile's "
          "first call, with whatever Inductor cache the machine holds")
  return name, dict(best, variant=variant, same_run=same_run, versions=v,
                    load_average_after=load,
                    variants={k: res["step_s"] if k in timed else res
                              for k, res in variants.items()}), note


@functools.lru_cache(maxsize=None)
def peft_unavailable_reason() -> str | None:
  """None if torch, transformers and peft import and build the model here, else a reason."""
  try:
    import torch  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    m = peft_model(Config(vocab=16, d=8, heads=2, layers=1, seq=4, batch=1), r=2, alpha=4.0)
    n = sum(1 for q in m.parameters() if q.requires_grad)
    if n != 8:
      return (f"peft {peft.__version__}: expected 8 trainable LoRA tensors on a 1-layer GPT-2, "
              f"got {n}")
    return None
  except Exception as e:  # noqa: BLE001 - the reason is the point
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


if __name__ == "__main__":
  print(peft_unavailable_reason())
  print(check_equal_work())
