"""The decode's OpenBLAS thread count: chosen by timing its own steps, re-checked, restored."""

import pytest

from mlx_reasoner.engine import blas


class FakeMachine:
    """A clock where a step takes ``cost[count]`` seconds at OpenBLAS thread count ``count``."""

    def __init__(self, monkeypatch, cost):
        self.now, self.cost, self.count, self.calls = 0.0, dict(cost), 1, []
        monkeypatch.setattr(blas.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(blas, "set_threads", self.set_threads)
        monkeypatch.setattr("mlx.core.synchronize", lambda *a: None)

    def set_threads(self, count):
        self.count = count
        self.calls.append(count)
        return True

    def decode(self, chooser, steps, load_from=None, load=None):
        """Run ``steps`` steps; from step ``load_from`` on, the costs become ``load``."""
        used = []
        for index in range(steps):
            if index == load_from:
                self.cost = dict(load)
            chooser.before_step(index)
            used.append(chooser.current)
            self.now += self.cost[self.count]
            chooser.step_done()
        chooser.close()
        return used


def test_the_faster_count_is_kept_after_the_trials(monkeypatch):
    machine = FakeMachine(monkeypatch, {1: 0.5, 2: 0.3})
    used = machine.decode(blas.DecodeThreads((1, 2), trial=3, recheck=48), steps=40)
    assert used[:8] == [1] * 4 + [2] * 4  # one untimed step after each switch, then 3 timed
    assert used[8:] == [2] * 32
    assert machine.count == 1  # restored for the training pass


def test_a_busy_machine_keeps_one_thread(monkeypatch):
    machine = FakeMachine(monkeypatch, {1: 0.5, 2: 4.0})  # a second thread waits on a busy core
    used = machine.decode(blas.DecodeThreads((1, 2), trial=3, recheck=48), steps=40)
    assert used[8:] == [1] * 32


def test_a_load_arriving_mid_decode_is_left_within_a_few_steps(monkeypatch):
    machine = FakeMachine(monkeypatch, {1: 0.5, 2: 0.3})
    used = machine.decode(
        blas.DecodeThreads((1, 2), trial=3, recheck=16), 40, load_from=12, load={1: 0.6, 2: 5.0}
    )
    assert used[8:12] == [2] * 4
    # Three slow steps outweigh the three fast ones kept: one thread from step 15 on.
    assert used[12:15] == [2] * 3 and used[15:24] == [1] * 9
    assert machine.count == 1


def test_rechecks_of_a_slower_count_are_cut_short_and_spaced_out(monkeypatch):
    machine = FakeMachine(monkeypatch, {1: 0.5, 2: 5.0})  # two threads always far slower
    used = machine.decode(blas.DecodeThreads((1, 2), trial=3, recheck=8), steps=200)
    tries = [i for i in range(8, 200) if used[i] == 2]
    # Each recheck costs one untimed and one timed step, at 8, 16, 32 and 64 steps' distance.
    assert tries == [16, 17, 34, 35, 68, 69, 134, 135]


def test_a_recheck_that_wins_switches_back(monkeypatch):
    machine = FakeMachine(monkeypatch, {1: 0.5, 2: 5.0})
    used = machine.decode(
        blas.DecodeThreads((1, 2), trial=3, recheck=8), 40, load_from=10, load={1: 0.5, 2: 0.3}
    )
    assert used[8:16] == [1] * 8
    assert used[16:20] == [2] * 4  # the recheck at step 16 finds two threads faster again
    # The wait restarts at 8 steps: one thread is tried at 28, is clearly slower, and is left.
    assert used[20:28] == [2] * 8 and used[28:30] == [1, 1] and used[30:] == [2] * 10


@pytest.mark.parametrize(
    ("enabled", "user", "cores", "threads", "expected"),
    [
        (True, False, 2, 1, (1, 2)),
        (True, False, 8, 4, (4, 8)),
        (True, True, 2, 1, None),  # OPENBLAS_NUM_THREADS set by the user: never varied
        (True, False, 1, 1, None),
        (False, False, 2, None, None),
    ],
)
def test_the_chooser_exists_only_where_the_count_is_ours(
    monkeypatch, enabled, user, cores, threads, expected
):
    info = blas.BlasInfo("openblas (test)", enabled=enabled, threads=threads)
    monkeypatch.setattr(blas, "_state", info)
    monkeypatch.setattr(blas, "_library", object() if enabled else None)
    monkeypatch.setattr(blas, "_user_threads", user)
    monkeypatch.setattr(blas.os, "cpu_count", lambda: cores)
    chooser = blas.decode_threads(2 * 2**30)  # the 0.5B shape in float32
    assert (chooser.counts if chooser else None) == expected
    if expected is not None:  # the bench model's 12 MB gains nothing from a second thread
        assert blas.decode_threads(12 * 2**20) is None
