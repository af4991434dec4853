"""Every algorithm on two forced CPU devices with --eval-every equal to --rounds: rounds
back to back with no host read in between, the setting that used to abort (see
experiments/reliability.md). Its own file, so that it runs beside the rest of the suite."""

from __future__ import annotations

from test_reliability import _algorithms_on_two_devices_with_sparse_evaluation

from fedjax_sim import algorithms


def test_every_algorithm_on_two_devices_with_sparse_evaluation(tmp_path):
    _algorithms_on_two_devices_with_sparse_evaluation(
        tmp_path, algorithms.ALGORITHMS + algorithms.DISTILLATION)
