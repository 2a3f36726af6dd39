"""The persistent compilation cache: where it goes and that a second process loads from it."""

import os
import subprocess
import sys

from grpo_jax import compilation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_dir_follows_the_env_then_xdg(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation.default_dir() == str(tmp_path / "grpo_jax" / "xla")
  monkeypatch.setenv(compilation.ENV, "/somewhere/else")
  assert compilation.default_dir() == "/somewhere/else"


_COMPILE = """
import sys, jax, jax.numpy as jnp
from grpo_jax import compilation
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
print(compilation.enable_cache(sys.argv[1]))
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((64, 64))).block_until_ready()
print(len(hits))
"""


def test_a_second_process_finds_the_first_ones_programs(tmp_path):
  cache = tmp_path / "xla"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  hits = []
  for directory in (str(cache), str(cache), ""):
    out = subprocess.run([sys.executable, "-c", _COMPILE, directory], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    used, hit = out.stdout.split()
    assert used == (directory or "None")
    hits.append(int(hit))
  assert os.listdir(cache), "nothing was written to the cache"
  assert hits[0] == 0 and hits[1] >= 1 and hits[2] == 0  # only the second run loaded
