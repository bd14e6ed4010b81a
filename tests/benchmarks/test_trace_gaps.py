"""benchmarks/trace_gaps.py puts each idle gap of the compute stream down to a late host or a wait."""

from benchmarks.trace_gaps import analyse


def kernel(ts, dur, corr, tid=7, name="k"):
    return dict(ph="X", cat="kernel", name=name, ts=ts, dur=dur, pid=0, tid=tid, args=dict(correlation=corr))


def launch(ts, corr, tid=1):
    return dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", ts=ts, dur=2, pid=1, tid=tid,
                args=dict(correlation=corr))  # fmt: skip


def op(name, ts, dur, tid=1):
    return dict(ph="X", cat="cpu_op", name=name, ts=ts, dur=dur, pid=1, tid=tid)


def test_gaps_are_split_into_host_late_and_waiting_by_phase_and_place():
    events = [
        op("aten::mm", 0, 5), launch(1, 1), kernel(10, 100, 1),
        # forward: launched at 150, after kernel 1 ended at 110: 42 us (152 - 110) host late
        op("aten::addmm", 149, 5), launch(150, 2), kernel(152, 100, 2),
        op("autograd::engine::evaluate_function: MyBackward", 200, 400),
        # backward: launched at 210 (before kernel 2 ended at 252) but ran at 300: 48 us waiting
        op("aten::add_", 209, 4), launch(210, 3), kernel(300, 50, 3, name="after_copy"),
        # backward: launched at 500, after kernel 3 ended at 350: host late inside MyBackward
        op("aten::mul", 499, 5), launch(500, 4), kernel(503, 10, 4),
        kernel(513, 10, 5, tid=9),  # another stream with less work: ignored
    ]  # fmt: skip
    got = analyse(events, min_us=20, top=5)
    assert got["gaps"] == 3
    assert got["gap_ms"] == {"forward": 0.042, "backward": (48 + 153) / 1e3}
    assert got["by_cause_ms"]["forward / host late"] == 0.042
    assert got["by_cause_ms"]["backward / waiting"] == 0.048
    assert got["by_cause_ms"]["backward / host late"] == 0.153
    places = {(p, o, i): ms for p, o, i, ms in got["top_places_ms"]}
    assert places[("backward", "autograd::engine::evaluate_function: MyBackward", "aten::mul")] == 0.15
    assert places[("backward", "(waiting)", "after_copy")] == 0.05
    assert places[("forward", "?", "aten::addmm")] == 0.04
