"""What the interpreter does with each primitive that reads an adapted kernel.

:data:`HANDLERS` is the one table, keyed by primitive objects like JAX's own
rule tables (``ad.primitive_jvps[lax.dot_general_p]``). A primitive falls in
one of four groups:

* consumers (``dot_general``, ``conv_general_dilated``, ``gather``,
  ``ragged_dot_general``): the factorized rules of :mod:`lojax._src.rules`;
* layout ops (``transpose``, ``reshape``, ``squeeze``, ``broadcast_in_dim``,
  ``slice``, ``dynamic_slice``, ``split``, ``unstack``): applied to the
  factors (:mod:`lojax._src.tagged`), so ``jnp.split``, ``jnp.squeeze``,
  ``jnp.expand_dims``, ``jnp.moveaxis`` or ``w.T`` of a kernel stay factorized;
* representation ops (``convert_element_type``, ``copy``, ``device_put``,
  sharding constraints, ...): the value changes, the factors pass through;
* higher-order primitives (``jit``, ``closed_call``, ``remat``, ``scan``,
  ``while``, ``cond``): entered, their inner jaxprs interpreted the same way.

A handler is ``handler(eqn, invals, ctx, run) -> outputs`` (what
``eqn.primitive.bind`` would return, tagged where they derive from a kernel)
or ``None`` when this use cannot be factorized; ``run`` is the interpreter's
``run(jaxpr, consts, args, ctx)`` for the inner jaxprs of higher-order
primitives. Every other primitive, and every ``None``, gets the merged kernel
``W + s*A@B`` from :func:`merged`, which warns once per path and op.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
from jax.extend import core as jcore
from jax.extend.core import primitives as _jex_prims

from lojax._src import model
from lojax._src import rules
from lojax._src import tagged as tg

Tagged = tg.Tagged
Handler = Callable[[Any, list, rules.Context, Callable], Any]

# --------------------------------------------------------------------------
# JAX version shim, written for jax 0.10.x.
# On 0.10 every primitive below is public (jax.lax or
# jax.extend.core.primitives); older versions name some differently (pjit_p
# before jit_p) or lack them (split_p, unstack_p). A primitive this JAX lacks
# is None and left out of the table: its uses get the merged kernel (with the
# usual warning) instead of failing at import. No private module is imported.
# --------------------------------------------------------------------------
_SOURCES = {"lax": lax, "jex": _jex_prims}


def _find(*names: str) -> jcore.Primitive | None:
  """The first of ``names`` ("lax.x_p" / "jex.x_p") that is a primitive here, or None."""
  for name in names:
    source, _, attr = name.partition(".")
    p = getattr(_SOURCES[source], attr, None)
    if isinstance(p, jcore.Primitive):
      return p
  return None


jit_p = _find("jex.jit_p", "jex.pjit_p")
closed_call_p = _find("jex.closed_call_p")
call_p = _find("jex.call_p")
remat_p = _find("jex.remat_p")
copy_p = _find("lax.copy_p", "jex.copy_p")
device_put_p = _find("lax.device_put_p", "jex.device_put_p")
sharding_constraint_p = _find("lax.sharding_constraint_p", "jex.sharding_constraint_p")
optimization_barrier_p = _find("lax.optimization_barrier_p")
split_p = _find("lax.split_p")
unstack_p = _find("lax.unstack_p")


def _traced(fn) -> jcore.Primitive | None:
  """The primitive of the one equation ``fn`` traces to on a float32[1] under a one-device
  Explicit mesh, for primitives JAX exports only through a function (abstract: no backend
  is started)."""
  mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Explicit,))
  try:
    with jax.sharding.use_abstract_mesh(mesh):
      eqns = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((1,), jnp.float32)).jaxpr.eqns
  except Exception:   # noqa: BLE001 -- a JAX without it: its uses get the merged kernel
    return None
  return eqns[0].primitive if len(eqns) == 1 else None


reshard_p = _traced(lambda x: jax.sharding.reshard(x, P()))


def _traced_primitive(fn, *shapes) -> jcore.Primitive | None:
  """The primitive a public function binds (for those JAX does not export), or None."""
  try:
    eqns = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes)).eqns
  except Exception:  # noqa: BLE001 -- a JAX without it
    return None
  return eqns[-1].primitive if eqns else None


ragged_dot_general_p = _traced_primitive(
    lambda x, w, g: lax.ragged_dot(x, w, g),
    ((2, 2), jnp.float32), ((1, 2, 2), jnp.float32), ((1,), jnp.int32))
# ---- end of the shim -----------------------------------------------------


def bind(eqn, invals):
  """Binds ``eqn``'s primitive to ``invals`` with the equation's params and context."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **params)


def merged(ctx: rules.Context, x, prim: str):
  """``x`` itself, or the merged kernel of a tagged ``x`` (warns once per path and ``prim``)."""
  if not isinstance(x, Tagged):
    return x
  rules.record_other(ctx, x, prim)
  if x.terms and ctx.example_ids is not None:
    raise ValueError(
        f"The adapted kernel '{x.path}' is used by `{prim}`, which lojax cannot factorize, in "
        "a mixed-adapter batch (`lora_adapter_ids`): a merged kernel is one kernel for the "
        "whole batch, so the examples cannot each get their own adapter. Run one call per "
        "adapter (lojax.set_adapter), or leave this module out of the adapters' targets.")
  if x.terms and (x.path, prim) not in ctx.warned:
    ctx.warned.add((x.path, prim))
    warnings.warn(
        f"lojax: the adapted kernel '{x.path}' is used by `{prim}`, which lojax cannot "
        "factorize; this use gets the merged kernel W + s*A@B (a full-size weight "
        "gradient in training). Factorized uses: dot_general/einsum, conv, embedding "
        "lookup, through layout ops (transpose, reshape, slice, split, squeeze, "
        "expand_dims).", stacklevel=2)
  return tg.materialize(x)


def _merged_outs(ctx, outs, prim):
  return [merged(ctx, o, prim) for o in outs]


# --------------------------------------------------------------------------
# Consumers: the factorized rules
# --------------------------------------------------------------------------

def _consumer(rule) -> Handler:
  def handle(eqn, invals, ctx, run):
    outs = _explicit_outs(eqn)
    if outs is None:
      return rule(ctx, *invals, **eqn.params)
    return _in_auto_axes(eqn, invals, ctx, rule, outs)
  return handle


def on_explicit_mesh(sharding) -> bool:
  """Whether ``sharding`` (a type's, or None) is on a mesh with ``Explicit`` axes."""
  mesh = getattr(sharding, "mesh", None)
  return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _explicit_outs(eqn):
  """The output shardings of ``eqn`` if any is typed on an ``Explicit`` mesh axis, else None."""
  shardings = [getattr(v.aval, "sharding", None) for v in eqn.outvars]
  return shardings if any(map(on_explicit_mesh, shardings)) else None


def _in_auto_axes(eqn, invals, ctx, rule, outs):
  """``rule`` on ``invals`` with the mesh's axes Auto (``jax.sharding.auto_axes``): the
  factorized ops lojax adds carry no sharding types of their own, so XLA's partitioner places
  them, and the results get ``eqn``'s own output types back. The base op's ``out_sharding``
  becomes the result's type instead of an argument (it cannot name Auto axes)."""
  flat, rebuild = _pack(invals, value_of=lambda x: (x.value, _encoded(x)), unpack=_with_codes)
  split_kernel = any(isinstance(x, Tagged) and _is_split(x.value) for x in invals)
  params = dict(eqn.params)
  if "out_sharding" in params:
    params["out_sharding"] = None
  plain = eqn.replace(params=params)
  multiple = eqn.primitive.multiple_results

  def f(*arrs):
    args = rebuild(list(arrs))
    site, ctx.site = ctx.site, None   # a recompute chain would close over typed values
    split, ctx.split = ctx.split, ctx.split or split_kernel
    try:
      out = rule(ctx, *args, **params)
      if out is None:
        out = bind(plain, [merged(ctx, x, eqn.primitive.name) for x in args])
    finally:
      ctx.site, ctx.split = site, split
    return list(out) if multiple else [out]

  res = jax.sharding.auto_axes(f, out_sharding=outs)(*flat)
  return res if multiple else res[0]


def _is_split(value) -> bool:
  """Whether ``value``'s type splits it over a mesh axis."""
  spec = getattr(getattr(jax.typeof(value), "sharding", None), "spec", ())
  return any(s is not None for s in spec)


def _encoded(x: Tagged):
  return None if x.source is None else x.source.encoded


def _with_codes(x: Tagged, value, triples) -> Tagged:
  """``x`` rebuilt from :func:`_pack`'s arrays: the value, its encoded leaf, the factors."""
  value, encoded = value
  ops = () if x.source is None else x.source.ops   # _with_factors drops the source
  x = _with_factors(x, value, triples)
  return x if encoded is None else x.replace(source=tg.Source(encoded, ops))


def _reshard(eqn, invals, ctx, run):
  """``reshard`` (a change of sharding type, e.g. entering or leaving ``auto_axes``): the
  value as the op says; each factor axis takes the mesh axes of the value axis it carries
  (none for the rank axis), so the factors follow the value onto the same mesh types."""
  t = invals[0]
  value = bind(eqn, [t.value])
  dst = eqn.params["dst_sharding"]
  if t.sides is None:
    return t.replace(value=value, source=t.source)

  def place(x, fi):
    spec = [None] * x.ndim
    for axis, names in enumerate(dst.spec):
      for f, fa in t.owners(axis):
        if f == fi and names is not None:
          spec[fa] = names
    return eqn.primitive.bind(x, **{**eqn.params, "dst_sharding": dst.update(spec=P(*spec))})

  if any(term.slots or term.rows is not None for term in t.terms):
    terms = tuple(dataclasses.replace(
        term, **{f: place(getattr(term, f), -1) for f in _TERM_ARRAYS
                 if getattr(term, f) is not None}) for term in t.terms)
  else:
    terms = tg.map_terms(t, lambda a: place(a, 0), lambda b: place(b, 1))
  return t.replace(value=value, terms=terms, source=t.source)


_TERM_ARRAYS = ("a", "b", "m", "bias")


# --------------------------------------------------------------------------
# Layout ops: applied to the factors of a tagged operand 0
# --------------------------------------------------------------------------

def _layout(fn) -> Handler:
  """A handler for ``fn(t, value, params, rest)``: ``t`` is the tagged operand 0.

  The op runs on the value first (``value``: its result, a list for
  multiple-result ops); ``rest`` are the other operands, never tagged.
  """
  @functools.wraps(fn)
  def handle(eqn, invals, ctx, run):
    t, rest = invals[0], list(invals[1:])
    if not isinstance(t, Tagged) or any(isinstance(x, Tagged) for x in rest):
      return None
    out = fn(t, bind(eqn, [t.value] + rest), eqn.params, rest)
    return _follow(t, out, eqn, rest)
  return handle


def _follow(t: Tagged, out, eqn, rest):
  """``out`` (a tagged result of ``eqn`` on ``t``, or a list of them) keeping ``t``'s source:
  the result's value is ``eqn`` applied to ``t``'s. Only for ops of the kernel alone: one
  with other operands (``rest``, e.g. a traced index) drops the source, since replaying it
  inside a custom VJP would close over them."""
  if t.source is None or out is None or rest:
    return out
  def op(v, i=None):
    r = bind(eqn, [v] + list(rest))
    return r if i is None else r[i]
  if isinstance(out, Tagged):
    return dataclasses.replace(out, source=t.source.then(op))
  return [dataclasses.replace(o, source=t.source.then(functools.partial(op, i=i)))
          if isinstance(o, Tagged) else o for i, o in enumerate(out)]


def _slicer(bounds: Mapping[int, tuple[int, int, int]]):
  """A :func:`tagged.slice_axes` slicer for ``{value axis: (start, limit, stride)}``."""
  def slicer(x, axes):
    own = {fa: bounds[va] for fa, va in axes.items() if va in bounds}
    if not own:
      return x
    start, limit, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
    for fa, (s, e, st) in own.items():
      start[fa], limit[fa], strides[fa] = s, e, st
    return lax.slice(x, start, limit, strides)
  return slicer


@_layout
def _transpose(t, value, p, rest):
  return tg.transpose(t, value, p["permutation"])


@_layout
def _squeeze(t, value, p, rest):
  return tg.squeeze(t, value, p["dimensions"])


@_layout
def _reshape(t, value, p, rest):
  if rest or p.get("dimensions") is not None:
    return None
  return tg.reshape(t, value, p["new_sizes"])


@_layout
def _broadcast_in_dim(t, value, p, rest):
  """Only the broadcasts that insert size-1 axes (``jnp.expand_dims``, ``x[None]``)."""
  shape, bdims = p["shape"], p["broadcast_dimensions"]
  new = [j for j in range(len(shape)) if j not in bdims]
  if rest or list(bdims) != sorted(bdims) or any(shape[j] != 1 for j in new) or any(
      shape[b] != d for b, d in zip(bdims, t.shape)):
    return None
  return tg.expand(t, value, new)


@_layout
def _slice(t, value, p, rest):
  start, limit, strides = p["start_indices"], p["limit_indices"], p["strides"]
  bounds = {}
  for j, size in enumerate(t.shape):
    b = (start[j], limit[j], 1 if strides is None else strides[j])
    if b != (0, size, 1):
      bounds[j] = b
  return tg.slice_axes(t, value, _slicer(bounds))


@_layout
def _dynamic_slice(t, value, p, starts):
  sizes = p["slice_sizes"]
  if len(starts) != len(t.shape):
    return None

  def slicer(x, axes):
    s = [jnp.zeros((), jnp.int32)] * x.ndim
    z = list(x.shape)
    for fa, va in axes.items():
      s[fa], z[fa] = starts[va], sizes[va]
    return lax.dynamic_slice(x, s, z)

  return tg.slice_axes(t, value, slicer)


@_layout
def _split(t, values, p, rest):
  """``jnp.split`` / ``jnp.array_split``: one tagged piece per output."""
  axis, outs, start = p["axis"], [], 0
  for v, size in zip(values, p["sizes"]):
    outs.append(tg.slice_axes(t, v, _slicer({axis: (start, start + int(size), 1)})))
    start += int(size)
  return outs


@_layout
def _unstack(t, values, p, rest):
  """``jnp.unstack``: slice ``i`` of ``axis`` with the axis squeezed away, per output."""
  axis = p["axis"] % len(t.shape)
  shape = list(t.shape)
  shape[axis] = 1
  # The sliced piece only lives between the two steps: its value is a shape.
  piece = jax.ShapeDtypeStruct(tuple(shape), t.dtype)
  return [tg.squeeze(tg.slice_axes(t, piece, _slicer({axis: (i, i + 1, 1)})), v, (axis,))
          for i, v in enumerate(values)]


def _same_layout(eqn, invals, ctx, run):
  """Casts, copies, placement: the value changes, the factors are reused as they are."""
  outs = bind(eqn, [x.value if isinstance(x, Tagged) else x for x in invals])
  if not eqn.primitive.multiple_results:
    return _follow(invals[0], invals[0].replace(value=outs), eqn, []) if len(invals) == 1 else None
  if len(outs) != len(invals):
    return None
  return [x.replace(value=o) if isinstance(x, Tagged) else o for x, o in zip(invals, outs)]


# --------------------------------------------------------------------------
# Higher-order primitives
# --------------------------------------------------------------------------

def _run_closed(run, closed, args, ctx):
  return run(closed.jaxpr, closed.consts, args, ctx)


def _with_factors(x: Tagged, value, triples) -> Tagged:
  """``x`` with a new value and its terms' ``(a, b, m, bias)`` replaced."""
  terms = tuple(dataclasses.replace(t, a=a, b=b, m=m, bias=c)
                for t, (a, b, m, c) in zip(x.terms, triples))
  return x.replace(value=value, terms=terms)


def _pack(vals, prepare=lambda x: [(t.a, t.b, t.m, t.bias) for t in x.terms],
          unpack=_with_factors, value_of=lambda x: x.value):
  """Flattens tagged values into arrays plus a rebuild function.

  ``prepare(x)`` gives each term's ``(a, b, m, bias)`` as they are flattened,
  ``value_of(x)`` what stands for the value (a pytree: the value, or the
  encoded leaf it decodes from); ``unpack(x, value, triples)`` makes the tagged
  value back from the arrays.
  """
  flat, specs = [], []
  for x in vals:
    if isinstance(x, Tagged):
      v_leaves, v_def = jax.tree_util.tree_flatten(value_of(x), is_leaf=lambda v: v is None)
      leaves, tdef = jax.tree_util.tree_flatten(prepare(x))
      specs.append((x, v_def, len(v_leaves), tdef, len(leaves)))
      flat.extend(v_leaves)
      flat.extend(leaves)
    else:
      specs.append(None)
      flat.append(x)

  def rebuild(arrs):
    out, i = [], 0
    for s in specs:
      if s is None:
        out.append(arrs[i])
        i += 1
      else:
        x, v_def, nv, tdef, n = s
        value = jax.tree_util.tree_unflatten(v_def, list(arrs[i:i + nv]))
        triples = jax.tree_util.tree_unflatten(tdef, list(arrs[i + nv:i + nv + n]))
        out.append(unpack(x, value, triples))
        i += nv + n
    return out

  return flat, rebuild


def _inline(eqn, invals, ctx, run):
  """``jit`` / ``closed_call`` / ``call``: the inner jaxpr, inlined."""
  p = eqn.params
  closed = p.get("jaxpr", p.get("call_jaxpr"))
  if isinstance(closed, jcore.ClosedJaxpr):
    return _run_closed(run, closed, invals, ctx)
  return run(closed, (), invals, ctx)


def _encoded_in(x: Tagged):
  """What stands for ``x``'s value as a checkpoint's input: its encoded leaf, when it has
  one (so the checkpoint keeps the codes, not the decoded kernel), else the value."""
  return x.source.encoded if x.source is not None else x.value


def _decoded_in(x: Tagged, value, triples) -> Tagged:
  """``x`` rebuilt inside a checkpoint from :func:`_encoded_in`'s arrays (decoded there)."""
  if x.source is None:
    return _with_factors(x, value, triples)
  source = tg.Source(value, x.source.ops)
  terms = tuple(dataclasses.replace(t, a=a, b=b, m=m, bias=c)
                for t, (a, b, m, c) in zip(x.terms, triples))
  return x.replace(value=lax.stop_gradient(source.make()), terms=terms, source=source)


def _remat(eqn, invals, ctx, run):
  p = eqn.params
  # A quantized kernel enters as its codes and is decoded inside: the checkpoint's saved
  # inputs are then the codes (a scan over checkpointed layers would otherwise keep every
  # layer's decoded kernel for the backward).
  flat, rebuild = _pack(invals, unpack=_decoded_in, value_of=_encoded_in)
  inner = p["jaxpr"]

  unpack = []

  @functools.partial(jax.checkpoint, prevent_cse=p.get("prevent_cse", True),
                     policy=p.get("policy"))
  def body(*arrs):
    # Inside a checkpoint every residual is recomputed anyway: the lean dense op's own
    # recomputation would only add work, so the plain factorized form is used here.
    lean, ctx.remat = ctx.remat, False
    try:
      outs = run(inner, (), rebuild(list(arrs)), ctx)
    finally:
      ctx.remat = lean
    # A kernel the body hands back (nnx.remat returns the module's state) leaves as its
    # value and factors, still factorized.
    outs, out_rebuild = _pack(outs)
    unpack.append(out_rebuild)
    return outs

  outs = body(*flat)
  return unpack[-1](list(outs))


def _scan(eqn, invals, ctx, run):
  p = eqn.params
  nc, ncarry = p["num_consts"], p["num_carry"]
  consts, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  carry = [merged(ctx, c, "scan carry") for c in carry]
  closed = p["jaxpr"]
  length = p["length"]
  flat, rebuild = _pack_scanned(xs)
  use_rng = ctx.rng is not None
  idx = [jnp.arange(length, dtype=jnp.uint32)] if use_rng else []

  def body(c, x):
    x = list(x)
    inner_ctx = ctx
    if use_rng:
      inner_ctx = ctx.with_rng(jax.random.fold_in(ctx.rng, x.pop()))
    outs = _run_closed(run, closed, list(consts) + list(c) + rebuild(x), inner_ctx)
    outs = _merged_outs(ctx, outs, "scan output")
    return outs[:ncarry], outs[ncarry:]

  c_out, ys = lax.scan(body, list(carry), flat + idx, length=length, reverse=p["reverse"],
                       unroll=p["unroll"])
  return list(c_out) + list(ys)


def _pack_scanned(xs):
  """Flat scan inputs; a tagged input's factors are scanned along with its value.

  The value's leading axis is sliced by the scan; the factor axis that owns it
  (both factors for a stacked layer axis) is moved to the front so the scan
  slices it too, leaving the factors of each slice in value layout.
  """

  def leading(x: Tagged):
    triples = []
    for t in x.terms:
      a, b, m, c = t.a, t.b, t.m, t.bias
      lead = 1 if t.slots else 0   # a bank's adapter axis comes first
      for f, ax in x.owners(0):
        if f == 0:
          a = jnp.moveaxis(a, ax + lead, 0)
        else:
          b = jnp.moveaxis(b, ax + lead, 0)
          m = None if m is None else jnp.moveaxis(m, ax, 0)
          c = None if c is None else jnp.moveaxis(c, ax, 0)
      triples.append((a, b, m, c))
    return triples

  return _pack(xs, leading, _scan_slice,
               lambda x: x.source.encoded if _scans_encoded(x) else x.value)


def _scans_encoded(x: Tagged) -> bool:
  """Whether the scan slices ``x``'s encoded leaf (a quantized stack) rather than its float
  value: the value is that leaf decoded, its axis 0 the stacked layers. Each step then
  decodes one layer, and the float stack is never made."""
  enc = x.source.encoded if x.source is not None else None
  return (enc is not None and not x.source.ops and bool(getattr(enc, "stacked", False))
          and type(enc).layer is not model.EncodedArray.layer
          and x.kaxes is not None and x.kaxes[:1] == (0,) and not x.stack)


def _scan_slice(x: Tagged, value, pairs):
  """The tagged value of one scan slice of ``x`` (its leading axis removed)."""
  kaxes = None if x.kaxes is None else x.kaxes[1:]
  stack = x.stack + ((x.kaxes[0],) if x.kaxes is not None else (-1,))
  source = None
  if model.is_encoded(value):   # one layer's codes: decoded here, inside the scan's body
    source = tg.Source(value.layer())
    value = lax.stop_gradient(source.make())
  if x.sides is None:
    return x.replace(value=value, kaxes=kaxes, stack=stack, source=source)
  terms = tuple(dataclasses.replace(t, a=a, b=b, m=m, bias=c)
                for t, (a, b, m, c) in zip(x.terms, pairs))
  return x.replace(value=value, sides=x.sides[1:], terms=terms, kaxes=kaxes, stack=stack,
                   source=source)


def _while(eqn, invals, ctx, run):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = [merged(ctx, c, "while carry") for c in init]
  use_rng = ctx.rng is not None

  def cond(c):
    c = list(c)
    if use_rng:
      c = c[1:]
    return _merged_outs(ctx, _run_closed(run, p["cond_jaxpr"], list(cconsts) + c, ctx),
                        "while")[0]

  def body(c):
    c = list(c)
    inner = ctx
    if use_rng:
      i, c = c[0], c[1:]
      inner = ctx.with_rng(jax.random.fold_in(ctx.rng, i))
    outs = _merged_outs(ctx, _run_closed(run, p["body_jaxpr"], list(bconsts) + c, inner),
                        "while")
    return ([i + 1] if use_rng else []) + outs

  start = [jnp.zeros((), jnp.uint32)] if use_rng else []
  out = lax.while_loop(cond, body, start + init)
  return list(out)[1:] if use_rng else list(out)


def _cond(eqn, invals, ctx, run):
  p = eqn.params
  index, ops = invals[0], invals[1:]
  branches = [
      (lambda br: (lambda *_: _merged_outs(ctx, _run_closed(run, br, ops, ctx), "cond")))(br)
      for br in p["branches"]
  ]
  if isinstance(index, Tagged):
    index = tg.materialize(index)
  return list(lax.switch(index, branches))


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

def _table() -> Mapping[jcore.Primitive, Handler]:
  entries = [
      # consumers
      (lax.dot_general_p, _consumer(rules.dot_general)),
      (lax.conv_general_dilated_p, _consumer(rules.conv)),
      (lax.gather_p, _consumer(rules.gather)),
      (ragged_dot_general_p, _consumer(rules.ragged_dot)),
      # layout ops
      (lax.transpose_p, _transpose),
      (lax.squeeze_p, _squeeze),
      (lax.reshape_p, _reshape),
      (lax.broadcast_in_dim_p, _broadcast_in_dim),
      (lax.slice_p, _slice),
      (lax.dynamic_slice_p, _dynamic_slice),
      (split_p, _split),
      (unstack_p, _unstack),
      # representation ops
      (lax.convert_element_type_p, _same_layout),
      (lax.reduce_precision_p, _same_layout),
      (copy_p, _same_layout),
      (device_put_p, _same_layout),
      (sharding_constraint_p, _same_layout),
      (optimization_barrier_p, _same_layout),
      (reshard_p, _reshard),
      # higher-order primitives
      (jit_p, _inline),
      (closed_call_p, _inline),
      (call_p, _inline),
      (remat_p, _remat),
      (lax.scan_p, _scan),
      (lax.while_p, _while),
      (lax.cond_p, _cond),
  ]
  table = {p: h for p, h in entries if p is not None}   # None: this JAX lacks it (see shim)
  assert len(table) == sum(p is not None for p, _ in entries), "a primitive is listed twice"
  return types.MappingProxyType(table)


HANDLERS: Mapping[jcore.Primitive, Handler] = _table()
