"""The QLoRA rows of the benchmark: LoRA on an NF4 base, lojax's and qwix's, on ``NnxGPT``.

All the rows train the same adapters as the LoRA rows (rank ``r`` on every block linear,
AdamW on the adapters only) with the block linears' kernels stored as NF4 in blocks of 64
values; embeddings, LayerNorms, biases and ``lm_head`` stay float32, as in QLoRA, except in
the row that stores the embeddings and ``lm_head`` as NF4 too. They run on the NNX model, so
their ratios are against ``frozen limit (NNX)``, the float32 limit of the same family,
measured in the same run.

* ``lojax QLoRA (NF4)``: ``lojax.wrap(state, spec, quantize="nf4")`` on the model's
  ``nnx.State``: each targeted kernel becomes a ``lojax.QuantizedArray`` (codes packed two per
  ``uint8``, one float32 absmax per block of 64 consecutive row-major values), dequantized
  inside the step.
* ``lojax QLoRA (NF4, double-quant)``: ``quantize="nf4-dq"``: the block absmaxes are stored
  again as int8 in blocks of 256 (QLoRA's double quantization).
* ``lojax QLoRA (NF4, embeddings and head too)``: as ``lojax QLoRA (NF4)``, with the frozen
  ``wte``, ``wpe`` and ``lm_head`` (not LoRA targets) stored as NF4 as well: each is
  ``lojax.quantize(leaf, "nf4")`` in the state before ``lojax.wrap``, and lorafy decodes every
  quantized base leaf inside the step. On this GPT the float32 embeddings and head are 40% of
  the parameters (a vocabulary of 8192 at d_model 512), so without them the step's arguments
  stay above half the float32 model's whatever the block kernels take.
* ``qwix QLoRA (NF4)``: ``qwix.LoraProvider(..., weight_qtype="nf4", tile_size=64)`` applied
  with ``qwix.apply_lora_to_model`` (which quantizes each matched kernel on the model's first
  call: ``uint4`` codes, one float32 absmax per tile of 64 input features per output
  feature), trained like ``qwix_row.py``'s LoRA row.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import lojax  # noqa: E402
from lojax._src import quant  # noqa: E402
from models import Config, NnxGPT, batch, lora_step, xent  # noqa: E402
import qwix_row  # noqa: E402

LOJAX_ROWS = {"lojax QLoRA (NF4)": "nf4", "lojax QLoRA (NF4, double-quant)": "nf4-dq",
              "lojax QLoRA (NF4, embeddings and head too)": "nf4"}
ALSO = {"lojax QLoRA (NF4, embeddings and head too)": ("wte", "wpe", "lm_head")}
"""The frozen modules besides the block linears that a row stores quantized."""
QWIX_ROW = "qwix QLoRA (NF4)"
NAMES = tuple(LOJAX_ROWS) + (QWIX_ROW,)
TILE = quant.BLOCK   # qwix's tile_size: the values per absmax, lojax's NF4 block size


def lojax_qlora(cfg: Config, method: str, r: int = 16, alpha: float = 32.0, *, seed: int = 0,
                also: tuple[str, ...] = ()):
  """``(graphdef, lora)``: ``NnxGPT(cfg)``'s state wrapped with ``quantize=method``; the
  kernels and embeddings of the modules ``also`` (not LoRA targets) quantized with ``method``
  beforehand."""
  from flax import nnx
  graphdef, state = nnx.split(NnxGPT(cfg, nnx.Rngs(seed)))
  for name in also:
    module = state[name]
    leaf = "embedding" if "embedding" in module else "kernel"
    module[leaf].set_value(lojax.quantize(module[leaf].get_value(), method))
  spec = lojax.LoraSpec(r=r, lora_alpha=alpha, target_modules="all-linear")
  return graphdef, lojax.wrap(state, spec, key=jax.random.key(seed + 1), quantize=method)


def lojax_qlora_step(cfg: Config, method: str, r: int = 16, alpha: float = 32.0,
                     lr: float = 1e-3, also: tuple[str, ...] = ()):
  """One jitted AdamW step of lojax LoRA on an NF4 (``method``) base of ``NnxGPT(cfg)``.

  Returns ``(step_fn, args)`` with ``args = (lora, opt_state, ids, labels)``; ``step_fn``
  returns ``(new_trainable, new_opt_state, loss)`` (no donation: it may be called again on
  the same ``args``).
  """
  from flax import nnx
  graphdef, lora = lojax_qlora(cfg, method, r, alpha, also=also)
  apply = lojax.lorafy(lambda st, x: nnx.merge(graphdef, st)(x))
  ids, labels = batch(cfg)
  tx = optax.adamw(lr)
  return lora_step(apply, tx), (lora, tx.init(lora.trainable), ids, labels)


def qwix_qlora_model(cfg: Config, r: int = 16, alpha: float = 32.0, *, seed: int = 0):
  """The qwix QLoRA model of ``NnxGPT(cfg)``: NF4 kernels in tiles of :data:`TILE`."""
  import qwix
  from flax import nnx
  model = NnxGPT(cfg, nnx.Rngs(seed))
  ids, _ = batch(cfg)
  provider = qwix.LoraProvider(module_path=qwix_row.LORA_MODULE_PATH, rank=r, alpha=alpha,
                               weight_qtype="nf4", tile_size=TILE)
  return qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(seed + 1))


def qwix_qlora_step(cfg: Config, r: int = 16, alpha: float = 32.0, lr: float = 1e-3):
  """One jitted AdamW step of qwix QLoRA, as ``qwix_row.qwix_lora_step`` (same ``args``)."""
  from flax import nnx
  graphdef, lora, frozen = nnx.split(qwix_qlora_model(cfg, r, alpha), nnx.LoRAParam, ...)
  ids, labels = batch(cfg)
  tx = optax.adamw(lr)

  @jax.jit
  def step(lora, opt_state, frozen, ids, labels):
    loss, grads = jax.value_and_grad(
        lambda lo: xent(nnx.merge(graphdef, lo, frozen)(ids), labels))(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step, (lora, tx.init(lora), frozen, ids, labels)


def qwix_qlora_or_reason(cfg: Config, r: int, alpha: float, lr: float):
  """``(step_fn, args, None)`` if qwix's NF4 QLoRA builds a model of ``cfg`` here and its step
  traces, else ``(None, (), reason)`` with a one-line reason. (Nothing is compiled, so the
  row's compile time stays its own.)"""
  try:
    fn, args = qwix_qlora_step(cfg, r, alpha, lr)
    jax.eval_shape(fn, *args)
    return fn, args, None
  except Exception as e:  # noqa: BLE001 - the reason is the point
    return None, (), " ".join(f"{type(e).__name__}: {e}".split())[:300]


def stored_bytes(cfg: Config, method: str, also: tuple[str, ...] = ()) -> tuple[int, int]:
  """``(stored, float32)`` bytes of the block linears' kernels (and of the modules ``also``)
  under lojax's ``method`` (written out from the layout in ``lojax/_src/quant.py``, padding
  included; every row of these matrices is a whole number of blocks)."""
  sizes = {"wte": cfg.vocab * cfg.d, "wpe": cfg.seq * cfg.d, "lm_head": cfg.d * cfg.vocab}
  block = [cfg.d * 3 * cfg.d, cfg.d * cfg.d, cfg.d * 4 * cfg.d, 4 * cfg.d * cfg.d]
  stored = fp32 = 0
  for n in block * cfg.layers + [sizes[name] for name in also]:
    blocks = -(-n // quant.BLOCK)
    sblocks = -(-blocks // quant.SCALE_BLOCK)
    scales = 4 * blocks if method == "nf4" else quant.SCALE_BLOCK * sblocks + 4 * sblocks + 4
    stored += quant.BLOCK // 2 * blocks + scales
    fp32 += 4 * n
  return stored, fp32


def candidates(cfg: Config, r: int, alpha: float, lr: float):
  """``(name, step_fn, args, opt_state_bytes, note)`` per QLoRA row; ``step_fn`` None (and
  ``note`` the reason) for a row that cannot run here."""
  nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  out = []
  for name, method in LOJAX_ROWS.items():
    also = ALSO.get(name, ())
    fn, args = lojax_qlora_step(cfg, method, r, alpha, lr, also)
    stored, fp32 = stored_bytes(cfg, method, also)
    what = "block kernels" + (f" and {', '.join(also)}" if also else "")
    out.append((name, fn, args, nbytes(args[1]),
                f"{what} stored in {stored / 2**20:.1f} MiB, {stored / fp32:.3f}x their "
                f"{fp32 / 2**20:.0f} MiB in float32"))
  fn, args, reason = qwix_qlora_or_reason(cfg, r, alpha, lr)
  if reason:
    out.append((QWIX_ROW, None, (), None, f"not measured: {reason}"))
  else:
    from importlib.metadata import version
    out.append((QWIX_ROW, fn, args, nbytes(args[1]),
                f"qwix {version('qwix')}, weight_qtype nf4, tile_size {TILE}"))
  return out
