"""The QLoRA benchmark rows (benchmarks/qlora_row.py) measure what they claim: an NF4 base.

Each row's step is checked against an independent reference: the NF4 kernels decoded here with
NumPy from the stored codes and absmaxes (the NF4 table written out as published), put into
the float32 model, whose loss the row's first step must give (the adapters start at B = 0).
The argument bytes of each compiled step are checked against the stored layout written out.
"""

import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import Config, NnxGPT, batch  # noqa: E402
import qlora_row  # noqa: E402
from lojax._src import quant  # noqa: E402
import qwix_row  # noqa: E402

# One xdist worker runs this module (`--dist loadgroup`, pyproject.toml): the rows are built once (a module fixture).
pytestmark = pytest.mark.xdist_group("qlora-row")

TINY = Config(vocab=64, d=64, heads=2, layers=2, seq=16, batch=2)
R, ALPHA = 4, 8.0
LINEARS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))

# The NF4 levels as published with QLoRA (Dettmers et al., 2023, appendix E).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


@pytest.fixture(scope="module")
def rows():
  out = {name: (fn, args) for name, fn, args, _, _ in qlora_row.candidates(TINY, R, ALPHA, 1e-3)}
  assert list(out) == list(qlora_row.NAMES)
  return out


def arg_bytes(fn, args):
  return fn.lower(*args).compile().memory_analysis().argument_size_in_bytes


def lojax_nf4(q):
  """A lojax NF4 / NF4-dq kernel decoded from its stored arrays: row-major blocks of 64, the
  even element in the low nibble; NF4-dq's absmaxes are int8 · (absmax / 127) + mean."""
  codes = np.asarray(q.data["codes"]).astype(np.int64).reshape(-1, 32)   # blocks, row-major
  idx = np.empty(codes.shape[:-1] + (2 * codes.shape[-1],), np.int64)
  idx[..., 0::2], idx[..., 1::2] = codes & 15, codes >> 4
  if q.method == "nf4-dq":
    s = (np.asarray(q.data["scales"]).astype(np.float32)
         * (np.asarray(q.data["scales_absmax"])[:, None] / np.float32(127)))
    scales = s.reshape(-1)[:codes.shape[0]] + np.asarray(q.data["scales_mean"])
  else:
    scales = np.asarray(q.data["scales"]).reshape(-1)
  return (NF4[idx] * scales[:, None]).reshape(-1)[:int(np.prod(q.shape))].reshape(q.shape)


def qwix_nf4(qarray):
  """A qwix NF4 kernel ``[in, out]`` decoded: one absmax per 64 input features per output."""
  codes = np.asarray(qarray["qvalue"].get_value()).astype(np.int64)
  scale = np.repeat(np.asarray(qarray["scale"].get_value()), qlora_row.TILE, axis=0)
  return NF4[codes] * scale


def float_loss(kernels, others=None):
  """The float32 NnxGPT's loss with its block kernels replaced by ``kernels[(i, a, b)]`` and
  the other modules' matrices by ``others[name]``."""
  from flax import nnx
  graphdef, state = nnx.split(NnxGPT(TINY, nnx.Rngs(0)))
  for (i, a, b), w in kernels.items():
    state["h"][i][a][b]["kernel"].set_value(jax.numpy.asarray(w))
  for name, w in (others or {}).items():
    state[name][_matrix(state[name])].set_value(jax.numpy.asarray(w))
  ids, labels = batch(TINY)
  logits = nnx.merge(graphdef, state)(ids)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())


def _matrix(module):
  return "embedding" if "embedding" in module else "kernel"


@pytest.mark.parametrize("name", list(qlora_row.LOJAX_ROWS))
def test_lojax_rows_train_on_the_nf4_kernels(rows, name):
  fn, args = rows[name]
  lora = args[0]
  kernels, others = {}, {}
  for i in range(TINY.layers):
    for a, b in LINEARS:
      q = lora.base["h"][i][a][b]["kernel"].get_value()
      assert q.method == qlora_row.LOJAX_ROWS[name] and q.data["codes"].dtype == np.uint8
      kernels[(i, a, b)] = lojax_nf4(q)
  also = qlora_row.ALSO.get(name, ())
  for module in ("wte", "wpe", "lm_head"):
    q = lora.base[module][_matrix(lora.base[module])].get_value()
    assert quant.is_quantized(q) == (module in also), module
    if module in also:
      assert q.method == "nf4" and q.data["codes"].dtype == np.uint8
      others[module] = lojax_nf4(q)
  loss = float(fn(*args)[2])
  np.testing.assert_allclose(loss, float_loss(kernels, others), rtol=1e-5)
  assert abs(loss - float_loss({})) > 1e-4   # the float32 kernels give another loss
  if others:   # and the float32 embeddings and head another again
    assert abs(loss - float_loss(kernels)) > 1e-4


def test_qwix_row_trains_on_nf4_kernels_in_tiles_of_64(rows):
  fn, args = rows[qlora_row.QWIX_ROW]
  frozen = args[2]
  kernels = {}
  for i in range(TINY.layers):
    for a, b in LINEARS:
      k = frozen["h"][i][a][b]["kernel"]["array"]
      assert str(k["qvalue"].get_value().dtype) == "uint4"
      assert k["scale"].get_value().shape[0] == k["qvalue"].get_value().shape[0] // qlora_row.TILE
      kernels[(i, a, b)] = qwix_nf4(k)
  loss = float(fn(*args)[2])
  np.testing.assert_allclose(loss, float_loss(kernels), rtol=1e-5)
  assert abs(loss - float_loss({})) > 1e-4


def test_argument_bytes_are_the_stored_kernels(rows):
  """Each QLoRA step's arguments hold the block kernels (and the row's other quantized
  matrices) in their stored form: against the float32 LoRA step of the same library, the
  arguments shrink by exactly the float32 matrices less the stored codes and absmaxes (4.5
  bits per value for NF4 in blocks of 64)."""
  fp_fn, fp_args = qlora_row.lojax_qlora_step(TINY, None, R, ALPHA)
  fp32 = arg_bytes(fp_fn, fp_args)
  for name, method in qlora_row.LOJAX_ROWS.items():
    stored, kernels = qlora_row.stored_bytes(TINY, method, qlora_row.ALSO.get(name, ()))
    assert arg_bytes(*rows[name]) == fp32 - kernels + stored, name
  qwix_fp = arg_bytes(*qwix_row.qwix_lora_step(TINY, R, ALPHA))
  stored, kernels = qlora_row.stored_bytes(TINY, "nf4")   # qwix: uint4 codes, f32 per 64
  assert arg_bytes(*rows[qlora_row.QWIX_ROW]) == qwix_fp - kernels + stored
  assert stored / kernels == pytest.approx(4.5 / 32)
  stored_dq, _ = qlora_row.stored_bytes(Config(), "nf4-dq")
  assert stored_dq / qlora_row.stored_bytes(Config(), "nf4")[0] < 0.92
