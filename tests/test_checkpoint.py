"""Adapter checkpoints: exact round trips, exact resumption, validation, atomicity, size."""

import functools
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lojax
from lojax._src.checkpoint import (AdapterCheckpointer, escape_key, restore_adapters,
                                   save_adapters, save_merged, unescape_key)

sys.path.insert(0, os.path.dirname(__file__))
import gpt  # noqa: E402

SPEC = lojax.LoraSpec(r=4, target_modules=["c_attn", "c_fc", "wte", "lm_head"],
                      modules_to_save=["ln_f"], bias="lora_only")


def randomized(lora, seed=1):
  """Every adapter leaf random (B != 0, so the delta is not trivially zero)."""
  leaves, treedef = jax.tree.flatten(lora.adapters)
  rng = np.random.default_rng(seed)
  new = [jnp.asarray(rng.standard_normal(x.shape) * 0.1, x.dtype) for x in leaves]
  return lojax.LoraParams(lora.base, jax.tree.unflatten(treedef, new), lora.meta)


def model_and_lora(spec=SPEC, seed=0, **kw):
  return _model_and_lora(spec, seed, tuple(sorted(kw.items())))


@functools.cache
def _model_and_lora(spec, seed, kw):
  model = gpt.GPT(**dict(kw))
  params, ids = gpt.init(model, seed=seed)
  lora = lojax.wrap(params, spec, key=jax.random.key(3), apply_fn=model.apply,
                    example_args=(ids,))
  return model, params, ids, randomized(lora)


def same(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def dir_bytes(path):
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def metadata_digest(meta):
  """The digest written independently of lojax: SHA-256 of the canonical JSON (sorted keys, no
  whitespace) of every field but "sha256"."""
  body = {k: v for k, v in meta.items() if k != "sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                        .encode("utf-8")).hexdigest()


def resigned(meta):
  """The metadata with a digest that matches it (as if the damage had been re-signed)."""
  return dict(meta, sha256=metadata_digest(meta))


def test_escape_key_is_reversible_and_safe():
  for key in ["params/h_0/attn/c_attn", "a.b-c", "x/y.z-2f-", "ünï/c0de", "", "--"]:
    esc = escape_key(key)
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in esc), esc
    assert unescape_key(esc) == key
  assert escape_key("a/b") != escape_key("a_b") != escape_key("a.b")


@pytest.mark.parametrize("use_jit", [False, True])
def test_round_trip_onto_fresh_base_is_bit_identical(tmp_path, use_jit):
  model, params, ids, lora = model_and_lora()
  save_adapters(tmp_path, lora, step=7)
  fresh, _ = gpt.init(model, seed=0)  # a freshly initialised base, same weights
  restored = restore_adapters(tmp_path, fresh)
  assert restored.meta == lora.meta
  assert same(restored.adapters, lora.adapters)
  f = lojax.lorafy(model.apply)
  f = jax.jit(f) if use_jit else f
  np.testing.assert_array_equal(np.asarray(f(restored, ids)), np.asarray(f(lora, ids)))


def test_slash_and_dot_keys_survive(tmp_path):
  params = {"enc/v1": {"q.proj": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
  spec = lojax.LoraSpec(r=2, target_modules=".*q.proj", bias="all")
  lora = randomized(lojax.wrap(params, spec, key=jax.random.key(0),
                               adapter_name="my/adapter.v-1"))
  save_adapters(tmp_path, lora, step=1, adapter_names="my/adapter.v-1")
  restored = restore_adapters(tmp_path, params)
  assert list(restored.adapters) == ["my/adapter.v-1"]
  assert same(restored.adapters, lora.adapters)
  # The stored tree has escaped, flat keys (no "/" reaches Orbax).
  meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
  assert all("/" not in k for k in meta["arrays"])
  assert "my-2f-adapter-2e-v-2d-1.lora.enc-2f-v1-2f-q-2e-proj.lora_A" in meta["arrays"]


def _train(step, lora, opt_state, steps):
  losses = []
  for _ in range(steps):
    lora, opt_state, loss = step(lora, opt_state)
    losses.append(float(loss))
  return lora, opt_state, losses


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.gelu(nn.Dense(32, name="l0")(x))
    x = jax.nn.gelu(nn.Dense(32, name="l1")(x))
    return nn.Dense(4, name="head")(x)


def _make_step(model, x, tx, spec=None):
  y = jnp.sin(x[:, :4] * 3.0)
  apply = lojax.lorafy(model.apply)

  def loss_fn(trainable, lora):
    loss = jnp.mean((apply(lora.with_trainable(trainable), x) - y) ** 2)
    if spec is not None:
      loss = loss + lojax.adalora_orth_reg(trainable, spec=spec)
    return loss

  @jax.jit
  def step(lora, opt_state):
    loss, g = jax.value_and_grad(loss_fn)(lora.trainable, lora)
    updates, opt_state = tx.update(g, opt_state, lora.trainable)
    return lora.with_trainable(optax.apply_updates(lora.trainable, updates)), opt_state, loss

  return step


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_resumed_training_follows_the_same_losses(tmp_path, kind):
  if kind == "adalora":
    spec = lojax.AdaLoraSpec(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=1,
                             target_modules=["l0", "l1"])
    tx = lojax.adalora(optax.adamw(1e-2), spec)
  else:
    spec = lojax.LoraSpec(r=4, target_modules=["l0", "l1"], bias="all", modules_to_save=["head"])
    tx = optax.adamw(1e-2)
  reg = spec if kind == "adalora" else None
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (16, 8))
  params = model.init(jax.random.key(1), x)
  lora = randomized(lojax.wrap(params, spec, key=jax.random.key(3)))
  ids = x
  state0 = tx.init(lora.trainable)
  step = _make_step(model, ids, tx, reg)
  _, _, full = _train(step, lora, state0, 6)

  lora3, state3, first = _train(step, lora, state0, 3)
  save_adapters(tmp_path, lora3, step=3, opt_state=state3)
  # A new process would rebuild everything from scratch: fresh base, new adapters.
  fresh = model.init(jax.random.key(1), x)
  template = lojax.wrap(fresh, spec, key=jax.random.key(99))
  lora_r, state_r = restore_adapters(tmp_path, template,
                                     opt_state_template=tx.init(template.trainable))
  assert same(state_r, state3)
  _, _, rest = _train(step, lora_r, state_r, 3)
  assert first + rest == full


def test_different_base_is_refused_listing_every_difference(tmp_path):
  _, _, _, lora = model_and_lora()
  save_adapters(tmp_path, lora, step=1)
  other = jax.tree.map(lambda x: x, lora.base)  # same model, but a wider h_0 and no h_1
  h0 = other["params"]["h_0"]
  h0["attn"]["c_attn"] = {"kernel": jnp.zeros((48, 144)), "bias": jnp.zeros(144)}
  other["params"]["ln_f"] = {"scale": jnp.ones(48), "bias": jnp.zeros(48)}
  del other["params"]["h_1"]
  with pytest.raises(ValueError, match="does not fit") as err:
    restore_adapters(tmp_path, other)
  msg = str(err.value)
  assert "params/h_0/attn/c_attn/kernel: params have shape (48, 144)" in msg
  assert "params/h_1/attn/c_attn/kernel: missing from the params" in msg
  assert "params/h_1/attn/c_attn/bias: missing" in msg
  assert "params/h_1/mlp/c_fc/kernel: missing" in msg
  assert "params/ln_f/scale: params have shape (48,)" in msg
  assert "params/wte" not in msg  # what fits is not listed
  assert "Nothing was loaded" in msg
  half = jax.tree.map(lambda x: x.astype(jnp.float16), lora.base)
  with pytest.raises(ValueError, match=r"wte/embedding: params have shape \(64, 32\), float16"):
    restore_adapters(tmp_path, half)


def test_different_spec_and_optimizer_are_refused(tmp_path):
  model, params, ids, lora = model_and_lora()
  tx = optax.adamw(1e-3)
  save_adapters(tmp_path, lora, step=1, opt_state=tx.init(lora.trainable))
  spec8 = lojax.LoraSpec(r=8, target_modules=["c_attn", "wte", "lm_head"],
                         modules_to_save=["ln_f"], bias="lora_only")
  other = lojax.wrap(params, spec8, key=jax.random.key(0), apply_fn=model.apply,
                     example_args=(ids,))
  with pytest.raises(ValueError, match="does not fit") as err:
    restore_adapters(tmp_path, other, opt_state_template=optax.sgd(0.1, 0.9).init(
        other.trainable))
  msg = str(err.value)
  assert "[default] spec.r: checkpoint 4, given 8" in msg
  assert "spec.target_modules" in msg
  assert "[default] target params/h_0/mlp/c_fc: in the checkpoint, not in the given" in msg
  assert "[default] target params/wte.r: checkpoint 4, given 8" in msg
  assert "opt_state" in msg and "in the checkpoint, not in the template" in msg
  with pytest.raises(ValueError, match="holds no optimizer state"):
    save_adapters(tmp_path / "noopt", lora, step=1)
    restore_adapters(tmp_path / "noopt", params, opt_state_template=tx.init(lora.trainable))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_and_corrupt_checkpoints_give_clear_errors(tmp_path):
  _, params, _, lora = model_and_lora()
  with pytest.raises(ValueError, match="No checkpoint directory"):
    restore_adapters(tmp_path / "nope", params)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no completed step"):
    restore_adapters(tmp_path / "empty", params)
  save_adapters(tmp_path / "c", lora, step=1)
  save_adapters(tmp_path / "c", lora, step=2)
  with pytest.raises(ValueError, match=r"No step 5 .*available steps: \[1, 2\]"):
    restore_adapters(tmp_path / "c", params, step=5)
  # Truncated array data.
  for f in (tmp_path / "c" / "2" / "adapters").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ValueError, match=r"(?s)step 2\).*(incomplete or corrupt|is corrupt).*"
                     r"available: \[1, 2\]"):
    restore_adapters(tmp_path / "c", params)
  # Damaged metadata.
  (tmp_path / "c" / "1" / "meta" / "metadata").write_text('{"format": "lojax.adap')
  with pytest.raises(ValueError, match=r"step 1\).*incomplete or corrupt.*available: \[1, 2\]"):
    restore_adapters(tmp_path / "c", params, step=1)


def test_flipped_bytes_are_detected(tmp_path):
  _, params, _, lora = model_and_lora()
  save_adapters(tmp_path, lora, step=1)
  meta_file = tmp_path / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  key = next(iter(meta["arrays"]))
  meta["arrays"][key]["crc32"] ^= 1  # as if the stored data had changed
  meta_file.write_text(json.dumps(resigned(meta)))  # a valid digest: the checksum must catch it
  with pytest.raises(ValueError, match=r"adapter data in .* is corrupt:\n.*does not match.*\n"
                     r"Restore another step \(available: \[1\]\)"):
    restore_adapters(tmp_path, params)


def test_unknown_spec_class_is_not_imported(tmp_path):
  _, params, _, lora = model_and_lora()
  save_adapters(tmp_path, lora, step=1)
  meta_file = tmp_path / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["adapters"][0]["spec_class"] = "os.system"
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="digest does not match"):
    restore_adapters(tmp_path, params)
  meta_file.write_text(json.dumps(resigned(meta)))  # past the digest, the class is still refused
  with pytest.raises(ValueError, match="unknown spec class 'os.system'"):
    restore_adapters(tmp_path, params)


def _two_steps(tmp_path, opt_state=False):
  """Steps 1 and 2 of the GPT adapters (with an optimizer state if asked); returns the params
  and the metadata file of step 2."""
  _, params, _, lora = model_and_lora()
  opt = optax.adamw(1e-3).init(lora.trainable) if opt_state else None
  save_adapters(tmp_path, lora, step=1, opt_state=opt)
  save_adapters(tmp_path, lora, step=2, opt_state=opt)
  return params, tmp_path / "2" / "meta" / "metadata"


def _first_scaled_target(meta):
  return next(t for a in meta["adapters"] for t in a["targets"] if t["scaling"] != 0)


def _scale_times_10(meta):
  t = _first_scaled_target(meta)
  t["scaling"] *= 10


def _drop_array(meta):
  del meta["arrays"][next(iter(meta["arrays"]))]


def _bad_dtype(meta):
  meta["arrays"][next(iter(meta["arrays"]))]["dtype"] = "junk"


def _object_dtype(meta):
  meta["arrays"][next(iter(meta["arrays"]))]["dtype"] = "object"


def _shape_not_a_list(meta):
  meta["arrays"][next(iter(meta["arrays"]))]["shape"] = 5


def _negative_shape(meta):
  d = meta["arrays"][next(iter(meta["arrays"]))]
  d["shape"] = [-d["shape"][0]] + d["shape"][1:]


def _crc_not_an_int(meta):
  meta["arrays"][next(iter(meta["arrays"]))]["crc32"] = "0"


def _extra_array(meta):
  k = next(iter(meta["arrays"]))
  meta["arrays"][k + "_extra"] = dict(meta["arrays"][k])


def _opt_shape_not_a_list(meta):
  meta["opt_state"][next(iter(meta["opt_state"]))]["shape"] = {"a": 1}


def _fingerprint_dtype(meta):
  meta["base_fingerprint"][next(iter(meta["base_fingerprint"]))]["dtype"] = 3


def _arrays_a_list(meta):
  meta["arrays"] = list(meta["arrays"])


def _active_unknown(meta):
  meta["active"] = ["nope"]


def _structure_leaf_not_str(meta):
  meta["structure"]["default"]["lora"] = 7


def _other_step(meta):
  meta["step"] = 1


def _adapter_a_list(meta):
  meta["adapters"][0] = [meta["adapters"][0]]


DAMAGES = [_scale_times_10, _drop_array, _bad_dtype, _object_dtype, _shape_not_a_list,
           _negative_shape, _crc_not_an_int, _extra_array, _opt_shape_not_a_list,
           _fingerprint_dtype, _arrays_a_list, _active_unknown, _structure_leaf_not_str,
           _other_step, _adapter_a_list]


def test_metadata_digest_is_canonical_sha256(tmp_path):
  _, meta_file = _two_steps(tmp_path)
  meta = json.loads(meta_file.read_text())
  assert meta["sha256"] == metadata_digest(meta)  # anyone can check it without lojax
  assert len(meta["sha256"]) == 64


def test_async_saves_write_the_digest(tmp_path):
  _, params, _, lora = model_and_lora()
  with AdapterCheckpointer(tmp_path, async_save=True) as ckpt:
    ckpt.save(1, lora)
    ckpt.save(2, lora)
    restored = ckpt.restore(params)  # no wait: restore waits for the step still being saved
  assert same(restored.adapters, lora.adapters)
  for step in (1, 2):
    meta = json.loads((tmp_path / str(step) / "meta" / "metadata").read_text())
    assert meta["sha256"] == metadata_digest(meta)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_edited_metadata_is_refused_by_its_digest(tmp_path, damage):
  params, meta_file = _two_steps(tmp_path, opt_state=True)
  meta = json.loads(meta_file.read_text())
  damage(meta)
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"step 2\).*incomplete or corrupt: its SHA-256 digest "
                     r"does not match.*available: \[1, 2\]"):
    restore_adapters(tmp_path, params)
  restore_adapters(tmp_path, params, step=1)  # the other step is untouched


def test_scaling_edit_no_longer_changes_outputs(tmp_path):
  # The issue's case: a stored "scaling" raised 10x restored and changed the outputs.
  model, params, ids, lora = model_and_lora()
  save_adapters(tmp_path, lora, step=1)
  meta_file = tmp_path / "1" / "meta" / "metadata"
  text = meta_file.read_text()
  meta = json.loads(text)
  t = _first_scaled_target(meta)
  old = json.dumps(t)
  t["scaling"] *= 10
  assert text.count(old) == 1
  meta_file.write_text(text.replace(old, json.dumps(t)))  # a hand edit: only that field changes
  with pytest.raises(ValueError, match=r"digest does not match"):
    restore_adapters(tmp_path, params)


@pytest.mark.parametrize("damage", [d for d in DAMAGES if d is not _scale_times_10],
                         ids=lambda f: f.__name__.strip("_"))
def test_resigned_damaged_metadata_is_refused_by_lojax(tmp_path, damage):
  # Past a matching digest (damage made by a tool that re-signs), every malformed field is
  # still refused with lojax's own error, naming the step and the steps available.
  params, meta_file = _two_steps(tmp_path, opt_state=True)
  meta = json.loads(meta_file.read_text())
  damage(meta)
  meta_file.write_text(json.dumps(resigned(meta)))
  tx = optax.adamw(1e-3)
  _, _, _, lora = model_and_lora()
  with pytest.raises(ValueError, match=r"(?s)step 2\).*incomplete or corrupt.*"
                     r"available: \[1, 2\]") as err:
    restore_adapters(tmp_path, params, opt_state_template=tx.init(lora.trainable))
  assert "digest" not in str(err.value)
  assert RESIGNED_FOUND[damage.__name__] in str(err.value)


RESIGNED_FOUND = {  # what each error names
    "_drop_array": "no such array in `arrays`", "_bad_dtype": 'dtype must name a numeric or '
    'bool NumPy dtype, found string "junk"', "_object_dtype": 'found string "object"',
    "_shape_not_a_list": "shape must be a list of sizes >= 0, found number 5",
    "_negative_shape": "shape must be a list of sizes >= 0, found list [-",
    "_crc_not_an_int": 'crc32 must be an int in [0, 2**32), found string "0"',
    "_extra_array": "_extra: not in the structure",
    "_opt_shape_not_a_list": "shape must be a list of sizes >= 0, found object",
    "_fingerprint_dtype": "dtype must name a numeric or bool NumPy dtype, found number 3",
    "_arrays_a_list": "arrays: expected an object, found list",
    "_active_unknown": 'active: string "nope" is not a saved adapter',
    "_structure_leaf_not_str": "structure default/lora: expected an array key or an object",
    "_other_step": "the metadata records step number 1, but lies in step 2",
    "_adapter_a_list": "adapters[0]: expected an object with a string name, found list",
}


def test_metadata_that_is_not_an_object_is_refused(tmp_path):
  params, meta_file = _two_steps(tmp_path)
  for text in ("[1, 2]", "null", "5", '"lojax"', "[" * 100000, "\xff\xfe"):
    meta_file.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"step 2\).*incomplete or corrupt.*available: \[1, 2\]"):
      restore_adapters(tmp_path, params)


def test_metadata_without_digest_is_refused_with_how_to_resave(tmp_path):
  params, meta_file = _two_steps(tmp_path)
  meta = json.loads(meta_file.read_text())
  del meta["sha256"]  # as an older lojax wrote it
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"(?s)step 2\).*has no SHA-256 digest.*older lojax.*"
                     r"save_adapters.*available: \[1, 2\]"):
    restore_adapters(tmp_path, params)
  meta["sha256"] = 12
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"step 2\).*digest.*available: \[1, 2\]"):
    restore_adapters(tmp_path, params)


def test_oversized_metadata_is_refused_unread(tmp_path):
  from lojax._src import checkpoint
  params, meta_file = _two_steps(tmp_path)
  with open(meta_file, "r+b") as f:  # sparse: no disk used, nothing to read but zeros
    f.truncate(checkpoint.MAX_METADATA_BYTES + 1)
  t = time.time()
  with pytest.raises(ValueError, match=r"step 2\).*larger than any lojax metadata "
                     rf"\({checkpoint.MAX_METADATA_BYTES + 1} bytes.*available: \[1, 2\]"):
    restore_adapters(tmp_path, params)  # refused on its size, before reading
  assert time.time() - t < 5
  # Just below the bound it is read (and refused as damaged, not as oversized).
  with open(meta_file, "r+b") as f:
    f.truncate(1 << 20)
  with pytest.raises(ValueError, match=r"step 2\).*incomplete or corrupt") as err:
    restore_adapters(tmp_path, params)
  assert "larger than" not in str(err.value)


def test_orbax_files_that_are_links_or_oversized_are_refused_unread(tmp_path):
  from lojax._src import checkpoint
  params, meta_file = _two_steps(tmp_path)
  orbax_meta = tmp_path / "2" / "adapters" / "_METADATA"
  copy = tmp_path / "copy"
  copy.write_bytes(orbax_meta.read_bytes())
  orbax_meta.unlink()
  orbax_meta.symlink_to(copy)
  with pytest.raises(ValueError, match=r"(?s)step 2\).*refused before Orbax reads them:\n"
                     r".*adapters/_METADATA: a symbolic link.*available: \[1, 2\]"):
    restore_adapters(tmp_path, params)
  orbax_meta.unlink()
  orbax_meta.write_bytes(copy.read_bytes())
  restore_adapters(tmp_path, params)  # put back, it restores
  with open(orbax_meta, "r+b") as f:
    f.truncate(checkpoint.MAX_METADATA_BYTES + 1)
  with pytest.raises(ValueError, match=rf"(?s)step 2\).*adapters/_METADATA: "
                     rf"{checkpoint.MAX_METADATA_BYTES + 1} bytes, larger than any metadata"):
    restore_adapters(tmp_path, params)


def test_metadata_symlink_is_refused(tmp_path):
  params, meta_file = _two_steps(tmp_path)
  copy = tmp_path / "copy.json"
  copy.write_bytes(meta_file.read_bytes())
  meta_file.unlink()
  meta_file.symlink_to(copy)  # even a link to a valid copy
  with pytest.raises(ValueError, match=r"step 2\).*symbolic link.*available: \[1, 2\]"):
    restore_adapters(tmp_path, params)


ENDLESS_SCRIPT = textwrap.dedent("""
    import os, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails, not OOMs
    import jax, jax.numpy as jnp, lojax
    from lojax._src.checkpoint import restore_adapters, save_adapters
    params = {"dense": {"kernel": jnp.ones((4, 3))}}
    lora = lojax.wrap(params, lojax.LoraSpec(r=2, target_modules=["dense"]),
                      key=jax.random.key(0))
    for how in ("symlink", "fifo", "orbax"):
      d = os.path.join(sys.argv[1], how)
      save_adapters(d, lora, step=1)
      f = os.path.join(d, "1", "adapters/_METADATA" if how == "orbax" else "meta/metadata")
      os.unlink(f)
      os.mkfifo(f) if how == "fifo" else os.symlink("/dev/zero", f)
      t = time.time()
      try:
        restore_adapters(d, params)
      except ValueError as e:
        print(how, round(time.time() - t, 3), str(e).replace(chr(10), " "), flush=True)
""")


def test_endless_metadata_returns_promptly(tmp_path):
  # A metadata file that links to /dev/zero (or is a FIFO no one writes) is never read.
  script = tmp_path / "endless.py"
  script.write_text(ENDLESS_SCRIPT)
  out = subprocess.run([sys.executable, str(script), str(tmp_path / "ck")], capture_output=True,
                       text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu"))
  lines = out.stdout.splitlines()
  assert [line.split()[0] for line in lines] == ["symlink", "fifo", "orbax"], (
      out.stdout + out.stderr)
  wants = {"symlink": "is a symbolic link", "fifo": r"is not a regular file \(mode p",
           "orbax": r"refused before Orbax reads them:  .*adapters/_METADATA: a symbolic link"}
  for line in lines:
    assert float(line.split()[1]) < 5, line
    assert re.search(rf"step 1\).*{wants[line.split()[0]]}.*available: \[1\]", line), line


KILL_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, lojax
    from lojax._src.checkpoint import AdapterCheckpointer
    params = {"big": {"kernel": jnp.zeros((2048, 2048))}}
    lora = lojax.wrap(params, lojax.LoraSpec(r=512, target_modules=["big"]),
                      key=jax.random.key(0))
    ckpt = AdapterCheckpointer(sys.argv[1], max_to_keep=2, async_save=False)
    step = 0
    while True:
      step += 1
      t = {"default": dict(lora.trainable["default"], lora={"big": {
          "lora_A": jnp.full((2048, 512), float(step)),
          "lora_B": jnp.full((512, 2048), float(step))}})}
      ckpt.save(step, lora.with_trainable(t))
      print(step, flush=True)
""")


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path):
  script = tmp_path / "saver.py"
  script.write_text(KILL_SCRIPT)
  ckdir = tmp_path / "ck"
  proc = subprocess.Popen([sys.executable, str(script), str(ckdir)], stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
  try:
    assert proc.stdout.readline().strip() == "1"  # step 1 is committed
    deadline = time.time() + 60
    while time.time() < deadline:  # kill while a later step is being written
      if any("tmp" in p.name for p in ckdir.iterdir()):
        break
      time.sleep(0.001)
    else:
      pytest.fail("never saw a save in progress")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert any("tmp" in p.name for p in ckdir.iterdir())  # the interrupted step
  params = {"big": {"kernel": jnp.zeros((2048, 2048))}}
  restored = restore_adapters(ckdir, params)
  ckpt = AdapterCheckpointer(ckdir, async_save=False)
  latest = ckpt.latest_step()
  assert latest >= 1
  a = np.asarray(restored.adapters["default"]["lora"]["big"]["lora_A"])
  assert (a == float(latest)).all()


def test_size_is_the_adapters_only(tmp_path):
  _, params, _, lora = model_and_lora(
      lojax.LoraSpec(r=16, target_modules="all-linear"))
  raw = sum(x.nbytes for x in jax.tree.leaves(lora.trainable))
  base = sum(x.nbytes for x in jax.tree.leaves(params))
  save_adapters(tmp_path, lora, step=1)
  size = dir_bytes(tmp_path)
  assert size <= 1.05 * raw + 64 * 1024, (size, raw)
  assert size < base


def test_checkpointer_keeps_last_n_and_saves_async(tmp_path):
  _, params, _, lora = model_and_lora()
  with AdapterCheckpointer(tmp_path, max_to_keep=2, async_save=True) as ckpt:
    for step in range(1, 5):
      assert ckpt.save(step, lora)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
    with pytest.raises(ValueError, match="`step=4` is not newer than the latest saved step 4"):
      ckpt.save(4, lora)
  with AdapterCheckpointer(tmp_path, save_interval_steps=10) as ckpt:
    assert not ckpt.save(5, lora)
    assert ckpt.save(20, lora)
  with pytest.raises(ValueError, match="`max_to_keep` must be None or an int >= 1"):
    AdapterCheckpointer(tmp_path, max_to_keep=0)
  with pytest.raises(TypeError, match="`lora` must be the LoraParams"):
    save_adapters(tmp_path / "x", params, step=1)


def test_save_merged_restores_to_the_merged_tree(tmp_path):
  _, _, _, lora = model_and_lora()
  save_merged(tmp_path / "merged", lora)
  restored = ocp.StandardCheckpointer().restore(tmp_path / "merged")
  expected = lojax.merge(lora)
  assert same(jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, expected))
  with pytest.raises(ValueError, match="already exists; pass `overwrite=True`"):
    save_merged(tmp_path / "merged", lora)
  save_merged(tmp_path / "merged", lora, overwrite=True)
