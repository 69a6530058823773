"""The qwix LoRA row of the benchmark: Google's qwix applied to ``NnxGPT``.

This is the way qwix documents LoRA for an NNX model: a ``qwix.LoraProvider``
whose rule regex matches the module paths of the block linears,
``qwix.apply_lora_to_model(model, provider, *example_inputs, rngs=...)`` (it
runs the model once to create the adapters), and an ordinary functional NNX
training step: ``nnx.split`` the model into its ``nnx.LoRAParam`` variables
(qwix creates ``<kernel>_lora_a`` / ``<kernel>_lora_b`` as ``nnx.LoRAParam``)
and everything else, ``nnx.merge`` inside ``jax.jit`` and optax AdamW on the
LoRA params only.

qwix names an NNX module by the ``/``-joined path from ``nnx.iter_modules``,
e.g. ``h/0/attn/c_attn`` or ``h/3/mlp/c_proj``, and a rule applies where its
``module_path`` regex ``re.fullmatch``-es that path. ``LORA_MODULE_PATH``
matches exactly the four linears of every block, not ``lm_head``, the
embeddings, the LayerNorms or the attention einsums (those sit in
``h/<i>/attn`` itself and have no weight operand anyway).
"""

from __future__ import annotations

import functools
import sys
import pathlib

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from models import Config, NnxGPT, batch, xent  # noqa: E402

# h/<layer>/attn/c_attn, h/<layer>/attn/c_proj, h/<layer>/mlp/c_fc, h/<layer>/mlp/c_proj
LORA_MODULE_PATH = r"h/\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)"


def qwix_lora_model(cfg: Config, r: int = 16, alpha: float = 32.0, *, seed: int = 0):
  """(base NnxGPT, qwix LoRA model, provider) for ``cfg``; the base is left unchanged."""
  import qwix
  from flax import nnx

  model = NnxGPT(cfg, nnx.Rngs(seed))
  ids, _ = batch(cfg)
  provider = qwix.LoraProvider(module_path=LORA_MODULE_PATH, rank=r, alpha=alpha)
  lora_model = qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(seed + 1))
  return model, lora_model, provider


def qwix_lora_step(cfg: Config, r: int = 16, alpha: float = 32.0, lr: float = 1e-3):
  """One jitted AdamW step of qwix LoRA on ``NnxGPT(cfg)``.

  Adapters of rank ``r`` (scale ``alpha / r``, A he-uniform, B zero: qwix's
  defaults) on every block linear (``attn/c_attn``, ``attn/c_proj``,
  ``mlp/c_fc``, ``mlp/c_proj``); embeddings, LayerNorms, biases and
  ``lm_head`` are frozen; only the ``nnx.LoRAParam`` variables are trained.

  Returns ``(step_fn, args)`` with ``args = (lora, opt_state, frozen, ids, labels)``:
  ``lora`` the ``nnx.State`` of the LoRA params, ``opt_state`` its AdamW state,
  ``frozen`` the ``nnx.State`` of every other variable, ``ids``/``labels`` one
  batch. ``step_fn`` is a ``jax.jit`` function (no donation, so it may be
  called again on the same ``args``, and ``step_fn.lower(*args).compile()``
  works) returning ``(new_lora, new_opt_state, loss)``. To train::

      lora, opt_state, loss = step_fn(*args)
      args = (lora, opt_state, *args[2:])
  """
  from flax import nnx

  _, lora_model, _ = qwix_lora_model(cfg, r, alpha)
  ids, labels = batch(cfg)
  graphdef, lora, frozen = nnx.split(lora_model, nnx.LoRAParam, ...)
  tx = optax.adamw(lr)

  @jax.jit
  def step_fn(lora, opt_state, frozen, ids, labels):
    def loss_fn(lora):
      return xent(nnx.merge(graphdef, lora, frozen)(ids), labels)

    loss, grads = jax.value_and_grad(loss_fn)(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step_fn, (lora, tx.init(lora), frozen, ids, labels)


@functools.lru_cache(maxsize=None)
def qwix_unavailable_reason() -> str | None:
  """None if qwix imports and applies LoRA here, else a one-line reason."""
  try:
    import qwix
    from flax import nnx

    cfg = Config(vocab=16, d=8, heads=2, layers=1, seq=4, batch=1)
    base, lora_model, provider = qwix_lora_model(cfg, r=2, alpha=4.0)
    n = len(jax.tree.leaves(nnx.state(lora_model, nnx.LoRAParam)))
    if n != 8:
      return f"qwix {qwix.__version__}: expected 8 LoRA arrays on a 1-layer model, got {n}"
    ids, _ = batch(cfg)
    if not jnp.allclose(lora_model(ids), base(ids), atol=1e-5):
      return f"qwix {qwix.__version__}: LoRA model with B=0 differs from the base model"
    return None
  except Exception as e:  # noqa: BLE001 - the reason is the point
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]
