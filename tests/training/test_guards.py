"""Stop signals: in the loop Ctrl-C and SIGTERM wait for the step boundary and SIGTERM wins;
outside it the first SIGTERM raises Preempted and later ones cannot interrupt the way out."""

import os
import signal
import time

import pytest
import torch

from finetune.training.guards import (
    PREEMPTED_EXIT_STATUS,
    STOPPED_EXIT_STATUS,
    Preempted,
    StopAtStepBoundary,
    preempt_on_sigterm,
    stop_exception,
)


def deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # Python runs the handler at the next bytecode of the main thread


@pytest.fixture(autouse=True)
def _keep_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_exit_statuses_follow_the_shell_convention():
    assert (STOPPED_EXIT_STATUS, PREEMPTED_EXIT_STATUS) == (130, 143)
    assert isinstance(stop_exception(signal.SIGINT), KeyboardInterrupt)
    assert isinstance(stop_exception(signal.SIGTERM), Preempted)


def test_in_the_loop_a_signal_only_asks_and_sigterm_wins():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with StopAtStepBoundary(torch.device("cpu")) as stop:
        assert stop.agreed() is None
        deliver(signal.SIGINT)
        assert stop.agreed() == signal.SIGINT
        deliver(signal.SIGTERM)
        deliver(signal.SIGINT)
        assert stop.agreed() == signal.SIGTERM
    # Stopping for SIGTERM: a second one (torchrun passing on Slurm's) must not kill the way out.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]


def test_after_a_ctrl_c_stop_sigterm_handling_is_given_back():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with StopAtStepBoundary(torch.device("cpu")) as stop:
        deliver(signal.SIGINT)
    assert stop.agreed() == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    signal.signal(signal.SIGTERM, previous)


def test_outside_the_loop_the_first_sigterm_raises_and_later_ones_are_ignored():
    original = signal.getsignal(signal.SIGTERM)
    restore = preempt_on_sigterm()
    with pytest.raises(Preempted):
        deliver(signal.SIGTERM)
    deliver(signal.SIGTERM)  # ignored: the run is already on its way out
    restore()
    assert signal.getsignal(signal.SIGTERM) == original
