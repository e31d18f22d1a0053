"""The throughput benchmarks' arithmetic: FLOPs counted on the meta device (how the dora_v1_1 / DiT-base figures
are derived without a GPU) match a real count, the largest-batch search finds the boundary, and
bench_train_throughput.py runs end to end on the CPU at reduced sizes, saying so."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import throughput  # noqa: E402

from dora_shapegen.config import load_yaml  # noqa: E402


def test_meta_flop_counts_equal_a_real_count_and_scale_with_batch():
    vae, dit = load_yaml("vae/tiny.yaml")["model"], load_yaml("dit/tiny.yaml")["model"]
    # On the CPU the fused SDPA kernel escapes the flop counter; the math kernel is counted like the GPU kernels.
    with sdpa_kernel(SDPBackend.MATH):
        real_vae = throughput.vae_step_flops(vae, 16, 256, 64, 128, batch=2, device="cpu")
        real_dit = throughput.dit_step_flops(dit, 32, text_tokens=8, batch=2, device="cpu")
    assert throughput.vae_step_flops(vae, 16, 256, 64, 128, batch=2) == real_vae
    assert throughput.dit_step_flops(dit, 32, text_tokens=8, batch=2) == real_dit
    assert throughput.vae_step_flops(vae, 16, 256, 64, 128, batch=1) * 2 == real_vae
    # A linear layer's forward + backward is 6 * batch * in * out: the counter measures what MFU assumes.
    layer, x = torch.nn.Linear(32, 16, bias=False), torch.randn(4, 32, requires_grad=True)
    assert throughput.count_flops(lambda: layer(x).sum().backward()) == 6 * 4 * 32 * 16


@pytest.mark.parametrize("boundary", [1, 2, 3, 37, 64, 100])
def test_largest_batch_finds_the_boundary_in_few_tries(boundary):
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= boundary

    assert throughput.largest_batch(fits, limit=100) == boundary
    assert len(calls) <= 2 * 7 + 1
    assert throughput.largest_batch(lambda b: False) == 0
    assert throughput.largest_batch(lambda b: True, limit=50) == 50


def test_bf16_peaks():
    assert throughput.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert throughput.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert throughput.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert throughput.bf16_peak_tflops("some other card") is None


def test_train_throughput_script_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_train_throughput", BENCHMARKS / "bench_train_throughput.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # Tiny configs: the same code path as the script's reduced CPU sizes, in seconds.
    monkeypatch.setattr(
        bench,
        "CPU_SETUP",
        {
            "vae": {
                "config": "vae/tiny.yaml",
                "tokens": 16,
                "batch": 2,
                "n_uniform": 128,
                "n_salient": 32,
                "n_query": 64,
            },
            "dit": {"config": "dit/tiny.yaml", "tokens": 16, "batch": 2, "text_tokens": 8},
        },
    )
    assert bench.main(["--cpu", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["cuda"] and "REDUCED" in report["note"] and report["largest_batch"] == {}
    rows = {(r["model"], r["checkpointing"]): r for r in report["rows"]}
    assert set(rows) == {("vae", False), ("vae", True), ("dit", False), ("dit", True)}
    for row in rows.values():
        assert row["seconds_per_step"] > 0 and row["mfu"] is None
        assert row["samples_per_s"] == pytest.approx(
            row["batch"] / row["seconds_per_step"], rel=0.01, abs=1e-3
        )
    # Checkpointing recomputes activations but does not change the model FLOPs of a step.
    assert rows[("vae", True)]["tflop_per_step"] == rows[("vae", False)]["tflop_per_step"] > 0
    assert "REDUCED" in capsys.readouterr().out
