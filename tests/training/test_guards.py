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
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_outside_the_loop_the_first_sigterm_raises_and_later_ones_are_ignored():
    original = signal.getsignal(signal.SIGTERM)
    restore = preempt_on_sigterm()
    with pytest.raises(Preempted):
        deliver(signal.SIGTERM)
    deliver(signal.SIGTERM)  # ignored: the run is already on its way out
    restore()
    assert signal.getsignal(signal.SIGTERM) == original


def test_after_a_sigterm_stop_in_the_loop_a_second_sigterm_cannot_cut_the_way_out_short():
    restore = preempt_on_sigterm()
    with StopAtStepBoundary(torch.device("cpu")) as stop:
        deliver(signal.SIGTERM)
    assert stop.agreed() == signal.SIGTERM
    deliver(signal.SIGTERM)  # torchrun passing on the SIGTERM Slurm already sent: no Preempted mid-save
    restore()
