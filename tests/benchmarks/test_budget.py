"""benchmarks/_budget.py (the equal-budget arithmetic of benchmarks/methods.py) and the Pareto plot.

benchmarks/ is a folder of scripts, not a package: its modules are imported from their path."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _budget import channel_sparsity_for, fitted_exponent, nm_for, pareto_front  # noqa: E402


def test_nm_pattern_for_a_kept_fraction():
    assert nm_for(0.5) == (2, 4)
    assert nm_for(0.25) == (1, 4)
    assert nm_for(0.75) == (3, 4)
    assert nm_for(0.375) == (3, 8)
    assert nm_for(0.3) is None  # no N:M with M in (4, 8) keeps exactly 30%
    assert nm_for(1.0) is None and nm_for(0.0) is None


def test_channel_sparsity_inverts_the_power_law():
    # a CNN keeps (1 - s)^2: half the weights -> 1 - sqrt(0.5) of the channels
    assert channel_sparsity_for(0.5, 2.0) == pytest.approx(1 - 0.5 ** 0.5)
    assert channel_sparsity_for(0.25, 2.0) == pytest.approx(0.5)
    assert channel_sparsity_for(0.25, 1.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="need 0 < kept <= 1"):
        channel_sparsity_for(0.0, 2.0)


def test_fitted_exponent_from_one_run():
    # removing half the channels kept 30% of the weights: 0.3 = 0.5^a, a = log 0.3 / log 0.5
    a = fitted_exponent(0.5, 0.3)
    assert a == pytest.approx(1.7369655941662063)
    assert channel_sparsity_for(0.3, a) == pytest.approx(0.5)  # the refit reproduces the run
    assert fitted_exponent(0.0, 1.0) is None and fitted_exponent(0.5, 1.0) is None


def test_pareto_front_keeps_the_non_dominated_points_in_x_order():
    pts = [(1.0, 99.0), (2.0, 98.0), (1.5, 97.0), (3.0, 90.0), (0.5, 99.5), (2.0, 98.0)]
    # (1.5, 97) loses to (2, 98); the second (2, 98) duplicates the first
    assert pareto_front(pts) == [4, 0, 1, 3]
    assert pareto_front([]) == []


def test_pareto_plot_is_a_deterministic_png(tmp_path):
    from _pareto import plot_pareto

    panels = {"m": ("top-1 (%)", [{"method": "fp32", "label": "", "speedup": 1.0, "metric": 99.0},
                                  {"method": "structured", "label": "k0.5", "speedup": 2.0, "metric": 98.5},
                                  {"method": "magnitude", "label": "k0.5", "speedup": 0.9, "metric": 98.9}])}
    plot_pareto(panels, tmp_path / "a.png")
    plot_pareto(panels, tmp_path / "b.png")
    data = (tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == (tmp_path / "b.png").read_bytes()
