"""benchmarks/kernel_sweep.py runs end to end on CPU (--smoke, Triton's interpreter): it checks each
candidate, times the survivors, ranks them and writes its report; a failing candidate is not timed."""

import json

import pytest

from benchmarks import kernel_sweep as sweep
from velotune.kernels.activations import GatedLaunch
from velotune.kernels.cross_entropy import CEConfig

# The interpreter runs exp in numpy, which warns where exp(-x) overflows to inf (sigmoid is then 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture
def small_sweep(monkeypatch):
    monkeypatch.setattr(sweep, "SMOKE", sweep.Sizes(tokens=6, hidden=16, intermediate=130, vocab=600,
                                                    check_rows=3, check_tokens=5))  # fmt: skip
    monkeypatch.setattr(sweep, "GATED_CANDIDATES", (GatedLaunch(), GatedLaunch("row", 64, 2)))
    monkeypatch.setattr(sweep, "CE_CANDIDATES", (CEConfig(), CEConfig(block_v=256, programs_per_sm=1)))
    monkeypatch.setattr(sweep, "CHUNK_MIB", (1,))


def test_sweep_checks_times_ranks_and_writes_its_report(small_sweep, tmp_path):
    assert sweep.main(["--smoke", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("kernel_sweep-*.json")
    (md,) = tmp_path.glob("kernel_sweep-*.md")
    data = json.loads(js.read_text())
    assert [r["pass"] for r in data["checks"]["gated"] + data["checks"]["ce"]] == [True] * 4
    assert all(r["bitwise_equal_default"] for r in data["checks"]["gated"])
    timed = [r for r in data["gated_kernels"] if "total_ms" in r]
    assert {r.get("candidate") for r in timed} == {"2d/b1024/w4", "row/b64/w2", None}
    assert any("timed again" in r["impl"] for r in timed)  # the default twice: the noise floor
    assert {(r["activation"], r["impl"].split()[1]) for r in data["gated_end_to_end"]} >= {
        ("silu", "default"),
        ("gelu_tanh", "default"),
    }
    assert len([r for r in data["ce_kernel"] if r["ms"] > 0]) == 2
    assert {r["head"] for r in data["ce_full"]} == {"frozen", "trainable"}
    assert len(data["suggested"]) == 2 and data["suggested"][0].startswith("DEFAULT_GATED_CONFIG")
    text = md.read_text()
    assert "SwiGLU kernels" in text and "Suggested defaults" in text


def test_a_candidate_that_fails_its_check_is_reported_and_not_timed(small_sweep, monkeypatch, tmp_path):
    real = sweep.gated_run

    def wrong_for_one_launch(gate_up, activation, config, dy):
        y, dgu = real(gate_up, activation, config, dy)
        if config is not None and config.forward.grid == "row":
            y = y * 1.01
        return y, dgu

    monkeypatch.setattr(sweep, "gated_run", wrong_for_one_launch)
    assert sweep.main(["--smoke", "--out", str(tmp_path)]) == 1
    data = json.loads(next(tmp_path.glob("kernel_sweep-*.json")).read_text())
    assert [r["pass"] for r in data["checks"]["gated"]] == [True, False]
    assert [r["candidate"] for r in data["gated_kernels"] if "candidate" in r] == ["2d/b1024/w4"]
