"""The benchmark harness: a quick run writes the JSON the issue names, and its ratios are the right arithmetic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ sits beside src/, not installed

from benchmarks import __main__ as cli
from benchmarks import _harness as H
from benchmarks import bench_methods as B


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One method on the seed's small CNN, --quick (about a second), JSON to a temporary folder."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        payload = B.main(["--quick", "--methods", "saliency,occlusion", "--results", str(out), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return payload, json.loads((out / "bench_methods.json").read_text())


def test_quick_run_writes_the_fields_the_issue_names(quick_run):
    payload, written = quick_run
    assert written["quick"] is True and [r["method"] for r in written["results"]] == ["saliency", "occlusion"]
    for r in written["results"]:
        assert r["model"] == "cnn"
        # median seconds, both Captum ratios, overhead ratio, memory: each derivable from the stored runs
        assert r["heatlens_s"] == pytest.approx(r["runs"]["heatlens"]["median"])
        assert r["speedup_vs_captum_default"] == pytest.approx(r["captum_default_s"] / r["heatlens_s"])
        assert r["speedup_vs_captum_tuned"] == pytest.approx(r["captum_tuned_s"] / r["heatlens_s"])
        assert r["captum_tuned_s"] == min(v["median"] for k, v in r["runs"].items() if k.startswith("captum"))
        assert r["overhead_ratio"] == pytest.approx(r["heatlens_s"] / r["floor_s"])
        assert r["heatlens_memory_mb"] >= 0 and r["runs"]["heatlens"]["peak_delta_mb"] == r["heatlens_memory_mb"]
        # same maths as Captum: attributions agree to rounding
        assert r["max_rel_difference"] < 1e-4
    assert written["environment"]["torch"] == torch.__version__ and written["environment"]["torch_threads"] == 1
    floor = written["floors"]["cnn"]
    assert floor["best_backward"] == min(min(row.values()) for row in floor["backward"].values())
    assert set(written["verdict"]) == {"overhead_above_1.15", "feasible_overhead_above_1.15",
                                       "below_2x_captum_default", "below_1.2x_captum_tuned"}
    assert payload["results"][0]["passes"] == {"forward": 0, "forward_backward": 1}


def test_pass_counts_follow_the_settings(quick_run):
    """Occlusion needs one forward per window plus the clean one: (28-14)/14+1 = 2 rows x (56-14)/14+1 = 4."""
    _, written = quick_run
    occ = next(r for r in written["results"] if r["method"] == "occlusion")
    assert occ["passes"] == {"forward": 2 * 4 + 1, "forward_backward": 0}


def test_floor_arithmetic_on_a_fake_timing():
    """Overhead ratio = time / (passes x fastest per-item pass); feasible: priced at batch <= passes."""
    floor = {
        "forward": {"nchw": {1: 0.010, 8: 0.005}, "channels_last": {1: 0.008, 8: 0.004}},
        "backward": {"nchw": {1: 0.030, 8: 0.020}, "channels_last": {1: 0.025, 8: 0.013}},
        "best_forward": 0.004, "best_backward": 0.013,
    }
    assert B.floor_seconds(floor, (100, 0), feasible=False) == pytest.approx(0.4)
    assert B.floor_seconds(floor, (0, 50), feasible=False) == pytest.approx(0.65)
    assert B.floor_seconds(floor, (1, 2), feasible=False) == pytest.approx(0.004 + 0.026)
    # one backward cannot be batched: priced at batch 1's best layout
    assert B.floor_seconds(floor, (0, 1), feasible=True) == pytest.approx(0.025)
    assert B.floor_seconds(floor, (170, 50), feasible=True) == pytest.approx(170 * 0.004 + 50 * 0.013)
    fake = {"model": "m", "method": "f", "overhead_ratio": 1.3, "feasible_overhead_ratio": 1.1,
            "speedup_vs_captum_default": 2.5, "speedup_vs_captum_tuned": 1.1}
    checks = B.verdict([fake])
    assert checks["overhead_above_1.15"] == ["m/f 1.30"] and checks["feasible_overhead_above_1.15"] == []
    assert checks["below_2x_captum_default"] == [] and checks["below_1.2x_captum_tuned"] == ["m/f 1.10"]


def test_compare_reports_median_and_memory():
    """compare() times in alternation; the median and the memory a call added are what get reported,
    and the memory reading is an extra run: the timed runs are not slowed by the sampler."""
    big = []
    runs = H.compare({"alloc": lambda: big.append(torch.ones(64, 2**20 // 4)), "none": lambda: None},
                     repeats=3, warmup=0)
    t = runs["alloc"]
    assert len(big) == 3 + 1  # three timed runs, one instrumented
    assert len(t.times) == 3 and t.median == sorted(t.times)[1]
    assert t.peak_delta_mb > 32  # 64 MiB written inside the call (sampled resident memory)
    assert runs["none"].peak_delta_mb < t.peak_delta_mb
    assert json.loads(json.dumps(H._plain({"t": t})))["t"]["median"] == t.median
    big.clear()


def test_cli_splits_names_and_options():
    assert cli.split_args(["methods", "occlusion", "--quick", "--device", "cuda"]) == (
        ["methods", "occlusion"], ["--quick", "--device", "cuda"])
    assert cli.split_args(["--quick"]) == ([], ["--quick"])
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; available: bench_allocator, .*bench_lime"):
        cli.main(["nope"])
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['nope'\]"):
        B.main(["--quick", "--methods", "nope", "--no-json"])


def test_allocator_benchmark_times_fresh_processes():
    """bench_allocator: each contender in its own interpreter; the ratios are its own timings' quotients."""
    from benchmarks import bench_allocator as A

    code = A._PRELUDE.format(threads=1, repeats=1) + "print(timed(lambda: hl.explain(clf, x[..., :224, :224], 'saliency', target=t)))"
    seconds = A._run(code, tune=True)
    assert 0 < seconds < 60
    with pytest.raises(Exception, match="returned non-zero exit status"):
        A._run("raise SystemExit(3)", tune=False)


@pytest.mark.slow
def test_ig_benchmark_prices_exact_pass_counts(tmp_path):
    """bench_ig --quick: heatlens reaches its tolerance, costs are passes x measured prices, ratios follow."""
    from benchmarks import bench_ig

    threads = torch.get_num_threads()
    try:
        payload = bench_ig.main(["--quick", "--baselines", "zeros", "--results", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    price = payload["prices"]
    for case in payload["cases"]:
        hl_ = case["heatlens"]
        assert hl_["gap"] <= payload["tolerance"]
        assert hl_["cost_s"] == pytest.approx(hl_["passes"]["forward"] * price["forward"]
                                              + hl_["passes"]["forward_backward"] * price["forward_backward"])
        gl = case["gausslegendre"]
        assert gl["tried"][gl["n_steps"]] <= payload["tolerance"]
        assert gl["largest_failing"] == 0 or gl["tried"][gl["largest_failing"]] > payload["tolerance"]
        assert case["ratio"] == pytest.approx(min(case[r]["cost_s"] for r in ("gausslegendre", "riemann_trapezoid"))
                                              / hl_["cost_s"])
    assert (tmp_path / "bench_ig_quick.json").exists()
