#!/usr/bin/env bash
# One prepared call on a lent GPU machine (see benchmarks/RESULTS.md, "GPU"): the CUDA tests, then
# the Llama-3.1-8B-shaped benchmark. Writes its logs to ${OUT:-/tmp/gpu-out}. Extra Python
# packages the machine lacks travel as wheels in .whl/.
#   bash benchmarks/gpu_run.sh          # eager (with encode variants, streaming and op profiles) and --compile
#   bash benchmarks/gpu_run.sh serve    # the full encodes at 131k and serve mode at batch 16 (graph and eager hook; one clamp,
#                                       # and 10 steering rules with graph_policy_steps), 11 paired runs
#   bash benchmarks/gpu_run.sh confirm  # the full encodes at 131k and serve mode at batch 16 as shipped (the hook's steps as
#                                       # CUDA graphs; one clamp, and 10 steering rules), 21 paired runs
#   bash benchmarks/gpu_run.sh topk     # the SAE's CUDA tests; the top-k selection's variants (block and piece widths) on
#                                       # 16,384 rows of 131k and 65k bfloat16 pre-activations; the encodes at 65k and 131k
#                                       # with the Triton pieces' maxima and without
#   bash benchmarks/gpu_run.sh lockstep # the full encodes at 131k and serve mode at batch 16 as shipped (one clamp, and 10
#                                       # steering rules), 5 alternating runs, then 9 runs each in lockstep with plain decoding
#   bash benchmarks/gpu_run.sh graph    # serve mode at batch 16 with the hook's step as a CUDA graph and eager, 11 runs; streaming
#   bash benchmarks/gpu_run.sh policy   # watch-list + policy at batch 1, 8 and 32 x 512 tokens, eager and as CUDA graphs, the
#                                       # evaluation's program eager and compiled
#   bash benchmarks/gpu_run.sh pipeline # the CUDA tests, then Auditor.run end to end against its forwards alone (buckets queued
#                                       # ahead of the previous bucket's verdicts, in turn, and with the float32 encode), 4 buckets
#                                       # traced (kernels only the run has, GPU idle, each sync's stack), then 8 buckets
#   bash benchmarks/gpu_run.sh graphs   # no model: policy evaluations as CUDA graphs at 1-64 x 512 tokens, the memory each
#                                       # graph holds, eager and compiled programs (no tests)
set -u
mode="${1:-full}"
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
if [ "$mode" = graphs ]; then
    timeout 280 python3 benchmarks/policy_graphs.py --compile >"$out/graphs.log" 2>&1
    tail -n 12 "$out/graphs.log"
    exit 0
fi
if [ "$mode" = topk ]; then
    # No model for the selection's variants; the SAE's CUDA tests, then the encodes at 65k and
    # 131k in the Llama-shaped run, with the Triton pieces' maxima and without (one level).
    timeout 120 python3 -m pytest -q -W ignore -p no:cacheprovider tests/unit/sae/test_sae.py -k cuda 2>&1 | tail -n 3
    timeout 120 python3 benchmarks/topk_rows.py --device cuda --dtype bfloat16 --shapes 16384x131072x64,16384x65536x64 \
        --variants --repeats 5 >"$out/topk_rows.log" 2>&1
    tail -n 52 "$out/topk_rows.log"
    for triton in 1 0; do
        AUDITOR_TOPK_TRITON=$triton timeout 150 python3 benchmarks/gpu_llama8b.py --batch-sizes 32 --repeats 3 \
            --gen-batches 1 --gen-tokens 2 --gen-repeats 1 --steer-rules 0 --streams 0 >"$out/topk_triton$triton.log" 2>&1
        echo "AUDITOR_TOPK_TRITON=$triton"; grep -E "^(audit|SAE)" "$out/topk_triton$triton.log"
    done
    exit 0
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 240 python3 -m pytest -q -W ignore -p no:cacheprovider tests/unit/steering/test_hook.py \
    tests/unit/policy/test_engine.py tests/unit/policy/test_incremental.py tests/unit/policy/test_graphs.py \
    tests/unit/policy/test_compiled_program.py tests/unit/pipeline/test_overlap.py tests/unit/server/test_batcher.py \
    tests/unit/train/test_trainer.py \
    tests/unit/sae/test_sae.py tests/unit/models/test_streams.py -k "cuda or subset" 2>&1 | tail -n 8
if [ "$mode" = pipeline ]; then
    # Traces stay on the machine (/tmp): the script prints their comparison.
    timeout 180 python3 benchmarks/audit_pipeline.py --buckets 4 --batch 32 --repeats 3 --trace /tmp/pipeline-trace \
        >"$out/pipeline.log" 2>&1
    tail -n 40 "$out/pipeline.log"; cp /tmp/pipeline-trace/sync_stacks.txt "$out/" 2>/dev/null
    timeout 150 python3 benchmarks/audit_pipeline.py --buckets 8 --batch 32 --repeats 3 >"$out/pipeline8.log" 2>&1
    tail -n 12 "$out/pipeline8.log"
    exit 0
fi
if [ "$mode" = policy ]; then
    timeout 330 python3 benchmarks/gpu_llama8b.py --batch-sizes 1,8,32 --widths 131072 --repeats 3 --gen-batches 16 \
        --gen-tokens 32 --gen-repeats 3 --steer-rules 0 --streams 0 --compile-policy --profile "$out" >"$out/policy.log" 2>&1
    tail -n 18 "$out/policy.log"
    exit 0
fi
if [ "$mode" = graph ]; then
    timeout 330 python3 benchmarks/gpu_llama8b.py --batch-sizes 32 --widths 131072 --repeats 3 --gen-batches 16 \
        --gen-tokens 128 --gen-repeats 11 --steer-rules 0 --serve-eager --streams 16 >"$out/graph.log" 2>&1
    tail -n 8 "$out/graph.log"
    exit 0
fi
if [ "$mode" = lockstep ]; then
    timeout 330 python3 benchmarks/gpu_llama8b.py --batch-sizes 32 --widths 131072 --repeats 3 --gen-batches 16 \
        --gen-tokens 128 --gen-repeats 5 --steer-rules 0,10 --streams 0 --lockstep 9 >"$out/lockstep.log" 2>&1
    tail -n 8 "$out/lockstep.log"
    exit 0
fi
if [ "$mode" = confirm ]; then
    timeout 330 python3 benchmarks/gpu_llama8b.py --batch-sizes 32 --widths 131072 --repeats 3 --gen-batches 16 \
        --gen-tokens 128 --gen-repeats 21 --steer-rules 0,10 --streams 0 >"$out/confirm.log" 2>&1
    tail -n 6 "$out/confirm.log"
    exit 0
fi
if [ "$mode" = serve ]; then
    timeout 300 python3 benchmarks/gpu_llama8b.py --batch-sizes 32 --widths 131072 --repeats 3 --gen-batches 16 \
        --gen-tokens 128 --gen-repeats 11 --steer-rules 0,10 --serve-eager --streams 0 \
        >"$out/serve.log" 2>&1
    tail -n 8 "$out/serve.log"
    exit 0
fi
timeout 240 python3 benchmarks/gpu_llama8b.py --batch-sizes 8,32 --repeats 3 --gen-batches 16 --gen-tokens 128 \
    --gen-repeats 5 --steer-rules 0,10 --encode-variants --profile "$out" >"$out/eager.log" 2>&1
tail -n 14 "$out/eager.log"
timeout 170 python3 benchmarks/gpu_llama8b.py --batch-sizes 8 --widths 131072 --repeats 3 --gen-batches 16 \
    --gen-tokens 128 --gen-repeats 5 --steer-rules 0 --compile >"$out/compile.log" 2>&1
tail -n 6 "$out/compile.log"
