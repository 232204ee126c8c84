"""The GPU acceptance command's bookkeeping, checked without a GPU: what it reads from training runs, pytest
and the benchmarks, the summary it writes, and that a failing part costs only itself."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from benchmarks import gpu_acceptance as acc


def write_metrics(path, losses, tokens_per_s, device_peak_mb=2048.0):
    rows = [{"step": 5 * (i + 1), "train/loss": loss, "perf/tokens_per_s": tps, "perf/step_s": 16384 / tps,
             "cost/mfu": tps / 100_000} for i, (loss, tps) in enumerate(zip(losses, tokens_per_s, strict=True))]
    rows.insert(1, {"step": 5, "val/loss": 9.0})
    rows.append({"summary": {"memory_per_rank": [{"peak_rss_mb": 900.0, "device_peak_mb": device_peak_mb}]}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metrics_summary_leaves_out_the_warmup_intervals(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, losses=[9.0, 8.0, 7.0, 6.0, 5.0], tokens_per_s=[1000, 2000, 40000, 50000, 60000])
    summary = acc.metrics_summary(path)
    assert summary["tokens_per_s"] == 50000  # median of the last three: the first two are warm-up
    assert summary["mfu"] == pytest.approx(0.5)
    assert summary["step_s"] == pytest.approx(16384 / 50000)
    assert (summary["loss_first"], summary["loss_last"]) == (9.0, 5.0)
    assert summary["peak_memory_gib"] == 2.0


def test_metrics_without_a_logged_step_is_a_failed_part(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"summary": {}}) + "\n")
    with pytest.raises(acc.PartFailed, match="no step was logged"):
        acc.metrics_summary(path)


def test_prediction_against_measurement():
    estimate = {"memory": {"total": 44.0}, "step_times": {"compute": 0.3, "bubble": 0.0, "tp_comm": 0.1}}
    predicted = acc.predicted_figures(estimate)
    assert predicted == {"predicted_step_s": pytest.approx(0.4), "predicted_memory_gib": 44.0}
    errors = acc.compare({"step_s": 0.5, "peak_memory_gib": 40.0}, predicted)
    assert errors["step_time_error"] == pytest.approx(-0.2)
    assert errors["memory_error"] == pytest.approx(0.1)
    assert acc.compare({"step_s": 0.5, "peak_memory_gib": 0.0}, {"predicted_step_s": None})["step_time_error"] is None


def test_junit_summary_counts_and_names_failures(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.kernels.test_a" name="test_ok"/>'
        '<testcase classname="tests.kernels.test_a" name="test_also_ok"/>'
        '<testcase classname="tests.kernels.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.kernels.test_a" name="test_skip"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = acc.junit_summary(xml)
    assert (summary["passed"], summary["failures"], summary["skipped"]) == (2, 1, 1)
    assert summary["failed"] == ["tests.kernels.test_a::test_bad"]


def test_a_failing_part_costs_only_itself(tmp_path, monkeypatch):
    measured = {"gpt3-350m-triton": {"tokens_per_s": 1.0, "mfu": 0.4, "step_s": 1.0, "peak_memory_gib": 9.0,
                                     "loss_first": 11.0, "loss_last": 9.0}}

    def broken(ctx):
        acc.write_partial(ctx, "training", measured)
        raise RuntimeError("planted")

    monkeypatch.setitem(acc.PART_FUNCTIONS, "training", broken)
    monkeypatch.setitem(acc.PART_FUNCTIONS, "layernorm", lambda ctx: {"forward+backward": []})
    ctx = acc.Context(out=tmp_path, python=sys.executable, env={}, deadline=acc.time.monotonic() + 60)
    acc.write_summary(tmp_path, {"parts": {}})
    training = acc.run_part(ctx, "training")
    assert training["status"] == "failed" and "RuntimeError: planted" in training["error"]
    assert training["result"] == measured  # what it had measured stays
    assert acc.run_part(ctx, "layernorm")["status"] == "ok"


def test_a_part_past_the_budget_is_skipped(tmp_path):
    ctx = acc.Context(out=tmp_path, python=sys.executable, env={}, deadline=acc.time.monotonic() + 1)
    acc.write_summary(tmp_path, {"parts": {}})
    outcome = acc.run_part(ctx, "layernorm")
    assert outcome["status"] == "failed" and "budget is spent" in outcome["error"]


def test_markdown_summary_has_the_ratios_against_the_baselines():
    summary = {
        "started": "now",
        "parts": {
            "training": {"status": "ok", "seconds": 100, "result": {
                "gpt3-1.3b-triton": {"tokens_per_s": 30000.0, "mfu": 0.46, "step_s": 0.5, "predicted_step_s": 0.45,
                                     "peak_memory_gib": 50.0, "predicted_memory_gib": 48.0, "loss_first": 10.9,
                                     "loss_last": 7.5},
                "gpt3-1.3b-torch": {"error": "exited 1"}}},
            "attention": {"status": "ok", "seconds": 60, "result": {"d128": [
                {"T": 4096.0, acc.OURS: 440.0, acc.FLASH: 400.0, acc.CUDNN: 500.0}]}},
            "layernorm": {"status": "failed", "error": "ran past 90 s", "seconds": 90, "result": {
                "forward+backward": [{"N": 4096.0, acc.OURS: 2700.0, acc.LN_TORCH: 1800.0, acc.COPY: 3000.0}]}},
        },
    }
    text = acc.markdown_summary(summary)
    assert "| gpt3-1.3b-triton | 30,000 | 46.0% | 0.500 (0.450) | 50.0 (48.0) | 10.900 -> 7.500 |" in text
    assert "| gpt3-1.3b-torch | failed: exited 1 |" in text
    assert "| 128 | 4096 | 440 | 400 | 500 | 1.10 |" in text
    assert "| 4096 | 2700 | 1800 | 3000 | 90% | 1.50 |" in text
    assert "| layernorm | failed: ran past 90 s | 90 |" in text


def test_unknown_part_is_refused(capsys):
    with pytest.raises(SystemExit):
        acc.parse_args(["--out", "x", "--parts", "environment,speed"])
    assert "unknown speed" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the command does where there is no GPU")
def test_without_a_gpu_the_command_says_so_and_writes_its_summary(tmp_path):
    assert acc.main(["--out", str(tmp_path), "--parts", "environment"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["packages"] == "already installed"
    assert summary["parts"]["environment"]["status"] == "failed"
    assert "no CUDA device" in summary["parts"]["environment"]["error"]
    assert "| environment | failed" in (tmp_path / "summary.md").read_text()


def test_the_columns_read_are_the_ones_the_benchmarks_write():
    from kernels.benchmarks import attention as attention_bench
    from kernels.benchmarks import layernorm as layernorm_bench

    (bench,) = attention_bench._benchmarks(["fwd+bwd"], 128, None, [1024, 4096])
    assert {acc.OURS, acc.FLASH, acc.CUDNN} <= set(bench.line_names) and bench.x_vals == [1024, 4096]
    assert bench.plot_name == "attention-causal-fwd-bwd-d128-bf16"
    (bench,) = layernorm_bench._benchmarks(["forward+backward"], "bf16")
    assert {acc.OURS, acc.LN_TORCH, acc.COPY} <= set(bench.line_names) and "forward-backward" in bench.plot_name
