"""The primitive table, and layout ops of jnp that keep a kernel factorized.

Each layout case runs ``lorafy(f)`` with and without ``jax.jit`` and checks,
against the dense formula written out with the merged kernel ``W + s*A@B``:
the outputs (float64 NumPy), the gradients with respect to both adapter
factors (``jax.grad`` of the dense formula in float64), and that no warning
is emitted (the merged fallback warns "cannot factorize").
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jex_core

import lojax
from lojax._src import fused
from lojax._src import primitives

R, ALPHA = 2, 6.0
S = ALPHA / R
FWD_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def np64(x):
  return np.asarray(x, np.float64)


def factor_leaves(tree):
  """``{"lora_A": ..., "lora_B": ...}`` of the one adapted kernel in ``tree``."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = getattr(path[-1], "key", getattr(path[-1], "name", None))
    if name in ("lora_A", "lora_B"):
      assert name not in found, f"more than one adapted kernel: {jax.tree_util.keystr(path)}"
      found[name] = leaf
  assert set(found) == {"lora_A", "lora_B"}, found
  return found


def randomized(lora, seed=0):
  """``lora`` with every trainable leaf random, so no delta is zero (B != 0)."""
  leaves, treedef = jax.tree.flatten(lora.trainable)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return lora.with_trainable(jax.tree.unflatten(treedef, new))


def check(f, ref, delta, w, x, kernel_axes=None):
  """``lorafy(f)`` against ``ref(xp, W + S*delta(xp, A, B), x)``, with and without jit.

  ``f(params, x)`` and ``ref`` return a tuple of arrays; ``ref`` and
  ``delta`` are written with ``xp`` (numpy or jax.numpy) so the same formula
  gives the float64 outputs and, through ``jax.grad``, the float64 factor
  gradients.
  """
  params = {"m": {"kernel": jnp.asarray(w, jnp.float32)}}
  spec = lojax.LoraSpec(r=R, lora_alpha=ALPHA, target_modules=["m"],
                        **({} if kernel_axes is None else {"kernel_axes": {"m": kernel_axes}}))
  lora = randomized(lojax.wrap(params, spec, key=jax.random.key(1)))
  fac = factor_leaves(lora.trainable)
  a, b = np64(fac["lora_A"]), np64(fac["lora_B"])
  w64, x64 = np64(params["m"]["kernel"]), np64(x)

  want = ref(np, w64 + S * delta(np, a, b), x64)
  rng = np.random.default_rng(0)
  cts = [rng.normal(size=np.shape(y)) for y in want]      # cotangents of the outputs

  def loss(xp, outs):
    return sum(xp.sum(y * ct) for y, ct in zip(outs, cts))

  with jax.enable_x64(True):
    da, db = jax.grad(lambda a, b: loss(jnp, ref(jnp, jnp.asarray(w64) + S * delta(jnp, a, b),
                                                 jnp.asarray(x64))), argnums=(0, 1))(
        jnp.asarray(a), jnp.asarray(b))
  want_grad = {"lora_A": np64(da), "lora_B": np64(db)}

  g = lojax.lorafy(f)
  grad = jax.grad(lambda t: loss(jnp, g(lora.with_trainable(t), x)))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for run, run_grad in ((g, grad), (jax.jit(g), jax.jit(grad))):
      outs = run(lora, x)
      assert len(outs) == len(want)
      for out, y in zip(outs, want):
        np.testing.assert_allclose(out, y, **FWD_TOL)
      got = factor_leaves(run_grad(lora.trainable))
      for k in ("lora_A", "lora_B"):
        np.testing.assert_allclose(got[k], want_grad[k], **GRAD_TOL, err_msg=k)
  assert not caught, [str(c.message) for c in caught]


def normal(seed, shape):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def plain_delta(xp, a, b):          # a [C, r], b [r, D]
  return a @ b


# --------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------

def test_split_of_a_fused_qkv_kernel_stays_factorized():
  """``jnp.split`` of a [C, 3D] kernel along its output axis: three matmuls."""
  w, x = normal(0, (6, 12)), normal(1, (3, 6))

  def f(p, x):
    q, k, v = jnp.split(p["m"]["kernel"], 3, axis=1)
    return x @ q, x @ k, x @ v

  def ref(xp, w, x):
    return x @ w[:, 0:4], x @ w[:, 4:8], x @ w[:, 8:12]

  check(f, ref, plain_delta, w, x)


def test_uneven_split_along_the_input_axis_stays_factorized():
  """``jnp.array_split`` / ``jnp.split`` at indices along the input (A) side."""
  w, x = normal(2, (7, 5)), normal(3, (4, 7))

  def f(p, x):
    w = p["m"]["kernel"]
    w0, w1, w2 = jnp.array_split(w, 3, axis=0)          # rows 3, 2, 2
    u0, u1, u2 = jnp.split(w, [2, 5], axis=0)            # rows 2, 3, 2
    y = x[:, :3] @ w0 + x[:, 3:5] @ w1 + x[:, 5:] @ w2
    z = x[:, :2] @ u0 + x[:, 2:5] @ u1 + x[:, 5:] @ u2
    return y, z

  def ref(xp, w, x):
    y = x[:, 0:3] @ w[0:3] + x[:, 3:5] @ w[3:5] + x[:, 5:7] @ w[5:7]
    z = x[:, 0:2] @ w[0:2] + x[:, 2:5] @ w[2:5] + x[:, 5:7] @ w[5:7]
    return y, z

  check(f, ref, plain_delta, w, x)


def test_unstack_of_a_stacked_kernel_stays_factorized():
  """``jnp.unstack`` of a [3, C, D] kernel whose leading axis is on the output side."""
  w, x = normal(4, (3, 6, 4)), normal(5, (2, 6))

  def f(p, x):
    q, k, v = jnp.unstack(p["m"]["kernel"], axis=0)
    return x @ q, x @ k, x @ v

  def ref(xp, w, x):
    return x @ w[0], x @ w[1], x @ w[2]

  def delta(xp, a, b):               # a [C, r], b [r, 3, D]
    return xp.einsum("cr,rkd->kcd", a, b)

  check(f, ref, delta, w, x, kernel_axes=(1,))


# --------------------------------------------------------------------------
# squeeze, expand_dims, moveaxis / swapaxes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("in_axes", [(0,), (0, 1)], ids=["unit_output_axis", "unit_input_axis"])
def test_squeeze_stays_factorized(in_axes):
  """A [C, 1, D] kernel squeezed to [C, D]; the unit axis on either factor."""
  w, x = normal(6, (6, 1, 5)), normal(7, (3, 6))

  def f(p, x):
    w = p["m"]["kernel"]
    return x @ jnp.squeeze(w, 1), x @ jnp.squeeze(w)

  def ref(xp, w, x):
    w2 = w.reshape(6, 5)
    return x @ w2, x @ w2

  if in_axes == (0,):                # a [C, r], b [r, 1, D]
    delta = lambda xp, a, b: xp.einsum("cr,rud->cud", a, b)
  else:                              # a [C, 1, r], b [r, D]
    delta = lambda xp, a, b: xp.einsum("cur,rd->cud", a, b)
  check(f, ref, delta, w, x, kernel_axes=in_axes)


def test_expand_dims_stays_factorized():
  w, x = normal(8, (6, 5)), normal(9, (3, 6))

  def f(p, x):
    w = p["m"]["kernel"]
    y = jnp.einsum("bnc,bcd->bnd", x[None], jnp.expand_dims(w, 0))   # a batch axis of 1
    z = jnp.einsum("nc,acbd->nabd", x, jnp.expand_dims(w, (0, 2)))
    return y, z, x @ w[:, None, :].reshape(6, 5)

  def ref(xp, w, x):
    y = (x @ w).reshape(1, 3, 5)
    z = (x @ w).reshape(3, 1, 1, 5)
    return y, z, x @ w

  check(f, ref, plain_delta, w, x)


def test_moveaxis_and_swapaxes_stay_factorized():
  """A [C, H, D] kernel (input axis 0) moved around, then contracted over C."""
  w, x = normal(10, (4, 3, 5)), normal(11, (2, 4))

  def f(p, x):
    w = p["m"]["kernel"]
    y1 = jnp.einsum("nc,hdc->nhd", x, jnp.moveaxis(w, 0, -1))
    y2 = jnp.einsum("nc,cdh->nhd", x, jnp.swapaxes(w, 1, 2))
    y3 = jnp.einsum("nc,dch->nhd", x, jnp.rollaxis(w, 2))          # a jit around transpose
    y4 = x @ jnp.swapaxes(w, 0, 2).reshape(15, 4).T                   # transposed, reshaped
    return y1, y2, y3, y4

  def ref(xp, w, x):
    y = xp.einsum("nc,chd->nhd", x, w)
    y4 = x @ xp.transpose(w, (2, 1, 0)).reshape(15, 4).T
    return y, y, y, y4

  def delta(xp, a, b):               # a [C, r], b [r, H, D]
    return xp.einsum("cr,rhd->chd", a, b)

  check(f, ref, delta, w, x, kernel_axes=(0,))


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

def test_every_handled_primitive_is_a_primitive_of_this_jax():
  keys = list(primitives.HANDLERS)
  assert len(keys) >= 20
  assert not [k for k in keys if isinstance(k, str)], "the table has string keys"
  bad = [k for k in keys if not isinstance(k, jex_core.Primitive)]
  assert not bad, f"not jax.extend.core.Primitive objects: {bad}"
  bad = [k for k in fused._CHEAP if not isinstance(k, jex_core.Primitive)]
  assert not bad, f"fused._CHEAP holds non-primitives: {bad}"
  names = [k.name for k in keys]
  assert len(set(names)) == len(names), sorted(names)


def _scan_rows(w, i):
  return lax.scan(lambda c, row: (c + row, row), jnp.zeros(w.shape[1:]), w)


# What common code emits for a kernel `w` on the installed JAX (`i`: a traced
# int): every primitive that reads `w`, or a value made from it, must be in the
# table, so a renamed or missing primitive fails here.
EMITTERS = {
    "jnp.split": lambda w, i: jnp.split(w, 2, axis=1),
    "jnp.array_split": lambda w, i: jnp.array_split(w, 3, axis=1),
    "jnp.unstack": lambda w, i: jnp.unstack(w, axis=0),
    "jnp.squeeze": lambda w, i: jnp.squeeze(w[:, None], 1),
    "jnp.expand_dims": lambda w, i: jnp.expand_dims(w, (0, 2)),
    "jnp.moveaxis": lambda w, i: jnp.moveaxis(w, 0, 1),
    "jnp.swapaxes": lambda w, i: jnp.swapaxes(w, 0, 1),
    "w.T": lambda w, i: w.T,
    "w.reshape": lambda w, i: w.reshape(-1),
    "w[1:3]": lambda w, i: w[1:3],
    "w[i]": lambda w, i: lax.dynamic_index_in_dim(w, i, 0, keepdims=False),
    "w.astype": lambda w, i: w.astype(jnp.bfloat16),
    "lax.reduce_precision": lambda w, i: lax.reduce_precision(w, 5, 10),
    "jnp.copy": lambda w, i: jnp.copy(w),
    "jax.device_put": lambda w, i: jax.device_put(w),
    "lax.optimization_barrier": lambda w, i: lax.optimization_barrier(w),
    "x @ w": lambda w, i: jnp.ones((2, 4)) @ w,
    "lax.conv": lambda w, i: lax.conv(jnp.ones((1, 1, 4, 6)), w[None, None], (1, 1), "SAME"),
    "embedding lookup": lambda w, i: jnp.take(w, jnp.array([0, 2]), axis=0),
    "jax.jit": lambda w, i: jax.jit(lambda w: w * 2)(w),
    "jax.checkpoint": lambda w, i: jax.checkpoint(lambda w: w * 2)(w),
    "lax.scan": _scan_rows,
    "lax.while_loop": lambda w, i: lax.while_loop(lambda c: c[0, 0] < 3, lambda c: c + 1, w),
    "lax.cond": lambda w, i: lax.cond(i > 0, lambda: w, lambda: -w),
}


@pytest.mark.parametrize("name", sorted(EMITTERS))
def test_the_primitives_common_code_emits_are_handled(name):
  jaxpr = jax.make_jaxpr(EMITTERS[name])(jnp.ones((4, 6)), jnp.int32(1)).jaxpr
  made_from_w = {jaxpr.invars[0]}
  reads, missing = [], []
  for e in jaxpr.eqns:
    if any(v in made_from_w for v in e.invars if not isinstance(v, jex_core.Literal)):
      reads.append(e.primitive.name)
      if e.primitive not in primitives.HANDLERS:
        missing.append(e.primitive.name)
      made_from_w.update(e.outvars)
  assert reads, f"{name} emitted no equation reading the kernel on this JAX: update the case"
  assert not missing, f"{name} emits {missing}, which the primitive table does not handle"


def test_the_shim_skips_what_this_jax_lacks():
  assert primitives._find("lax.no_such_primitive_p") is None
  assert primitives._find("jex.no_such_primitive_p", "lax.split_p") is lax.split_p
