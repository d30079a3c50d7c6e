"""The benchmark scripts still run end to end (their smallest settings), so they do not rot between measurements."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from auditor.models import skinny

REPO = Path(__file__).resolve().parents[3]


def run_script(*args: str) -> str:
    # As a user runs them (`python benchmarks/x.py` from the repo): no PYTHONPATH to lean on.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def first_json(out: str) -> dict:
    """The JSON object a benchmark prints before its summary table."""
    obj, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
    return obj


def test_gpu_script_smoke_runs_on_cpu(tmp_path: Path) -> None:
    out = first_json(
        run_script(
            "benchmarks/gpu_llama8b.py", "--tiny", "--repeats", "1", "--steer-rules", "0,5/2", "--encode-variants",
            "--gen-repeats", "1", "--profile", str(tmp_path / "prof"), "--compile-policy", "--lockstep", "2",
        )
    )
    for name in ("plain", "serve"):
        table = (tmp_path / "prof" / f"profile_{name}.txt").read_text()
        assert table.startswith(f"{name}: batch 16, 8 new tokens") and "aten::mm" in table
    policy = (tmp_path / "prof" / "profile_policy.txt").read_text()
    assert policy.startswith("policy: 100 rules") and "matched: best" in policy and "evaluate: best" in policy
    assert "aten::index_select" in policy
    assert out["tiny"] is True and out["steer_rules"] == [0, 5]
    small = out["encode"][-1]["smaller_batches"]  # the widest SAE at the batch sizes below the largest
    assert [q["batch_size"] for q in small] == [1, 8] and all(q["policy_eval_eager_s"] > 0 for q in small)
    stream = out["streaming"]
    assert stream["supported"] and stream["streams"] == 16 and stream["chunks"] == 2  # 49 + 32 tokens: 65, then 16
    assert all(stream[k]["chunked_s"] > 0 and stream[k]["whole_s"] > 0 for k in ("one", "many"))
    assert [(r["batch_size"], r["steer_rules"]) for r in out["generation"]] == [(1, 0), (1, 5), (16, 0), (16, 5)]
    assert [r["policy_every"] for r in out["generation"]] == [1, 2, 1, 2]
    assert all(r["serve_tok_s"] > 0 and r["plain_tok_s"] > 0 for r in out["generation"])
    # Every timed run is kept; the CPU never captures a CUDA graph.
    assert out["graph_policy_steps"] is True
    for r in out["generation"]:
        assert len(r["plain_runs_s"]) == len(r["serve_runs_s"]) == r["runs"] == 1
        assert r["serve_vs_plain_best"] == min(r["plain_runs_s"]) / min(r["serve_runs_s"])
        assert r["graph_captures"] == 0 and r["graph_capture_ms"] == 0.0 and r["graph_steps"] == 0
    # Lockstep: both generations timed at every step (the prompt's forward first), each run's totals kept.
    for r in out["generation"]:
        q = r["lockstep"]
        assert q["runs"] == 2 and len(q["plain_total_s"]) == len(q["serve_total_s"]) == 2
        assert all(t > 0 for t in q["plain_total_s"] + q["serve_total_s"]) and q["final_verdict_ms"] > 0
        assert 0 < q["serve_vs_plain_by_position"] and 0 < q["decode_step_ratio_median"]
        assert q["plain_prompt_ms"] > q["plain_step_ms"] > 0  # the 128-token prompt against one new token
        assert q["serve_vs_plain"] == statistics.median(p / s for p, s in zip(q["plain_total_s"], q["serve_total_s"]))
    assert all(0 < r["watch_plus_eval_share"] for r in out["encode"])
    # The encode variants ran (no error strings) and the two-stage top-k is exact where it applies.
    variants = out["encode"][1]["variants_s"]
    assert all(isinstance(variants[k], float) for k in ("gemm_only", "product_sae_encode", "relu_addmm_relu_inplace", "topk_only"))
    assert variants["topk_two_stage_4096_exact"] is True and variants["topk_blockmax_exact"] is True
    assert isinstance(variants["topk_blockmax_only"], float)
    # The policy program run as it is and compiled, at each batch size (the CPU runs them directly).
    programs = out["encode"][-1]["programs"]
    assert [(p["compiled"], p["batch_size"]) for p in programs] == [(False, 1), (False, 8), (False, 32), (True, 1), (True, 8), (True, 32)]
    assert all(not p["failed"] and p["direct"]["eval_s"] > 0 and "graph" not in p for p in programs)


def test_policy_graphs_script_runs() -> None:
    out = first_json(run_script("benchmarks/policy_graphs.py", "--batch-sizes", "1,3", "--tokens", "32", "--repeats", "1", "--rules", "20"))
    assert out["rules"] == 20 and [r["batch_size"] for r in out["rows"]] == [1, 3]
    assert all(r["direct_eval_ms"] > 0 and r["matches_per_text"] >= 0 for r in out["rows"])


def test_topk_rows_script_agrees_with_torch_topk() -> None:
    out = first_json(run_script("benchmarks/topk_rows.py", "--repeats", "1"))
    assert len(out["shapes"]) >= 6 and all(r["same_values"] for r in out["shapes"])


def test_topk_rows_script_times_the_variants_of_given_shapes() -> None:
    text = run_script("benchmarks/topk_rows.py", "--repeats", "1", "--shapes", "8x65536x32", "--dtype", "bfloat16", "--variants")
    out = first_json(text)
    (row,) = out["shapes"]
    assert (row["rows"], row["width"], row["k"], out["dtype"]) == (8, 65536, 32, "bfloat16") and row["same_values"]
    v = row["variants"]
    assert v["sum_ms"] > 0 and v["bytes"] == 8 * 65536 * 2 and v["amax_16_ms"] > 0
    exact = {name: ok for name, ok in v.items() if name.endswith("_exact")}
    assert "block_256_piece_16_exact" in exact and "block_64_exact" in exact and all(exact.values())
    assert "block_256_piece_16" in text and "MISMATCH" not in text
    for args, message in ((["--shapes", "8x65536"], "each item needs three numbers, ROWSxWIDTHxK"),
                          (["--shapes", "8x100x200"], "1 <= k <= width; (8, 100, 200) is not"),
                          (["--shapes", "8x-5x3"], "(8, -5, 3) is not"),
                          (["--compiled"], "give --variants too")):
        bad = subprocess.run([sys.executable, "benchmarks/topk_rows.py", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr[-500:])


def test_policy_eval_script_runs() -> None:
    out = first_json(run_script("benchmarks/policy_eval.py", "--rules", "20", "--repeats", "3", "--tokens", "16"))
    assert out["rules"] == 20 and out["watched"] > 0
    # Building the verdicts is part of an evaluation: it cannot take longer than the whole.
    assert 0 < out["verdicts_median_ms"] <= out["median_batch_ms"]
    # Every program timed beside what the engine picks on a CPU (here the host program: a small
    # batch; its C twin where the kernel library builds).
    assert out["host_program"] is True and out["torch_program_ms_per_1k_tokens"] > 0 and out["numpy_program_ms_per_1k_tokens"] > 0
    assert out["c_twin"] is (skinny.library() is not None)
    assert not out["c_twin"] or out["c_program_ms_per_1k_tokens"] > 0


def test_steering_hook_script_runs() -> None:
    out = first_json(run_script("benchmarks/steering_hook.py", "--steps", "10", "--repeats", "1", "--steer-rules", "3"))
    assert out["steer_rules"] == 3 and out["us_per_step"] > 0 and out["ops_per_step"] > 10


def test_dtype_agreement_script_runs() -> None:
    out = first_json(run_script("benchmarks/dtype_agreement.py", "--texts", "14", "--chunk", "7"))
    assert out["texts"] == 14 and out["dtype"] == "bfloat16"
    assert 0 <= out["same_action"] <= 14 and out["float32_texts_per_s"] > 0 and out["low_texts_per_s"] > 0


def test_server_load_script_runs() -> None:
    out = first_json(
        run_script(
            "benchmarks/server_load.py", "--clients", "3", "--texts", "12", "--offline-chunks", "4",
            "--sae", "random", "--policy", "policies/examples/deception.yaml", "--model-workers", "2", "--in-process",
        )
    )
    assert out["server"]["statuses"] == {"200": 12} and out["server"]["texts_per_s"] > 0
    runs = out["offline_before"] + out["offline_after"]
    assert sorted({(r["chunk"], r["workers"]) for r in runs}) == [(4, 1), (4, 2)]
    assert out["ratio"] == out["server"]["texts_per_s"] / max(r["texts_per_s"] for r in runs)


def test_streaming_script_runs_with_streams_side_by_side() -> None:
    out = first_json(
        run_script(
            "benchmarks/streaming.py", "--tokens", "32", "--chunk", "16", "--repeats", "1", "--streams", "3",
            "--batcher-workers", "2",
        )
    )
    assert out["chunks"] == 2 and out["verdicts_agree"] and out["shared_stream_forwards"] is True
    many = out["many"]
    assert many["streams"] == 3 and many["rounds"] == 2 and many["verdicts_agree"]
    assert all(many[k] > 0 for k in ("single_s", "alone_s", "shared_s", "batcher_s"))
    assert 2 <= many["batcher_batches"] <= 6  # three clients, two rounds each
    # The one-stream audit also ran with torch's products, when the few-row kernel is in use.
    kernel = out["few_row_kernel"]
    assert kernel["available"] == skinny.status()["available"]
    if kernel["available"]:
        assert out["chunked_reuse_torch_products_s"] > 0
        assert out["reuse_torch_products_vs_single"] == out["chunked_reuse_torch_products_s"] / out["single_s"]
        # The default model's weights come from a Q4_1 GGUF: every decoder weight has its 4-bit
        # form (the tied LM head, the Q8_0 embedding's values, has none), so the chunked audit
        # also ran on the float32 weights.
        packed, linears = map(int, out["linear_weights_4bit"].split(" of "))
        assert linears == packed + 1 and packed % 7 == 0
        assert out["chunked_reuse_float32_weights_s"] > 0
        assert out["reuse_float32_weights_vs_single"] == out["chunked_reuse_float32_weights_s"] / out["single_s"]
        assert set(out["stage_s"]) == {"single", "reuse", "reuse_float32_weights", "reuse_torch_products"}


def test_audit_throughput_script_runs() -> None:
    out = first_json(
        run_script("benchmarks/audit_throughput.py", "--texts", "4", "--repeats", "2", "--batch-sizes", "1,2", "--batch-tokens", "256")
    )
    assert [r["batch_size"] for r in out["rows"]] == [1, 2] and out["watched_latents"] > 0
    for r in out["rows"]:
        stages = r["audit_stages_s"]
        assert set(stages) == {"tokenize", "forward", "encode", "evaluate"} and all(v > 0 for v in stages.values())
        # Each stage's best over the timed calls: together no more than the best call's wall time.
        assert sum(stages.values()) <= r["audit_s"]
        torch_stages = r["audit_stages_torch_eval_s"]  # the same audit, the torch evaluation program
        assert set(torch_stages) == set(stages) and sum(torch_stages.values()) <= r["audit_torch_eval_s"]
        numpy_stages = r["audit_stages_numpy_eval_s"]  # the same audit, the host program in NumPy
        assert set(numpy_stages) == set(stages) and sum(numpy_stages.values()) <= r["audit_numpy_eval_s"]
        assert r["policy_eval_s"] > 0 and r["policy_eval_torch_s"] > 0 and r["policy_eval_numpy_s"] > 0
        assert r["audit_vs_full_forward"] == r["full_forward_s"] / r["audit_s"]
        products = r["audit_stages_torch_products_s"]  # the same audit, the few-row kernel suspended
        assert set(products) == set(stages) and sum(products.values()) <= r["audit_torch_products_s"]
        assert set(r["encode"]) == {"loaded (topk)", "random standard (ReLU)", "random jumprelu"}
    assert [t["batch_tokens"] for t in out["batch_tokens_tuning"]] == [256]


def test_few_row_kernel_script_compares_with_torch() -> None:
    if not skinny.status()["available"]:
        pytest.skip(f"the few-row kernel cannot run here: {skinny.status()['detail']}")
    out = first_json(run_script("benchmarks/few_row_kernel.py", "--rows", "1,16,200", "--repeats", "1"))
    assert [r["rows"] for r in out["results"]] == [1, 16, 200]
    assert out["linear_layers"] == 7 * out["layers"]  # q, k, v, o, gate, up, down in each Llama layer
    for r in out["results"]:
        assert r["torch_s"] > 0 and r["kernel_s"] > 0 and r["speedup"] == r["torch_s"] / r["kernel_s"]
        assert r["max_abs_diff"] < 1e-3  # float rounding of another summation order, not a wrong product
        assert r["encoder_torch_s"] > 0
        # The encoder product by the kernel up to MAX_ROWS rows only.
        assert (r["encoder_kernel_s"] is not None) == (r["rows"] <= out["max_rows"])
        assert (r["encoder_kernel_rows_s"] is not None) == (r["rows"] <= out["max_rows"])
        if r["encoder_kernel_s"] is not None:
            assert r["encoder_max_abs_diff"] < 1e-3 and r["encoder_rows_max_abs_diff"] < 1e-3
        # Read from their 4-bit form (the default's weights all have one), the same results to the bit.
        assert r["kernel_float32_s"] > 0 and r["packed_same_bits"] is True
    assert out["weights_4bit"] == out["linear_layers"]
    assert 0.18 < out["packed_mb"] / out["weights_mb"] < 0.19  # 6 bits a weight of 32
    # The row check timed over every 4-bit weight (a difference of two timings: only its presence is asserted).
    assert out["row_checks"]["weights"] == out["weights_4bit"] and out["row_checks"]["calls_unchecked_s"] > 0


def test_audit_pipeline_script_runs() -> None:
    out = first_json(run_script("benchmarks/audit_pipeline.py", "--tiny", "--buckets", "3", "--batch", "4", "--repeats", "1"))
    assert out["tiny"] is True and out["buckets"] == 3 and out["seq"] == 64
    assert out["forwards_s"] > 0 and out["tokenize_s"] > 0 and out["launch_syncs"] == []  # none listed off CUDA
    assert all(out[f"{k}_s"] > out["forwards_s"] for k in ("run_overlapped", "run_in_turn", "batches_ahead"))
    assert out["matches_per_text"] > 0


def test_audit_pipeline_compares_two_traces(tmp_path: Path) -> None:
    """The kernels only a run has: per name, the run's time less the forwards' where it launched more."""
    import gzip

    def kernel(name: str, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": 0, "dur": dur}

    forwards = [kernel("gemm_bf16", 100.0), kernel("gemm_bf16", 102.0), kernel("rmsnorm", 5.0)]
    run = [kernel("gemm_bf16", 99.0), kernel("gemm_bf16", 101.0), kernel("rmsnorm", 5.5),
           kernel("gemm_f32_watch_list", 7.0), kernel("gather", 1.5), kernel("gather", 1.5),
           {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50.0}]
    (tmp_path / "run.json").write_text(json.dumps({"traceEvents": run}))
    with gzip.open(tmp_path / "fwd.json.gz", "wt") as f:
        json.dump({"traceEvents": forwards}, f)
    out = first_json(run_script("benchmarks/audit_pipeline.py", "--compare-traces", str(tmp_path / "run.json"), str(tmp_path / "fwd.json.gz")))
    assert out["forwards_device_ms"] == pytest.approx(0.207) and out["run_only_ms"] == pytest.approx(0.010)
    assert [(r["kernel"], r["extra_launches"]) for r in out["largest"]] == [("gemm_f32_watch_list", 1), ("gather", 2)]


def test_lockstep_summary_of_one_new_token() -> None:
    # One new token: the prompt's forward only, no decode step to pair; the summary says so.
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_llama8b import lockstep_line, lockstep_summary

    runs = [{"plain_steps_s": [0.010], "serve_steps_s": [0.012], "verdict_s": 0.002},
            {"plain_steps_s": [0.020], "serve_steps_s": [0.021], "verdict_s": 0.003}]
    q = lockstep_summary(runs)
    assert q["decode_step_ratio_median"] is None and q["runs"] == 2
    assert q["serve_vs_plain"] == statistics.median([0.010 / 0.014, 0.020 / 0.024])
    assert q["plain_step_ms"] == q["plain_prompt_ms"] == 15.0  # the prompt's forward is all there is
    line = lockstep_line({"batch_size": 16, "steer_rules": 0, "policy_every": 1, "cuda_graph": True, "lockstep": q})
    assert "decode steps paired none (one new token)" in line and "serve/plain 0.774" in line
