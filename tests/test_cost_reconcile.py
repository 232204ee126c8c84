"""Reconciliation during training: the plan's arithmetic, the gap report, the summary and the plot."""

from __future__ import annotations

import json
import logging

import pytest

from trainer.cost import reconcile
from trainer.cost.reconcile import Plan, Reconciler, describe_phases


def _plan(**overrides) -> Plan:
    fields = dict(devices=8, peak_flops=1e15, peak_source="h100-sxm", assumed_mfu=0.5, flops_per_token=1e9,
                  hardware_flops_per_token=1.25e9, token_budget=4e12, price_per_hour=2.0)
    fields.update(overrides)
    return Plan(**fields)


def test_plan_arithmetic():
    plan = _plan()
    # 0.5 x 1e15 FLOP/s x 8 devices / 1e9 FLOPs per token = 4e6 tokens/s; 4e12 tokens take 1e6 s.
    assert plan.tokens_per_s == pytest.approx(4e6)
    assert plan.seconds == pytest.approx(1e6)
    # 8 devices x 1e6 s = 2,222.2 device-hours at $2 = $4,444.4
    assert plan.cost(plan.seconds) == pytest.approx(8 * 1e6 / 3600 * 2.0)
    assert _plan(price_per_hour=0.0).cost(3600) == pytest.approx(8.0) and _plan(price_per_hour=0).cost_unit == "device-hours"


def test_an_interval_on_plan_and_one_behind(caplog):
    reconciler = Reconciler(_plan(), gap_margin=0.25)
    with caplog.at_level(logging.INFO, logger="trainer.cost.reconcile"):
        on_plan = reconciler.update(tokens_seen=4_000_000, interval_tokens=4_000_000, interval_seconds=1.0,
                                    phases={"forward": 0.3, "backward": 0.6, "optimizer": 0.1})
    assert on_plan["cost/gap"] == pytest.approx(1.0) and on_plan["cost/mfu"] == pytest.approx(0.5)
    assert on_plan["cost/hfu"] == pytest.approx(0.625)  # recomputation: 1.25e9 hardware FLOPs per token
    # 4e12 - 4e6 tokens left at 4e6 tokens/s, after 1 s already spent
    assert on_plan["cost/projected_seconds"] == pytest.approx(1.0 + (4e12 - 4e6) / 4e6)
    assert not caplog.records
    with caplog.at_level(logging.INFO, logger="trainer.cost.reconcile"):
        behind = reconciler.update(tokens_seen=6_000_000, interval_tokens=2_000_000, interval_seconds=1.0,
                                   phases={"data": 0.5, "forward": 0.2, "backward": 0.3})
    assert behind["cost/gap"] == pytest.approx(2.0) and behind["cost/mfu"] == pytest.approx(0.25)
    message = caplog.records[-1].getMessage()
    assert "behind plan by 2.00x" in message and "data 50% (0.5 s)" in message


def test_a_lagging_run_explains_itself_without_flooding_the_log(caplog):
    reconciler = Reconciler(_plan(), gap_margin=0.25, lag_log_every=10)
    slow = {"forward": 0.2, "backward": 0.5, "optimizer": 0.1}
    with caplog.at_level(logging.INFO, logger="trainer.cost.reconcile"):
        for i in range(1, 31):
            phases = {**slow, "data": 0.9} if i == 5 else slow  # one interval where the data wait dominates
            reconciler.update(tokens_seen=i * 2_000_000, interval_tokens=2_000_000, interval_seconds=1.0,
                              phases=phases)
    lines = [r.getMessage() for r in caplog.records if "behind plan" in r.getMessage()]
    # the first lagging interval, the data one, back to backward, then every 10 intervals: 16 and 26
    assert len(lines) == 5, lines
    assert lines[1].split("step time: ")[1].startswith("data") and lines[2].split("step time: ")[1].startswith("backward")


def test_summary_and_plot(tmp_path):
    reconciler = Reconciler(_plan(), gap_margin=0.25)
    for i in range(1, 4):
        reconciler.update(tokens_seen=i * 2_000_000, interval_tokens=2_000_000, interval_seconds=1.0, phases={})
    table = reconciler.summary()
    assert "tokens/s" in table and "4,000,000" in table and "2,000,000" in table and "cost ($)" in table
    png = reconciler.plot(tmp_path / "cost.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_phase_description_orders_by_time():
    assert describe_phases({"optimizer": 1.0, "backward": 3.0}) == "backward 75% (3 s), optimizer 25% (1 s)"
    assert describe_phases({"optimizer": 1.0, "backward": 3.0, "communication": 2.0}).endswith(
        "; of which communication 50% (2 s)")


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(reconcile, "CACHE", tmp_path / "cpu_peak.json")
    monkeypatch.setattr(reconcile, "measure_matmul_peak", lambda device, dtype: 123.0e9)
    assert reconcile.cpu_peak_flops() == 123.0e9
    monkeypatch.setattr(reconcile, "measure_matmul_peak", lambda device, dtype: pytest.fail("measured twice"))
    assert reconcile.cpu_peak_flops() == 123.0e9
    assert list(json.loads((tmp_path / "cpu_peak.json").read_text()).values()) == [123.0e9]


def test_the_probe_measures_a_real_matmul():
    assert reconcile.measure_cpu_peak(size=128, seconds=0.02, trials=2) > 1e8
