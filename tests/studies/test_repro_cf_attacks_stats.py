"""lit_cf.metrics.attack_stats: success and steps of hand-written manifest rows."""

from __future__ import annotations

import math

import pytest

from lit_cf.metrics.attack_stats import attack_stats, attack_stats_by_pair


def row(prob: float, steps: int, success: bool, source: int = 4, target: int = 9, **extra):
    return {"final_target_prob": prob, "steps": steps, "success": success, "source_label": source, "target": target, **extra}


def test_success_is_reaching_tau_and_steps_count_successes_only():
    rows = [row(0.8, 10, True), row(0.75, 30, True), row(0.6, 100, True), row(0.1, 100, False)]
    s = attack_stats(rows, threshold=0.75)
    assert s["n"] == 4 and s["success_rate"] == 0.5 and s["flip_rate"] == 0.75
    assert s["steps_mean"] == 20 and s["steps_median"] == 20 and s["steps_mean_all"] == 60
    assert "recon_pred_equals_query_pred" not in s
    assert attack_stats([], 0.75) == {"n": 0}
    none = attack_stats([row(0.1, 5, False)], 0.75)
    assert none["success_rate"] == 0 and math.isnan(none["steps_mean"]) and math.isnan(none["steps_median"])


def test_latent_attack_rows_add_reconstruction_figures():
    rows = [
        row(0.9, 4, True, recon_pred=4, orig_pred=4, recon_mse=0.01),
        row(0.9, 6, True, recon_pred=7, orig_pred=4, recon_mse=0.03),
    ]
    s = attack_stats(rows, 0.75)
    assert s["recon_pred_equals_query_pred"] == 0.5 and s["recon_mse_mean"] == pytest.approx(0.02)


def test_by_pair_splits_on_source_label_and_target():
    rows = [row(0.9, 4, True, 4, 9), row(0.2, 9, False, 4, 9), row(0.9, 2, True, 1, 7), row(0.9, 2, True, 4, 7)]
    per = attack_stats_by_pair(rows, 0.75, [(4, 9), (1, 7), (3, 2)])
    assert list(per) == ["4->9", "1->7", "3->2"]
    assert per["4->9"]["n"] == 2 and per["4->9"]["success_rate"] == 0.5
    assert per["1->7"]["n"] == 1 and per["3->2"] == {"n": 0}
