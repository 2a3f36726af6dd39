"""JAX's persistent compilation cache, so a resumed or repeated run does not compile again.

    compilation.enable_cache()          # ~/.cache/grpo_jax/xla (or $XDG_CACHE_HOME/grpo_jax/xla)
    compilation.enable_cache("")        # off

A run compiles its sampler, update and evaluation programs at the first step
(tens of seconds for a 135M model on a CPU); with the cache on, a second launch
with the same shapes loads them from disk instead. The cache is keyed by the
program and the compiler version, so it is safe to share between runs.
"""

from __future__ import annotations

import os

ENV = "GRPO_JAX_COMPILATION_CACHE"


def default_dir() -> str:
  """$GRPO_JAX_COMPILATION_CACHE if set, else the user's cache folder."""
  if ENV in os.environ:
    return os.environ[ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "grpo_jax", "xla")


def enable_cache(directory: str | None = None) -> str | None:
  """Turns the persistent cache on in `directory` ("" turns it off; None: JAX's own
  JAX_COMPILATION_CACHE_DIR if set, else `default_dir()`).

  Returns the directory used, or None when off. Programs that compile in under a second are
  cached too: on a CPU even the small ones add up at start-up.
  """
  import jax

  if directory is None:  # JAX_COMPILATION_CACHE_DIR, when set, wins over our default
    directory = jax.config.jax_compilation_cache_dir or default_dir()
  if not directory:
    return None
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
