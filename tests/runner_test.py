"""runner.Preemption on one process: a signal becomes a request to checkpoint and stop.

The multi-process agreement (a signal on one host stops every host at the same step) is
tested end to end with two processes in train_test.py.
"""

import os
import signal

import pytest

from grpo_jax import runner


def test_sigterm_asks_to_stop_and_the_handlers_come_back():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("outer"))
  try:
    with runner.Preemption() as preemption:
      assert not preemption.reached(1)
      os.kill(os.getpid(), signal.SIGTERM)
      assert preemption.reached(2) and preemption.signum == signal.SIGTERM
      assert seen == []  # the outer handler did not run
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == ["outer"]
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_second_ctrl_c_interrupts_at_once():
  default = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    with runner.Preemption() as preemption:
      os.kill(os.getpid(), signal.SIGINT)
      assert preemption.reached(1) and preemption.signum == signal.SIGINT
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is default
