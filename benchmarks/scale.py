"""Scale by simulation: Llama-3-8B / 70B-shaped LoRA, QLoRA and full fine-tuning steps.

Nothing is allocated: every step is ``jax.jit(step).lower(<jax.ShapeDtypeStruct
with shardings>).compile()`` on fake CPU devices, and the figures are the
compiled program's ``memory_analysis()`` (per device) and the collectives in
its HLO text (``compiled.as_text()``).

``python benchmarks/scale.py`` compiles the 8B model on 8 devices (fsdp 4 x tp 2)
and the 70B model on 64 devices (fsdp 8 x tp 8) and writes
``benchmarks/results/scale.json`` and ``scale.md``; ``--model 8b|70b|tiny``
compiles one model only (``tiny``: 2 layers, d_model 256, 8 devices, the shape
``tests/test_scale.py`` checks; it writes nothing unless ``--out`` is given).

The model (written here in plain JAX): token embedding, ``layers`` pre-norm
decoder blocks (RMSNorm, grouped-query attention with RoPE and a causal mask,
SwiGLU MLP), a final RMSNorm and an untied ``lm_head``; the blocks' params are
stacked on a leading layer axis and run by ``lax.scan`` over a
``jax.checkpoint``-ed block (only the block inputs are kept for the backward).
Base weights are bfloat16, computation bfloat16 with float32 softmax, norms and
loss. Sharding (Megatron tensor parallelism inside FSDP): q/k/v/gate/up
kernels ``[L, in, out]`` are ``P(None, "fsdp", "tp")``, o/down
``P(None, "tp", "fsdp")``, the embedding ``P("tp", "fsdp")``, ``lm_head``
``P("fsdp", "tp")``, norms replicated; the batch is split over "fsdp" and the
activations are constrained to that (heads and MLP hidden units over "tp").

Rows, each one jitted step:

* ``frozen limit``: loss and its gradient with respect to an additive
  perturbation of the embedding output: the frozen model's own forward and
  backward (every input gradient, no weight gradient), the FSDP gathers of the
  frozen model itself;
* ``LoRA``: ``lojax.wrap`` with r = 16 (alpha 32) on q, k, v, o, gate, up and
  down in every layer, fp32 adapters, ``lojax.lorafy`` of the model, AdamW on
  ``lora.trainable`` (fp32 moments); shardings from ``lojax.lora_shardings``
  and ``lojax.opt_state_shardings``; the optimizer state is donated;
* ``QLoRA``: the same with the seven targeted kernels stored as lojax NF4
  ``QuantizedArray`` s (``wrap(..., quantize="nf4")`` quantizes concrete
  kernels on the host; here the abstract ``QuantizedArray`` is built with the
  stored arrays' shapes, checked against ``lojax.wrap(quantize="nf4")`` on the
  tiny model);
* ``full FT``: AdamW on every parameter, float32 master weights and moments
  (cast to bfloat16 for the forward), params and optimizer state donated.
"""

from __future__ import annotations

import argparse
import sys

MODELS = ("tiny", "8b", "70b")


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=MODELS + ("all",), default="all",
                  help="which model to compile (all: 8b and 70b)")
  ap.add_argument("--rows", default="limit,lora,qlora,qlora_g,full",
                  help="comma-separated rows: limit, lora, qlora, qlora_g, full")
  ap.add_argument("--out", default=None,
                  help="folder for scale.json / scale.md (default: benchmarks/results for "
                       "8b/70b/all; nothing for tiny)")
  ap.add_argument("--dump-hlo", default=None,
                  help="folder to write each compiled step's HLO text to")
  return ap.parse_args(argv)


ARGS = _args() if __name__ == "__main__" else None

import os  # noqa: E402

if ARGS is not None:
  _n = 64 if ARGS.model in ("70b", "all") else 8
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_n}")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import lojax  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import fresh_compiles  # noqa: E402
GiB = 2 ** 30
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_NAMES = {"limit": "frozen limit", "lora": "LoRA", "qlimit": "frozen limit, NF4 base",
             "qlora": "QLoRA (NF4 base)", "qlora_g": "QLoRA, codes gathered",
             "full": "full FT"}


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  d: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  ffn: int
  vocab: int
  batch: int    # global, split over "fsdp"
  seq: int
  fsdp: int
  tp: int
  r: int = 16


CONFIGS = {
    # No kernel dim or kernel shard dim equals r, the layer count, the local batch (2) or
    # the sequence length, so kernel-shaped tensors are told apart from the others by shape.
    "tiny": Config("tiny", d=256, layers=3, heads=4, kv_heads=2, head_dim=48, ffn=640,
                   vocab=1536, batch=8, seq=40, fsdp=4, tp=2),
    "8b": Config("Llama-3-8B", d=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                 ffn=14336, vocab=128256, batch=16, seq=2048, fsdp=4, tp=2),
    "70b": Config("Llama-3-70B", d=8192, layers=80, heads=64, kv_heads=8, head_dim=128,
                  ffn=28672, vocab=128256, batch=32, seq=2048, fsdp=8, tp=8),
}


# --------------------------------------------------------------------------
# The model (plain JAX)
# --------------------------------------------------------------------------

def param_shapes(cfg: Config) -> dict:
  """``{path: (shape, PartitionSpec)}`` of the base params, stacked layers first."""
  L, d, q, kv, f = cfg.layers, cfg.d, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn
  col, row = P(None, "fsdp", "tp"), P(None, "tp", "fsdp")
  return {
      "embed/embedding": ((cfg.vocab, d), P("tp", "fsdp")),
      "layers/attn_norm/scale": ((L, d), P()),
      "layers/q_proj/kernel": ((L, d, q), col),
      "layers/k_proj/kernel": ((L, d, kv), col),
      "layers/v_proj/kernel": ((L, d, kv), col),
      "layers/o_proj/kernel": ((L, q, d), row),
      "layers/mlp_norm/scale": ((L, d), P()),
      "layers/gate_proj/kernel": ((L, d, f), col),
      "layers/up_proj/kernel": ((L, d, f), col),
      "layers/down_proj/kernel": ((L, f, d), row),
      "final_norm/scale": ((d,), P()),
      "lm_head/kernel": ((d, cfg.vocab), P("fsdp", "tp")),
  }


def nest(flat: dict) -> dict:
  out = {}
  for path, v in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = v
  return out


def flat_paths(tree) -> dict:
  with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in kp): x for kp, x in with_path}


def rms_norm(x, scale, eps=1e-5):
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x, theta=500000.0):
  """Rotary embedding of ``x [B, S, ..., head_dim]`` at positions 0..S-1."""
  s, hd = x.shape[1], x.shape[-1]
  freqs = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  ang = jnp.arange(s, dtype=jnp.float32)[:, None] * freqs
  ang = ang.reshape((1, s) + (1,) * (x.ndim - 3) + (hd // 2,))
  sin, cos = jnp.sin(ang), jnp.cos(ang)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def block(cfg: Config, c, x, p):
  """One decoder block; ``p`` holds one layer's params, ``c`` constrains activations."""
  b, s, _ = x.shape
  kv, g, hd = cfg.kv_heads, cfg.heads // cfg.kv_heads, cfg.head_dim
  x = c(x, "fsdp")
  h = rms_norm(x, p["attn_norm"]["scale"])
  q = c((h @ p["q_proj"]["kernel"]).reshape(b, s, kv, g, hd), "fsdp", None, "tp")
  k = c((h @ p["k_proj"]["kernel"]).reshape(b, s, kv, hd), "fsdp", None, "tp")
  v = c((h @ p["v_proj"]["kernel"]).reshape(b, s, kv, hd), "fsdp", None, "tp")
  q, k = rope(q), rope(k)
  scores = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32)
  causal = jnp.tril(jnp.ones((s, s), bool))
  scores = jnp.where(causal, scores * hd ** -0.5, -1e30)
  w = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
  o = c(jnp.einsum("bkgqt,btkd->bqkgd", w, v), "fsdp", None, "tp").reshape(b, s, kv * g * hd)
  x = c(x + o @ p["o_proj"]["kernel"], "fsdp")
  h = rms_norm(x, p["mlp_norm"]["scale"])
  a = jax.nn.silu(h @ p["gate_proj"]["kernel"]) * (h @ p["up_proj"]["kernel"])
  return c(x + c(a, "fsdp", None, "tp") @ p["down_proj"]["kernel"], "fsdp")


def loss_fn(cfg: Config, mesh, params, ids, targets, perturb=None):
  """Mean next-token cross-entropy of the decoder (``perturb`` is added to the embeddings)."""

  def c(x, *spec):
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

  x = c(jnp.take(params["embed"]["embedding"], ids, axis=0), "fsdp")
  if perturb is not None:
    x = x + perturb.astype(x.dtype)
  body = jax.checkpoint(lambda x, p: (block(cfg, c, x, p), None))
  x, _ = jax.lax.scan(body, x, params["layers"])
  x = rms_norm(x, params["final_norm"]["scale"])
  logits = c(x @ params["lm_head"]["kernel"], "fsdp", None, "tp").astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# --------------------------------------------------------------------------
# Abstract params, adapters and shardings
# --------------------------------------------------------------------------

def abstract_params(cfg: Config, dtype=jnp.bfloat16) -> tuple[dict, dict]:
  """(params as ShapeDtypeStructs, their PartitionSpecs), nested dicts."""
  shapes = param_shapes(cfg)
  params = nest({p: jax.ShapeDtypeStruct(s, dtype) for p, (s, _) in shapes.items()})
  return params, nest({p: spec for p, (_, spec) in shapes.items()})


def lora_spec(cfg: Config) -> lojax.LoraSpec:
  return lojax.LoraSpec(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=list(TARGETS))


def batch_structs(cfg: Config):
  ids = jax.ShapeDtypeStruct((cfg.batch, cfg.seq), jnp.int32)
  return ids, ids


def wrap_abstract(cfg: Config, params, mesh):
  """``lojax.wrap`` on abstract params (``jax.eval_shape``: nothing is allocated)."""
  ids, targets = batch_structs(cfg)
  fn = functools.partial(loss_fn, cfg, mesh)
  lora = lojax.wrap(params, lora_spec(cfg), key=jax.random.key(0), apply_fn=fn,
                    example_args=(ids, targets))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora)


def nf4_struct(kernel, target) -> lojax.QuantizedArray:
  """The abstract NF4 ``QuantizedArray`` of a stacked kernel (the shapes ``lojax.quantize``
  stores: blocks of 64 along the last axis, codes ``[L, ..., last/64, 32] uint8`` and scales
  ``[L, ..., last/64] float32``; flat ``[L, blocks, ...]`` when 64 does not divide it)."""
  lead = kernel.shape[:1] if target.stacked else ()
  per = kernel.shape[len(lead):]
  if len(per) > 1 and per[-1] % 64 == 0:
    blocks = per[:-1] + (per[-1] // 64,)
  else:
    blocks = (-(-math.prod(per) // 64),)
  data = {"codes": jax.ShapeDtypeStruct(lead + blocks + (32,), jnp.uint8),
          "scales": jax.ShapeDtypeStruct(lead + blocks, jnp.float32)}
  return lojax.QuantizedArray(data, method="nf4", shape=kernel.shape, dtype=kernel.dtype,
                              stacked=bool(target.stacked), in_axes=target.in_axes)


def quantize_abstract(lora: lojax.LoraParams) -> lojax.LoraParams:
  """``lora`` with every adapted base kernel replaced by its abstract NF4 form."""
  flat = flat_paths(lora.base)
  for t in lora.meta.adapter("default").targets:
    flat[t.leaf_path] = nf4_struct(flat[t.leaf_path], t)
  return lojax.LoraParams(nest(flat), lora.adapters, lora.meta)


def check_nf4_structs(cfg: Config, params, mesh) -> None:
  """The abstract NF4 base equals what ``lojax.wrap(..., quantize="nf4")`` stores (concrete,
  so only for the tiny model): same tree, aux data, shapes and dtypes."""
  concrete = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  ids, targets = batch_structs(cfg)
  real = lojax.wrap(concrete, lora_spec(cfg), key=jax.random.key(0), quantize="nf4",
                    apply_fn=functools.partial(loss_fn, cfg, mesh), example_args=(ids, targets))
  mine = quantize_abstract(wrap_abstract(cfg, params, mesh))
  shape = lambda t: [(x.shape, jnp.dtype(x.dtype)) for x in jax.tree.leaves(t)]  # noqa: E731
  assert jax.tree.structure(real.base) == jax.tree.structure(mine.base)
  assert shape(real.base) == shape(mine.base), (shape(real.base), shape(mine.base))
  print("CHECK tiny: the abstract NF4 base has the tree, shapes and dtypes of "
        "lojax.wrap(..., quantize='nf4')", flush=True)


def flat_paths_leaf(tree) -> dict:
  """Like :func:`flat_paths`, with a ``QuantizedArray`` as one leaf."""
  is_q = lambda x: isinstance(x, lojax.QuantizedArray)  # noqa: E731
  with_path = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0]
  return {"/".join(str(k.key) for k in kp): x for kp, x in with_path}


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a tree prefix of ``tree``)."""
  return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  sub),
      shardings, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def make_mesh(cfg: Config):
  n = cfg.fsdp * cfg.tp
  devices = jax.devices()[:n]
  if len(devices) < n:
    raise SystemExit(f"{cfg.name} needs {n} devices, this process has {len(jax.devices())}; "
                     "run benchmarks/scale.py as a script (it sets XLA_FLAGS).")
  return jax.make_mesh((cfg.fsdp, cfg.tp), ("fsdp", "tp"), devices=devices,
                       axis_types=(AxisType.Auto, AxisType.Auto))


# --------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------

def optimizer():
  return optax.adamw(1e-4, weight_decay=0.01)


def compile_row(kind: str, cfg: Config, mesh):
  """(compiled step, lower+compile seconds, info) of one row."""
  params, specs = abstract_params(cfg)
  ns = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
  data = ns(P("fsdp"))
  rep = ns(P())
  ids, targets = batch_structs(cfg)
  a_ids, a_targets = with_shardings(ids, data), with_shardings(targets, data)
  tx = optimizer()
  fn = functools.partial(loss_fn, cfg, mesh)
  info = {}
  start = time.perf_counter()
  if kind in ("qlimit", "qlora", "qlora_g"):
    lora = quantize_abstract(wrap_abstract(cfg, params, mesh))
    # lojax's shardings of the stored arrays, from the kernels' specs (codes and scales keep
    # the kernel's axes, so they split like the kernel); qlora_g gathers the codes over fsdp
    # where each layer decodes them (gather_codes_over), carried to the abstract base as
    # lojax.shard carries it to placed arrays
    shardings = lojax.lora_shardings(lora, specs, mesh=mesh,
                                     gather_codes_over="fsdp" if kind == "qlora_g" else None)
    lora = lojax.LoraParams(jax.tree.map(
        lambda x, s: x.with_gather(s.gather) if isinstance(x, lojax.QuantizedArray) else x,
        lora.base, shardings.base, is_leaf=lambda x: isinstance(x, lojax.QuantizedArray)),
        lora.adapters, lora.meta)
  elif kind == "lora":
    lora = wrap_abstract(cfg, params, mesh)
    shardings = lojax.lora_shardings(lora, specs, mesh=mesh)
  if kind in ("limit", "qlimit"):
    # The frozen model's shardings are the specs (and, for NF4 kernels, the stored arrays'
    # shardings), independent of lojax.lora_shardings.
    base_sh = jax.tree.map(ns, specs, is_leaf=lambda x: isinstance(x, P))
    base = params
    if kind == "qlimit":
      base, base_sh = lora.base, shardings.base
    perturb = jax.ShapeDtypeStruct((cfg.batch, cfg.seq, cfg.d), jnp.bfloat16, sharding=data)

    def limit(base, ids, targets, perturb):
      base = jax.tree.map(lojax.dequantize, base,
                          is_leaf=lambda x: isinstance(x, lojax.QuantizedArray))
      return jax.value_and_grad(lambda q: fn(base, ids, targets, q))(perturb)

    info["perturb_bytes_per_device"] = shard_bytes(perturb, data)
    lowered = jax.jit(limit, in_shardings=(base_sh, data, data, data),
                      out_shardings=(rep, data)).lower(
                          with_shardings(base, base_sh), a_ids, a_targets, perturb)
  elif kind in ("lora", "qlora", "qlora_g"):
    state = jax.eval_shape(tx.init, lora.trainable)
    state_sh = lojax.opt_state_shardings(tx, shardings.trainable, lora.trainable)
    apply = lojax.lorafy(fn)

    def step(lora, opt_state, ids, targets):
      loss, grads = jax.value_and_grad(
          lambda t: apply(lora.with_trainable(t), ids, targets))(lora.trainable)
      updates, opt_state = tx.update(grads, opt_state, lora.trainable)
      return optax.apply_updates(lora.trainable, updates), opt_state, loss

    info["adapter_params"] = sum(math.prod(x.shape) for x in jax.tree.leaves(lora.trainable))
    info["adapter_bytes_per_device"] = shard_bytes(lora.trainable, shardings.trainable)
    info["adapter_leaves"] = adapter_layout(lora.trainable, shardings.trainable)
    lowered = jax.jit(step, in_shardings=(shardings, state_sh, data, data),
                      out_shardings=(shardings.trainable, state_sh, rep),
                      donate_argnums=(1,)).lower(
                          with_shardings(lora, shardings), with_shardings(state, state_sh),
                          a_ids, a_targets)
  elif kind == "full":
    master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    param_sh = jax.tree.map(ns, specs, is_leaf=lambda x: isinstance(x, P))
    state = jax.eval_shape(tx.init, master)
    state_sh = lojax.opt_state_shardings(tx, param_sh, master)

    def full_step(params, opt_state, ids, targets):
      def loss(p):
        return fn(jax.tree.map(lambda x: x.astype(jnp.bfloat16), p), ids, targets)
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    lowered = jax.jit(full_step, in_shardings=(param_sh, state_sh, data, data),
                      out_shardings=(param_sh, state_sh, rep), donate_argnums=(0, 1)).lower(
                          with_shardings(master, param_sh), with_shardings(state, state_sh),
                          a_ids, a_targets)
  else:
    raise ValueError(kind)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  info["lower_s"] = round(lower_s, 1)
  info["compile_s"] = round(time.perf_counter() - start - lower_s, 1)
  return compiled, info


def shard_bytes(tree, shardings) -> int:
  """Bytes of ``tree`` one device holds under ``shardings`` (a tree prefix of ``tree``)."""
  total = 0
  for x in jax.tree.leaves(with_shardings(tree, shardings)):
    total += math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
  return int(total)


def adapter_layout(trainable, shardings) -> dict:
  """``{leaf kind: [shape, spec]}`` of one target per kind (q_proj's and down_proj's factors)."""
  out = {}
  for path, x in flat_paths(trainable).items():
    if any(f"/{m}/" in path for m in ("q_proj", "down_proj")):
      s = flat_paths(shardings)[path]
      out[path.split("/", 3)[-1]] = [list(x.shape), str(s.spec)]
  return out


# --------------------------------------------------------------------------
# HLO analysis: memory and collectives
# --------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "s4": 0.5, "u4": 0.5}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in
          _ARRAY.findall(type_text)]


def _nbytes(arrays) -> int:
  return int(sum(math.prod(s) * _BYTES.get(dt, 4) for dt, s in arrays))


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  arg, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes,
                           m.alias_size_in_bytes, m.temp_size_in_bytes)
  return {"argument": arg, "output": out, "alias": alias, "temp": temp,
          "total": arg + out - alias + temp}


def collectives(hlo: str) -> list[dict]:
  """Every collective of an HLO module: op, shapes, bytes, and how often one step runs it.

  A collective inside a while loop body counts ``known_trip_count`` times (the
  scan over layers); ``bytes`` is the larger of its operands' and results'
  sizes (the gathered tensor of an all-gather, the unreduced one of a
  reduce-scatter), in the dtype of the compiled program.
  """
  comps, types, header_types, order = {}, {}, {}, []
  current = None
  for line in hlo.splitlines():
    h = _HEADER.match(line)
    if h:
      current = h.group(1)
      comps[current], entry = [], line.startswith("ENTRY")
      order.append((current, entry))
      for name, t in re.findall(r"([\w.\-]+):\s+([^,()]+(?:\([^)]*\))?)", h.group(2)):
        header_types[name] = t
      continue
    if current is None:
      continue
    m = _INSTR.match(line)
    if m:
      name, type_text, op, rest = m.groups()
      types[name] = type_text
      comps[current].append((name, type_text, op, rest))
  mult = {c: 0 for c in comps}
  for c, entry in order:
    if entry:
      mult[c] = 1
  # Propagate multiplicities callers -> callees (HLO text lists callees before callers).
  for c, _ in reversed(order):
    for name, type_text, op, rest in comps[c]:
      n = 1
      if op == "while":
        t = _TRIP.search(rest)
        n = int(t.group(1)) if t else 1
      for role, callee in _CALLS.findall(rest):
        if callee in mult:
          mult[callee] += mult[c] * (n if role == "body" else 1)
      for b in _BRANCHES.findall(rest):
        for callee in re.findall(r"%?([\w.\-]+)", b):
          if callee in mult:
            mult[callee] += mult[c]
  out = []
  for c, _ in order:
    for name, type_text, op, rest in comps[c]:
      base = op[:-len("-start")] if op.endswith("-start") else op
      if base not in COLLECTIVES or op.endswith("-done"):
        continue
      operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
      in_arrays = [a for o in operands for a in _arrays(types.get(o, header_types.get(o, "")))]
      out_arrays = _arrays(type_text)
      if op.endswith("-start") and len(out_arrays) >= 2 * len(in_arrays) > 0:
        out_arrays = out_arrays[len(in_arrays):]   # (operands, results) tuple of an async start
      groups = re.search(r"replica_groups=(\S+(?:\s\{[^}]*\})?)", rest)
      out.append({"op": base, "computation": c, "times": mult[c],
                  "out_shapes": [list(s) for _, s in out_arrays],
                  "in_shapes": [list(s) for _, s in in_arrays],
                  "dtypes": sorted({dt for dt, _ in out_arrays}),
                  "bytes": max(_nbytes(in_arrays), _nbytes(out_arrays)),
                  "groups": groups.group(1) if groups else ""})
  return out


def summarize(ops: list[dict]) -> dict:
  """``{op: {count, executed, bytes_per_step, largest}}`` (count: in the HLO text;
  executed: per step, loop trips included)."""
  out = {}
  for op in COLLECTIVES:
    mine = [o for o in ops if o["op"] == op]
    out[op] = {"count": len(mine), "executed": sum(o["times"] for o in mine),
               "bytes_per_step": sum(o["bytes"] * o["times"] for o in mine),
               "largest": max((o["bytes"] for o in mine), default=0)}
  return out


def kernel_shapes(cfg: Config) -> set:
  """Sorted-dims shapes of every base kernel (one layer, and stacked) and of its shards: each
  axis whole or divided by a mesh axis size or by the device count. A shape with an axis of
  size r is left out (an adapter tensor: 70B's k_proj split 64 ways would be [8192, 16])."""
  divisors = sorted({1, cfg.fsdp, cfg.tp, cfg.fsdp * cfg.tp})
  out = set()
  for path, (shape, _) in param_shapes(cfg).items():
    if not path.endswith(("kernel", "embedding")):
      continue
    choices = [{n // k for k in divisors if n % k == 0} for n in shape]
    for dims in itertools.product(*choices):
      for s in {dims, dims[1:] if len(dims) == 3 else dims}:
        if cfg.r not in s:
          out.add(tuple(sorted(s)))
  return out


def tensors(ops: list[dict]) -> list[dict]:
  """The collectives split into their tensors (a combined all-reduce moves several)."""
  out = []
  for o in ops:
    n = len(o["out_shapes"])
    ins = o["in_shapes"] if len(o["in_shapes"]) == n else [[]] * n
    for i, (a, b) in enumerate(zip(ins, o["out_shapes"])):
      out.append({"op": o["op"], "in": tuple(a), "out": tuple(b), "times": o["times"],
                  "elements": max(math.prod(a) if a else 0, math.prod(b))})
  return out


def full_kernel_gathers(cfg: Config, ts: list[dict]) -> int:
  """How many all-gathers per step produce a whole (unsharded) per-layer block kernel (shapes
  that are also a shard of another kernel, e.g. 70B's k_proj [8192, 1024] and q_proj split
  8 ways, are left out)."""
  sizes = {"fsdp": cfg.fsdp, "tp": cfg.tp}
  whole, shards = set(), set()
  for p, (shape, spec) in param_shapes(cfg).items():
    if p.startswith("layers/") and p.endswith("kernel"):
      whole.add(tuple(sorted(shape[1:])))
      entries = list(spec)[1:] + [None] * 2
      choices = [{n} | ({n // sizes[e]} if e else set()) for n, e in zip(shape[1:], entries)]
      shards |= {tuple(sorted(d)) for d in itertools.product(*choices)} - {tuple(sorted(shape[1:]))}
  whole -= shards
  return sum(t["times"] for t in ts if t["op"] == "all-gather" and _squeeze(t["out"]) in whole)


def _squeeze(shape) -> tuple:
  return tuple(sorted(d for d in shape if d != 1))


def compare(cfg: Config, rows: dict, limit_name: str, names: tuple, adapter_leaf_elements: int
            ) -> dict:
  """The claim, checked on the tensors the LoRA-type rows move in collectives.

  Against the frozen limit ``limit_name`` (the same base):

  * kernel-shaped tensors (the shape of a base kernel, one layer or stacked,
    or of one of its shards) of the step: all also moved by the frozen limit,
    by the same op, no more often;
  * the largest all-gather / reduce-scatter tensor of the step is no larger
    (in elements) than the frozen limit's largest;
  * every tensor the step moves that the frozen limit does not (by op and
    shape, counting repeats) is adapter-sized: at most as many elements as
    the largest adapter leaf (a stacked ``lora_A`` / ``lora_B``).
  """
  shapes = kernel_shapes(cfg)

  def key(t):
    return (t["op"], _squeeze(t["out"]))

  def kernel_shaped(t):
    return _squeeze(t["out"]) in shapes or (t["in"] and _squeeze(t["in"]) in shapes)

  def tally(ts):
    c = {}
    for t in ts:
      c[key(t)] = c.get(key(t), 0) + t["times"]
    return c

  def largest(ts):  # the CPU backend reduce-scatters as an all-reduce + slice
    return max((t["elements"] for t in ts
                if t["op"] in ("all-gather", "reduce-scatter", "all-reduce")), default=0)

  limit = tensors(rows[limit_name]["ops"])
  limit_all = tally(limit)
  out = {}
  for name in names:
    if name not in rows:
      continue
    ts = tensors(rows[name]["ops"])
    mine = tally(ts)
    extra_keys = {k: n - limit_all.get(k, 0) for k, n in mine.items() if n > limit_all.get(k, 0)}
    extra_kernel = {f"{k[0]} {list(k[1])}": n for k, n in extra_keys.items()
                    if k[1] in shapes}
    size = {key(t): t["elements"] for t in ts}
    extra_sorted = sorted(extra_keys, key=lambda k: -size[k])
    largest_extra = max((size[k] for k in extra_keys), default=0)
    out[name] = {
        "limit": limit_name,
        "limit_largest_gather_or_scatter_elements": largest(limit),
        "largest_adapter_leaf_elements": adapter_leaf_elements,
        "full_kernel_gathers_per_step": full_kernel_gathers(cfg, ts),
        "limit_full_kernel_gathers_per_step": full_kernel_gathers(cfg, limit),
        "kernel_shaped_not_in_limit": extra_kernel,
        "largest_gather_or_scatter_elements": largest(ts),
        "extra_tensors_per_step": sum(extra_keys.values()),
        "extra_elements_per_step": sum(size[k] * n for k, n in extra_keys.items()),
        "largest_extra_elements": largest_extra,
        "extra_largest": [f"{k[0]} {list(k[1])} x{extra_keys[k]}" for k in extra_sorted[:6]],
        "ok": (not extra_kernel and largest(ts) <= largest(limit)
               and largest_extra <= adapter_leaf_elements),
    }
  return out


def adapter_leaf_max(cfg: Config) -> int:
  """Elements of the largest adapter leaf: a stacked factor of the widest target."""
  dims = [cfg.d, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn]
  return cfg.layers * max(dims) * cfg.r


def run_model(key: str, rows: list[str], dump_hlo: str | None = None) -> dict:
  cfg = CONFIGS[key]
  mesh = make_mesh(cfg)
  res = {"config": dataclasses.asdict(cfg), "mesh": {"fsdp": cfg.fsdp, "tp": cfg.tp},
         "devices": cfg.fsdp * cfg.tp, "rows": {}}
  if "qlora" in rows and "qlimit" not in rows:
    rows = rows + ["qlimit"]
  order = ("limit", "lora", "qlimit", "qlora", "qlora_g", "full")
  if key == "tiny" and "qlora" in rows:
    check_nf4_structs(cfg, abstract_params(cfg)[0], mesh)
  for kind in [r for r in order if r in rows or r == "limit"]:
    compiled, info = compile_row(kind, cfg, mesh)
    hlo = compiled.as_text()
    if dump_hlo:
      pathlib.Path(dump_hlo).mkdir(parents=True, exist_ok=True)
      (pathlib.Path(dump_hlo) / f"{key}_{kind}.hlo.txt").write_text(hlo)
    ops = collectives(hlo)
    row = {"name": ROW_NAMES[kind], "memory": memory(compiled), "collectives": summarize(ops),
           **info, "ops": ops}
    res["rows"][kind] = row
    mem = row["memory"]
    print(f"{cfg.name} {ROW_NAMES[kind]}: total {mem['total'] / GiB:.2f} GiB per device "
          f"(arg {mem['argument'] / GiB:.2f}, out {mem['output'] / GiB:.2f}, alias "
          f"{mem['alias'] / GiB:.2f}, temp {mem['temp'] / GiB:.2f}); lower {info['lower_s']} s, "
          f"compile {info['compile_s']} s", flush=True)
    for op, s in row["collectives"].items():
      if s["count"]:
        print(f"  {op}: {s['count']} in HLO, {s['executed']} per step, "
              f"{s['bytes_per_step'] / GiB:.3f} GiB per step, largest {s['largest'] / 2**20:.1f} MiB",
              flush=True)
    del compiled
  res["checks"] = compare(cfg, res["rows"], "limit", ("lora",), adapter_leaf_max(cfg))
  if "qlimit" in res["rows"]:
    res["checks"].update(compare(cfg, res["rows"], "qlimit", ("qlora",), adapter_leaf_max(cfg)))
  for kind in ("qlimit", "qlora"):
    if "lora_shardings_error" in res["rows"].get(kind, {}):
      print(f"NOTE {kind}: lojax.lora_shardings' base sharding of an NF4 kernel fails: "
            f"{res['rows'][kind]['lora_shardings_error']}", flush=True)
  for name in ("lora", "qlora"):
    if name in res["checks"]:
      print(f"CHECK {cfg.name} {name}: {json.dumps(res['checks'][name])}", flush=True)
  return res


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def _gib(x) -> str:
  return f"{x / GiB:.2f}"


def _coll(s) -> str:
  if not s["executed"]:
    return "—"
  return f"{s['executed']} / {s['bytes_per_step'] / GiB:.2f}"


def markdown(results: dict) -> str:
  lines = [
      "## Scale by simulation: Llama-3-8B and 70B shapes on fake CPU devices",
      "",
      "`python benchmarks/scale.py` (`--model 8b|70b|tiny`; both models in about "
      f"{results['total_s']:.0f} s on 2 CPU cores) compiles each step with "
      "`jax.jit(step).lower(<ShapeDtypeStructs with shardings>).compile()` on fake CPU "
      "devices, so nothing is allocated, and reads `memory_analysis()` and the collectives of "
      "the compiled HLO (`benchmarks/results/scale.json` has every collective). The model is "
      "written in the script: RMSNorm, GQA attention with RoPE, SwiGLU MLP, `lax.scan` over "
      "the stacked layers with `jax.checkpoint` per layer, bf16 base, untied head. **LoRA**: "
      "`lojax.wrap` with r = 16 (alpha 32) on q, k, v, o, gate, up and down of every layer, "
      "fp32 adapters, `lojax.lorafy`, AdamW on `lora.trainable`, shardings from "
      "`lojax.lora_shardings` / `lojax.opt_state_shardings`. **QLoRA**: the same on an NF4 "
      "base (lojax's `QuantizedArray` layout). **Frozen limit**: the frozen model's loss and "
      "its gradient with respect to a perturbation of the embedding output (the frozen "
      "model's own forward, backward and FSDP gathers); the NF4 one decodes the base with "
      "`lojax.dequantize`. **Full FT**: AdamW on every param, fp32 master weights and moments, "
      "bf16 forward. Mesh fsdp x tp: q/k/v/gate/up kernels `P(None, 'fsdp', 'tp')`, o/down "
      "`P(None, 'tp', 'fsdp')`, embedding `P('tp', 'fsdp')`, head `P('fsdp', 'tp')`, batch "
      "over fsdp; optimizer states and LoRA trainables donated.",
      "",
      "Memory per device in GiB: arguments, outputs not aliased to a donated input, temp, and "
      "their total. Collectives: how many run per step (loop trips counted) / GiB they move "
      "per step.",
      "",
      "| model | mesh | batch x seq | row | arg | out | temp | total | all-gather | "
      "reduce-scatter | all-reduce | all-to-all | collective-permute | compile (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for key, res in results["models"].items():
    cfg = res["config"]
    for kind, row in res["rows"].items():
      m, c = row["memory"], row["collectives"]
      lines.append(
          f"| {cfg['name']} | {cfg['fsdp']} x {cfg['tp']} | {cfg['batch']} x {cfg['seq']} | "
          f"{row['name']} | {_gib(m['argument'])} | {_gib(m['output'] - m['alias'])} | "
          f"{_gib(m['temp'])} | {_gib(m['total'])} | "
          + " | ".join(_coll(c[op]) for op in COLLECTIVES) + f" | {row['compile_s']} |")
  lines += ["", "The claim, checked per tensor moved (a combined all-reduce moves several): "
            "a LoRA step moves no kernel-shaped tensor (a block kernel, the head or the "
            "embedding, per layer or stacked, whole or split by the mesh) that its frozen limit "
            "does not move as often, and its largest all-gather / all-reduce tensor is no "
            "larger than the limit's; everything else it moves is adapter-sized.", ""]
  for key, res in results["models"].items():
    rows = res["rows"]
    for name, chk in res["checks"].items():
      lim = rows[chk["limit"]]
      lines.append(
          f"- {res['config']['name']} {ROW_NAMES[name]} vs {lim['name']}: kernel-shaped "
          f"tensors beyond the limit's: {len(chk['kernel_shaped_not_in_limit']) or 'none'}; "
          f"largest all-gather / all-reduce tensor {chk['largest_gather_or_scatter_elements']:,} "
          f"elements (limit: {chk['limit_largest_gather_or_scatter_elements']:,}); "
          f"{chk['extra_tensors_per_step']:,} tensors a step that the limit does not move, "
          f"the largest {chk['largest_extra_elements']:,} elements (largest adapter leaf: "
          f"{chk['largest_adapter_leaf_elements']:,}): **{'holds' if chk['ok'] else 'fails'}**.")
  lines += [""]
  for key, res in results["models"].items():
    rows, name = res["rows"], res["config"]["name"]
    tot = {k: r["memory"]["total"] for k, r in rows.items()}
    ag = lambda r: r["collectives"]["all-gather"]["bytes_per_step"]  # noqa: E731
    if {"lora", "full", "limit"} <= set(tot):
      lines.append(
          f"- {name}: LoRA needs {tot['lora'] / tot['full']:.2f}x full fine-tuning's memory "
          f"per device and {tot['lora'] / tot['limit']:.2f}x the frozen limit's.")
    if {"qlora", "lora", "limit", "qlimit"} <= set(rows):
      q, l = rows["qlora"], rows["lora"]
      lines.append(
          f"- {name} QLoRA: arguments {_gib(q['memory']['argument'])} GiB against "
          f"{_gib(l['memory']['argument'])} GiB for LoRA, temp {_gib(q['memory']['temp'])} "
          f"against {_gib(l['memory']['temp'])} GiB; all-gathers move {ag(q) / ag(l):.2f}x "
          f"LoRA's bytes, and "
          f"{res['checks']['qlora']['full_kernel_gathers_per_step']} all-gathers a step "
          f"produce a whole per-layer kernel (LoRA: "
          f"{res['checks']['lora']['full_kernel_gathers_per_step']}).")
    if {"qlora_g", "lora"} <= set(rows):
      g, l = rows["qlora_g"], rows["lora"]
      lines.append(
          f"- {name} QLoRA with `gather_codes_over='fsdp'`: all-gathers move "
          f"{_gib(ag(g))} GiB a step, {ag(g) / ag(l):.2f}x LoRA's {_gib(ag(l))} GiB (the 4-bit "
          f"codes instead of the decoded kernels); {_gib(g['memory']['total'])} GiB per device "
          f"in all (temp {_gib(g['memory']['temp'])}), against {_gib(l['memory']['total'])} "
          f"for LoRA.")
  lines += [
      "",
      "Reading the figures:",
      "",
      "- The CPU backend has no bf16 matmul: XLA converts bf16 operands to f32 before "
      "partitioning its collectives and hoists whole-stack conversions out of the scan, so "
      "bf16 tensors are gathered as f32 (twice their bytes), and temp holds f32 copies of the "
      "stacked kernel shards and an f32 stash of the layer inputs. Absolute temp figures are "
      "therefore higher than on GPU / TPU; rows compare with each other.",
      "- The CPU backend makes no reduce-scatter: gradients are all-reduced and sliced, which "
      "is why the column is empty and full FT shows its weight gradients as extra all-reduce "
      "bytes.",
      "- NF4 base: the stored arrays keep the kernel's axes (codes `[L, in, out/64, 32]`, "
      "scales `[L, in, out/64]`: blocks of 64 along the output axis), and "
      "`lojax.lora_shardings` shards them like the kernel, so a device holds the codes of "
      "its own kernel shard, as in the float model. XLA then decodes each shard and "
      "all-gathers the decoded kernel, as many bytes as LoRA's; with "
      "`lora_shardings(..., gather_codes_over='fsdp')` (the 'codes gathered' row) each layer "
      "all-gathers its codes and scales and decodes the gathered kernel, as FSDP with QLoRA "
      "does in PyTorch. A checkpointed layer takes the codes as its input, so the backward "
      "keeps codes, not decoded kernels. "
      "The scan over the quantized stack slices the stored arrays and decodes one layer "
      "per step (and the lean dense op decodes again in the backward from the codes), so "
      "no float copy of the stack is held.",
  ]
  return "\n".join(lines) + "\n"


@fresh_compiles()
def main(args):
  keys = ["8b", "70b"] if args.model == "all" else [args.model]
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  results = {"jax": jax.__version__, "backend": f"{jax.default_backend()} "
             f"({len(jax.devices())} fake devices)",
             "models": {}}
  start = time.perf_counter()
  for key in keys:
    results["models"][key] = run_model(key, rows, args.dump_hlo)
  results["total_s"] = round(time.perf_counter() - start, 1)
  out = args.out or (None if args.model == "tiny" else str(HERE / "results"))
  print(f"total {results['total_s']} s", flush=True)
  if out:
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "scale.json").write_text(json.dumps(results, indent=1))
    (path / "scale.md").write_text(markdown(results))
    print(f"wrote {path / 'scale.json'} and {path / 'scale.md'}", flush=True)
  return results


if __name__ == "__main__":
  main(ARGS)
