"""`make gpu-check`: the integration tests on CUDA, then every benchmark on the GPU, each
bounded in time; prints what each said and one JSON summary on the last line.

Run from the repository root as `python bench/gpu_check.py` with client/ and server/ on
PYTHONPATH (the Makefile does that). Benchmark sizes are chosen for a datacenter GPU and the
whole check stays within --budget seconds (default 560, the steps' allowances summed); a step that runs out of time is
reported as such and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/integration/test_activations.py",
    "tests/integration/test_batching.py",
    "tests/integration/test_gpu.py",
    "tests/unit/test_models.py",
    "tests/integration/test_features.py",
    "tests/integration/test_projection.py",
    "tests/integration/test_inversion.py",
    "tests/integration/test_explain.py",
    "tests/integration/test_interventions.py",
    "tests/integration/test_oip.py",
]
# name, arguments after `python bench/NAME.py`, seconds allowed.
BENCHMARKS: list[tuple[str, str, list[str], int]] = [
    ("activations", "activations", ["--reps", "3", "--threads", "4"], 45),
    (
        "activations_bf16",
        "activations",
        ["--reps", "3", "--threads", "4", "--compute-dtype", "bfloat16"],
        45,
    ),
    (
        "serving",
        "serving",
        [
            *("--seconds", "3", "--pairs", "200", "--profile"),
            *("--concurrent-model", "vit_base_patch16_224"),
        ],
        70,
    ),
    (
        "feature_viz_k8",
        "feature_viz",
        ["--steps", "50", "--batched-steps", "50", "--rounds", "2", "--features", "8"],
        40,
    ),
    (
        "feature_viz_vitb_400_steps",
        "feature_viz",
        [
            *("--architecture", "vit_base_patch16_224", "--steps", "400", "--rounds", "1"),
            *("--batched-steps", "2", "--features", "2"),
        ],
        60,
    ),
    ("projection", "projection", ["--rounds", "3"], 30),
    ("inversion", "inversion", ["--rounds", "20", "--batch", "256"], 25),
    ("oip", "oip", ["--reps", "10"], 35),
    ("compiled_vitb", "compiled", ["--reps", "10", "--architecture", "vit_base_patch16_224"], 70),
]
TEST_SECONDS = 140
# A step given less than this share of its allowance is skipped and reported as such.
MIN_SHARE = 0.5


def run(command: list[str], seconds: float, env: dict[str, str]) -> tuple[int | None, str]:
    """Exit code (None when it ran out of time) and the combined output."""
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=max(seconds, 1),
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        return None, output
    return done.returncode, done.stdout


def test_summary(code: int | None, output: str) -> dict[str, Any]:
    """Counts from pytest's last line, every skip reason, and the failing tests."""
    counts = {
        word: int(number)
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)
    }
    return {
        "exit_code": code,
        "timed_out": code is None,
        **counts,
        "skipped_because": sorted(set(re.findall(r"^SKIPPED \[\d+\] (.*)$", output, re.M))),
        "failures": sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M))),
    }


def last_json(output: str) -> dict[str, Any] | None:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def headline(benchmarks: dict[str, Any]) -> dict[str, Any]:
    """The figures a GPU is expected to deliver, pulled out of the benchmarks' results."""

    def figure(name: str, key: str) -> Any:
        return (benchmarks.get(name, {}).get("result") or {}).get(key)

    return {
        "feature_viz_k8_one_request_over_8_sequential": figure("feature_viz_k8", "batched_speedup"),
        "feature_viz_k8_features_per_s": figure("feature_viz_k8", "batched_features_per_s"),
        "vitb_400_step_visualization_seconds": figure(
            "feature_viz_vitb_400_steps", "service_seconds_single_feature"
        ),
        "activation_transfer_gbps": figure("activations", "transfer_gbps"),
        "grpc_echo_gbps": figure("activations", "echo_gbps"),
        "transfer_over_echo": figure("activations", "transfer_over_echo"),
        "ratio_single_call": figure("serving", "ratio_single_call"),
        "ratio_single_call_vs_floor": figure("serving", "ratio_single_call_vs_floor"),
        "ratio_concurrent_vs_batched": figure("serving", "ratio_concurrent_vs_batched"),
        "mean_batch_size": figure("serving", "mean_batch_size"),
        "serving_stage_ms": figure("serving", "profile_ms"),
        "activations_one_site_fp32": figure("activations", "ratio_one_site"),
        "activations_one_site_bf16": figure("activations_bf16", "ratio_one_site"),
        "projection_rpc_vs_forward": figure("projection", "ratio_rpc_vs_forward"),
        "projection_core_vs_forward": figure("projection", "ratio_vs_forward"),
        "model_infer_vs_get_activations": figure("oip", "ratio_oip_vs_native"),
        "model_infer_encode_framed_vs_protobuf": figure("oip", "ratio_encode_framed_vs_protobuf"),
        "compiled_vs_eager_vitb": figure("compiled_vitb", "ratio_compiled_vs_eager"),
        "compiled_within_tolerance": figure("compiled_vitb", "within_tolerance"),
    }


def device_facts() -> dict[str, Any]:
    import grpc
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "grpcio": grpc.__version__}
    facts["cuda"] = torch.cuda.is_available()
    if facts["cuda"]:
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=560.0, help="seconds for everything")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    ends_at = time.monotonic() + args.budget
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VITSCOPE_TEST_DEVICE": "cuda"}
    summary: dict[str, Any] = {"device": device_facts(), "benchmarks": {}}
    if not summary["device"]["cuda"]:
        print(json.dumps({**summary, "error": "torch finds no CUDA device; nothing was run"}))
        sys.exit(1)
    if not args.skip_tests:
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TESTS]
        started = time.monotonic()
        code, output = run(command, min(TEST_SECONDS, ends_at - time.monotonic()), env)
        print(output[-6000:], flush=True)
        summary["tests"] = {
            **test_summary(code, output),
            "seconds": round(time.monotonic() - started),
        }
    for name, script, extra, seconds in BENCHMARKS:
        left = ends_at - time.monotonic()
        if left < MIN_SHARE * seconds:
            summary["benchmarks"][name] = {"skipped": f"{left:.0f} s left of the budget"}
            continue
        command = [sys.executable, f"bench/{script}.py", "--device", "cuda", *extra]
        started = time.monotonic()
        code, output = run(command, min(seconds, left), env)
        print(f"--- {name}\n{output[-3000:]}", flush=True)
        summary["benchmarks"][name] = {
            "exit_code": code,
            "timed_out": code is None,
            "seconds": round(time.monotonic() - started, 1),
            "result": last_json(output),
        }
    summary["expected_on_gpu"] = headline(summary["benchmarks"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
