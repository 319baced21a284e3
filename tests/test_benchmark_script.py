"""Smoke tests of benchmarks/run.py with tiny settings: every JSON line carries the required keys.

No timing assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
KEYS = ("case", "variant", "precision", "status", "images_per_s", "latency_ms", "peak_rss_mb")
FAST_CASES = ("train_step", "infer_b1", "infer_b16", "text_cache", "data_pipeline")


def load_script():
    spec = importlib.util.spec_from_file_location("himix_benchmark_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    output = tmp_path / "results.jsonl"
    # one thread: on a busy machine OpenMP threads that spin at barriers make tiny networks very slow
    command = [sys.executable, str(SCRIPT), "--tiny", "--quick", "--threads", "1", "--output", str(output), *args]
    completed = subprocess.run(command, cwd=SCRIPT.parent.parent, capture_output=True, text=True, timeout=600)
    lines = [json.loads(text) for text in completed.stdout.splitlines() if text.startswith("{")]
    assert [json.loads(text) for text in output.read_text().splitlines()] == lines
    return completed, lines


def test_tiny_cases_print_one_json_line_with_every_key(tmp_path):
    completed, lines = run_script(tmp_path, "--one-process", "--cases", ",".join(FAST_CASES))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    expected = {(case, p) for case in FAST_CASES for p in ("fp32", "bf16")} - {("data_pipeline", "bf16")}
    assert {(line["case"], line["precision"]) for line in lines} == expected
    for line in lines:
        assert all(key in line for key in KEYS), line
        assert line["status"] == "ok", line
        assert line["images_per_s"] > 0 and line["peak_rss_mb"] > 0, line
    by_case = {(line["case"], line["precision"]): line for line in lines}
    train = by_case["train_step", "bf16"]
    assert {"text_encoder_ms", "forward_ms", "backward_ms", "optimizer_ms", "step_ms"} <= train.keys()
    assert by_case["infer_b1", "fp32"]["memory_format"] in ("contiguous", "channels_last")
    assert by_case["text_cache", "fp32"]["cache_hit_rate"] > 0
    variants = {line["variant"] for line in lines if line["case"] == "data_pipeline"}
    assert variants == {"dataset w0", "dataset w2", "cache w0", "cache w2", "cache+aug w0", "cache+aug w2"}
    assert "peak RSS MB" in completed.stdout  # the table follows the JSON lines


@pytest.mark.slow
def test_tiny_ct_volume_runs_the_bundle_in_its_own_process(tmp_path):
    completed, lines = run_script(tmp_path, "--cases", "ct_volume", "--precisions", "fp32")
    assert len(lines) == 1, completed.stdout + completed.stderr
    line = lines[0]
    assert all(key in line for key in KEYS), line
    assert line["status"] in ("ok", "skipped"), line
    if line["status"] == "ok":
        assert line["mask_shape"] == [64, 64, 3] and line["latency_ms"] > 0


def test_plan_and_arguments():
    bench = load_script()
    assert bench.make_plan("train_step,data_pipeline", "fp32,bf16") == [
        ("train_step", "fp32"),
        ("train_step", "bf16"),
        ("data_pipeline", "fp32"),
    ]
    assert bench.make_plan("infer_b1", "bf16") == [("infer_b1", "bf16")]
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "no_such_case"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--precisions", "fp64"])


def test_a_failing_case_gives_an_error_line_with_every_key(monkeypatch):
    bench = load_script()

    def broken(settings, precision):
        raise RuntimeError("boom")

    monkeypatch.setitem(bench.CASES, "infer_b1", (broken, bench.PRECISIONS))
    (line,) = bench.run_case_here("infer_b1", "bf16", bench.make_settings(tiny=True, quick=True), threads=None)
    assert all(key in line for key in KEYS)
    assert line["status"] == "error" and "boom" in line["error"] and line["precision"] == "bf16"


def test_train_cases_follow_the_bundle_options(tmp_path):
    """``train_step`` trains as the bundle does by default; ``train_step_checkpointed`` adds
    ``--gradient_checkpointing true``, ``train_step_low_memory`` also ``--low_memory_allocator true``;
    ``train_ratio`` alternates both precisions in one process. (One process for all: the flags are checked.)"""
    completed, lines = run_script(
        tmp_path, "--one-process", "--precisions", "bf16",
        "--cases", "train_step,train_step_checkpointed,train_step_low_memory,train_ratio",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    by_case = {line["case"]: line for line in lines}
    flags = {case: (line["gradient_checkpointing"], line["allocator_configured"]) for case, line in by_case.items()
             if case.startswith("train_step")}  # fmt: skip
    assert flags == {
        "train_step": (False, False),
        "train_step_checkpointed": (True, False),
        "train_step_low_memory": (True, True),
    }
    ratio = by_case["train_ratio"]
    assert ratio["bf16_to_fp32"] == pytest.approx(ratio["bf16_step_ms"] / ratio["fp32_step_ms"], abs=1e-3)


@pytest.mark.slow
def test_tiny_onnx_runtime_case_exports_checks_and_times(tmp_path):
    """The ONNX Runtime case (``infer_b1_onnx``) exports the network, checks it against the eager one and times it;
    ``skipped`` with a reason when onnxruntime is missing."""
    completed, lines = run_script(tmp_path, "--one-process", "--cases", "infer_b1_onnx")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (line,) = lines
    assert all(key in line for key in KEYS), line
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        assert line["status"] == "skipped" and "onnxruntime" in line["reason"], line
        return
    assert line["status"] == "ok" and line["variant"] == "onnxruntime_fp32", line
    assert line["max_abs_difference"] < 1e-4 and line["latency_ms"] > 0, line
    assert "ONNX Runtime" in completed.stdout
