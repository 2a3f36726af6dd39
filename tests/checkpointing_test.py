"""Checkpoint tests: round trip, retention, sharded restore, atomicity under SIGKILL, preemption."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax import checkpointing

# Child processes. argv: mode, directory, marker file.
_CHILD = textwrap.dedent(r"""
  import asyncio, json, sys
  import jax, jax.numpy as jnp, numpy as np
  import orbax.checkpoint as ocp
  from grpo_jax import checkpointing, sharding

  mode, directory, marker = sys.argv[1:4]
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=3)

  def state(s):  # ~4 MB, so that a save takes a while
    return {"w": np.full((1024, 1024), s, np.float32), "key": jax.random.key(s)}

  if mode == "hang_before_rename":
    ckpt.save(1, state(1), {"position": 1})
    ckpt.wait()

    async def hang(self):  # every file of the step is written; the rename never comes
      open(marker, "w").close()
      await asyncio.sleep(600)

    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = hang
    ckpt.save(2, state(2), {"position": 2})
    ckpt.wait()

  elif mode == "loop":
    for s in range(1, 10_000):
      ckpt.save(s, state(s), {"position": s})
      print(f"saved {s}", flush=True)

  elif mode == "sharded":
    params = {"q_proj": np.arange(2 * 16 * 32, dtype=np.float32).reshape(2, 16, 32),
              "embed": np.arange(64 * 16, dtype=np.float32).reshape(64, 16)}
    mesh_a = sharding.make_mesh(fsdp=-1)
    saved = {"params": jax.device_put(params, sharding.param_shardings(mesh_a, params)),
             "key": jax.random.key(5), "step": jnp.int32(7)}
    ckpt.save(7, saved, {"position": 3})
    ckpt.wait()
    # Restore into another layout: 2-way data, 4-way tensor.
    mesh_b = sharding.make_mesh(data=2, tensor=4)
    abstract = jax.eval_shape(lambda: saved)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sharding.param_shardings(mesh_b, abstract))
    got, meta = checkpointing.Checkpointer(directory).restore(abstract_state=abstract)
    q = got["params"]["q_proj"]
    print("RESULT " + json.dumps(dict(
        q_equal=bool(np.array_equal(np.asarray(q), params["q_proj"])),
        embed_equal=bool(np.array_equal(np.asarray(got["params"]["embed"]), params["embed"])),
        q_spec=[e for e in q.sharding.spec], q_mesh=dict(q.sharding.mesh.shape),
        q_shard=list(q.addressable_shards[0].data.shape),
        key_equal=bool(np.array_equal(jax.random.key_data(got["key"]),
                                      jax.random.key_data(saved["key"]))),
        step=int(got["step"]), meta=meta)))
""")


def _child(mode, directory, marker="", devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(directory), str(marker)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _state(seed):
  params = {"w": jax.random.normal(jax.random.key(seed), (4, 8)), "b": jnp.arange(8.0) + seed}
  return {"params": params, "opt": optax.adamw(1e-3).init(params),
          "key": jax.random.key(seed), "rbg": jax.random.key(seed, impl="rbg"),
          "step": jnp.int32(seed)}


def _raw(x):
  """Key data of typed PRNG keys (not comparable as arrays), other leaves as they are."""
  return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _assert_tree_equal(a, b):
  a, b = jax.tree.map(_raw, a), jax.tree.map(_raw, b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_of_state_typed_keys_and_meta(tmp_path):
  state = _state(3)
  meta = {"data_position": 96, "config": {"lr": 1e-3, "task": "arithmetic"}, "rng": [1, 2]}
  with checkpointing.Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state, meta)
    ckpt.wait()
    got, got_meta = ckpt.restore(abstract_state=jax.eval_shape(lambda: state))
  assert got_meta == meta
  _assert_tree_equal(got, state)
  # Typed keys come back typed, with their impl, and draw the same numbers.
  assert got["key"].dtype == state["key"].dtype and got["rbg"].dtype == state["rbg"].dtype
  np.testing.assert_array_equal(jax.random.normal(got["rbg"], (3,)),
                                jax.random.normal(state["rbg"], (3,)))
  assert isinstance(got["opt"][0], optax.ScaleByAdamState)


def test_keeps_last_max_to_keep_and_restores_any_kept_step(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=3)
  for s in range(1, 6):
    ckpt.save(s, _state(s), {"position": 10 * s})
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4, 5] and ckpt.latest_step() == 5
  assert not ckpt.save(5, _state(99))  # already saved: untouched
  got, meta = ckpt.restore(4, abstract_state=jax.eval_shape(lambda: _state(0)))
  _assert_tree_equal(got, _state(4))
  assert meta == {"position": 40}
  got, meta = ckpt.restore(abstract_state=jax.eval_shape(lambda: _state(0)))
  _assert_tree_equal(got, _state(5))
  with pytest.raises(FileNotFoundError, match="step 1"):
    ckpt.restore(1)
  ckpt.close()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpointing.Checkpointer(tmp_path / "empty").restore()


def test_read_only_reader_restores_a_subtree_and_leaves_a_live_save_alone(tmp_path):
  state = _state(4)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, state)
  in_flight = tmp_path / "5.orbax-checkpoint-tmp-123"  # another process is saving step 5
  in_flight.mkdir()
  with checkpointing.Checkpointer(tmp_path, read_only=True) as reader:
    abstract = {"params": jax.eval_shape(lambda: state["params"])}
    got, _ = reader.restore(abstract_state=abstract, partial=True)
  assert got.keys() == {"params"}
  _assert_tree_equal(got["params"], state["params"])
  assert in_flight.exists() and not (tmp_path / "5").exists()
  # A writer cleans up unfinished saves, in orbax's background thread: wait for it (bounded).
  with checkpointing.Checkpointer(tmp_path) as writer:
    writer.wait()
    assert _gone(str(in_flight))


def test_sharded_state_restores_into_requested_shardings(tmp_path):
  proc = _child("sharded", tmp_path, devices=8)
  out, err = proc.communicate(timeout=120)
  lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, err[-3000:]
  r = json.loads(lines[-1][len("RESULT "):])
  assert r["q_equal"] and r["embed_equal"] and r["key_equal"]
  assert r["q_mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
  assert r["q_spec"] == [None, "fsdp", "tensor"] and r["q_shard"] == [2, 16, 8]
  assert r["step"] == 7 and r["meta"] == {"position": 3}


def _gone(pattern: str, timeout: float = 60.0) -> bool:
  """Whether nothing matches `pattern` within `timeout` s: orbax removes unfinished
  saves in a background thread when a Checkpointer opens, so give it time."""
  deadline = time.time() + timeout
  while glob.glob(pattern) and time.time() < deadline:
    time.sleep(0.1)
  return not glob.glob(pattern)


def test_kill_before_rename_keeps_previous_checkpoint(tmp_path):
  marker = tmp_path / "hanging"
  proc = _child("hang_before_rename", tmp_path / "ckpt", marker)
  deadline = time.time() + 90
  while not marker.exists():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "child never reached the rename"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  # Step 2's files are on disk, under a temporary name only.
  tmp_dirs = glob.glob(str(tmp_path / "ckpt" / "2.orbax-checkpoint-tmp*"))
  assert tmp_dirs and any(os.scandir(tmp_dirs[0]))
  assert not (tmp_path / "ckpt" / "2").exists()

  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt")
  assert ckpt.latest_step() == 1
  abstract = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
              "key": jax.eval_shape(lambda: jax.random.key(0))}
  got, meta = ckpt.restore(abstract_state=abstract)
  assert meta == {"position": 1} and np.all(np.asarray(got["w"]) == 1.0)
  # The half-written step is cleaned up, and step 2 can be saved again.
  assert _gone(str(tmp_path / "ckpt" / "*tmp*"))
  ckpt.save(2, {"w": np.full((1024, 1024), 2, np.float32), "key": jax.random.key(2)})
  ckpt.wait()
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_kill_during_save_loop_leaves_latest_complete_step_restorable(tmp_path):
  proc = _child("loop", tmp_path)
  for line in proc.stdout:
    if line.strip() == "saved 4":  # step 3 is done (a save waits for the previous one)
      break
  time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  err = proc.communicate()[1]
  assert proc.returncode == -signal.SIGKILL, err[-3000:]

  ckpt = checkpointing.Checkpointer(tmp_path)
  latest = ckpt.latest_step()
  assert latest is not None and latest >= 3, ckpt.all_steps()
  abstract = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
              "key": jax.eval_shape(lambda: jax.random.key(0))}
  # The default restore is the latest step. (Older ones may be half deleted: see the
  # module docstring.)
  got, meta = ckpt.restore(abstract_state=abstract)
  assert meta == {"position": latest} and np.all(np.asarray(got["w"]) == latest)
  np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                jax.random.key_data(jax.random.key(latest)))
  ckpt.close()
