"""GPU benchmark: the auditor's cost ratios on a Llama-3.1-8B-shaped model with random weights.

One prepared run for a single GPU (about 3-4 minutes on an H100; nothing is downloaded):
builds ``LlamaForCausalLM`` from the Llama-3.1-8B configuration (hidden 4096, 32 layers,
MLP 14336, 32 heads, 8 KV heads, vocabulary 128,256) with random bf16 weights, random
ReLU SAEs of 65,536 and 131,072 latents reading ``blocks.16.hook_resid_post``, and a random
100-rule policy over 400 library features (from ``benchmarks/policy_eval.py``). Measures,
in the same process:

1. audit: plain full forward (with LM head) vs forward stopped after layer 16, per batch size;
2. encode: watch-list (the policy's latents) and full-width encode for each SAE width (ReLU
   and TopK k=64 on the same weights), and policy evaluation, as a share of the stopped forward;
3. generation: greedy decoding with the KV cache at batch 1 and 16, plain vs serve mode
   (the product's steering hook at layer 16: the watched latents of every new position
   encoded once, one clamp intervention, the ``--steer-rules`` rules that steer evaluated
   every ``--policy-every`` tokens on the growing sequence, the whole policy at the end);
   plain and serve runs take turns, medians of ``--gen-repeats``; with ``--lockstep N`` also
   N runs of each serve configuration advanced step by step in turns with a plain generation
   (each step timed alone), which the machine's drift between runs does not reach;
4. streaming (``--streams N``, 0 skips): a prompt plus a completion audited in chunks through
   ``capture_streams`` (one stream alone, and N streams fed together), against one stopped
   forward of the whole sequence (and of the N sequences as one batch). Forwards only: encode
   and evaluation are the same rows either way and are timed in 2.

``--encode-variants`` also times ways of computing the full-width encode (the product's
``SAE.encode``, the bare GEMM, matmul + add + ReLU, addmm + in-place ReLU, the GEMM with a fused
bias + ReLU epilogue, full, two-stage and block-maxima top-k, and an fp8 row-wise GEMM with its error).

Prints one JSON object and a summary with each goal ratio. ``--tiny`` swaps in a 2-layer
model and 4,608- and 8,192-wide SAEs so the script can be smoke-tested on a CPU in seconds.

    python benchmarks/gpu_llama8b.py [--tiny] [--device cuda] [--seq 512] [--batch-sizes 1,8,32]
        [--gen-tokens 64] [--gen-batches 1,16] [--gen-repeats 5] [--steer-rules 0,10,10/4] [--policy-every 1]
        [--encode-variants] [--compile] [--streams 16] [--stream-chunk 16] [--stream-tokens 256]
        [--lockstep N]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor.models import LoadedModel, capture, compile_layers, get_adapter, hooks  # noqa: E402
from auditor.models.capture import _cache_keyword  # noqa: E402
from auditor.models.streams import StreamCache, capture_streams, streams_supported  # noqa: E402
from auditor.policy._graphs import EvalGraphs  # noqa: E402
from auditor.policy.compile import compile_policy  # noqa: E402
from auditor.policy.engine import AuditBatch, PolicyEngine  # noqa: E402
from auditor.policy.schema import Policy  # noqa: E402
from auditor.sae import SAE, SAEConfig  # noqa: E402
from auditor.sae.sae import _row_topk  # noqa: E402
from auditor.steering._hook import SteeringHook  # noqa: E402
from auditor.steering.interventions import ResolvedIntervention  # noqa: E402
from benchmarks.policy_eval import random_library, random_policy, verdict_build_times  # noqa: E402
from benchmarks.timing import best_time, sync  # noqa: E402

LLAMA_31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 1024,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def build_model(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.LlamaConfig(**cfg)
    torch.manual_seed(0)
    # Built directly in the target dtype on the device: 8B parameters in fp32 first would need 32 GB.
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    # Default init is N(0, 0.02): fine for timing, and keeps activations finite in bf16.
    return model.eval().requires_grad_(False)


def random_sae(d_in: int, d_sae: int, hook: str, device: torch.device, dtype: torch.dtype, arch: str = "standard",
               weights: dict[str, torch.Tensor] | None = None) -> SAE:
    if weights is None:
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(d_in, d_sae, generator=gen, device=device, dtype=dtype)
        w = w / w.norm(dim=0, keepdim=True)
        weights = {
            "W_enc": w,
            "b_enc": -torch.rand(d_sae, generator=gen, device=device, dtype=dtype),
            "W_dec": w.T.contiguous(),
            "b_dec": torch.zeros(d_in, device=device, dtype=dtype),
        }
    cfg = SAEConfig(
        architecture=arch,  # type: ignore[arg-type]
        d_in=d_in,
        d_sae=d_sae,
        k=64 if arch == "topk" else None,
        metadata={"hook_name": hook, "model_name": "llama-3.1-8b-shaped"},
    )
    return SAE.from_tensors(cfg, weights, device=device, dtype=dtype)


def random_engine(d_sae: int, device: torch.device) -> PolicyEngine:
    rng = random.Random(0)
    library = random_library(rng, 400)
    policy = random_policy(rng, library.names, 100)
    compiled = compile_policy(policy, library, base_dir=".", path="<gpu-bench>")
    engine = PolicyEngine(policy, library, compiled)
    if int(engine.watched.max()) >= d_sae:  # the random library indexes 4,608 latents
        raise SystemExit(f"SAE width {d_sae} is below the random library's indices")
    return engine


def two_stage_topk(pre: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of each row of ``pre [N, W]`` via the top ``k`` of each ``chunk``-wide slice first."""
    n, w = pre.shape
    part = pre.view(n, w // chunk, chunk).topk(k, dim=-1)  # [N, W/chunk, k]
    cand = part.values.reshape(n, -1)
    top = cand.topk(k, dim=-1)
    base = (torch.arange(w // chunk, device=pre.device) * chunk).view(1, -1, 1)
    idx = (part.indices + base).reshape(n, -1).gather(1, top.indices)
    return top.values, idx


def encode_variants(x: torch.Tensor, sae: SAE, k: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """Seconds for ways of computing the full-width encode of ``x [N, d]`` (each guarded: an error is reported)."""
    w, b = sae.W_enc, sae.b_enc
    out: dict[str, Any] = {}

    def run(name: str, fn: Callable[[], Any]) -> None:
        try:
            with torch.inference_mode():
                out[name] = best_time(fn, device, repeats)
        except Exception as exc:  # noqa: BLE001 - a variant the build lacks is reported, not fatal
            out[name] = f"error: {type(exc).__name__}: {str(exc)[:160]}"

    run("gemm_only", lambda: x @ w)
    run("product_sae_encode", lambda: sae.encode(x))
    run("relu_matmul_add_relu", lambda: torch.relu(x @ w + b))
    run("relu_addmm_relu_inplace", lambda: torch.addmm(b, x, w).relu_())
    run("relu_addmm_activation", lambda: torch._addmm_activation(b, x, w))
    with torch.inference_mode():
        pre = torch.addmm(b, x, w)
        ref = pre.topk(k, dim=-1).values
    run("topk_only", lambda pre=pre: pre.topk(k, dim=-1))
    run("topk_blockmax_only", lambda pre=pre: _row_topk(pre, k, blocks=True))
    with torch.inference_mode():
        out["topk_blockmax_exact"] = bool(torch.equal(_row_topk(pre, k, blocks=True)[0], ref))
    for block in (16, 32, 64, 128, 256):  # block widths of the block-maxima top-k (the product's choice above)
        if pre.shape[1] % block == 0 and k * block < pre.shape[1]:
            run(f"topk_blockmax_{block}_only", lambda b=block, pre=pre: _row_topk(pre, k, blocks=True, block=b))
            with torch.inference_mode():
                out[f"topk_blockmax_{block}_exact"] = bool(torch.equal(_row_topk(pre, k, blocks=True, block=block)[0], ref))
    for chunk in (4096, 16384):
        if pre.shape[1] % chunk == 0:
            run(f"topk_two_stage_{chunk}_only", lambda c=chunk, pre=pre: two_stage_topk(pre, k, c))
            with torch.inference_mode():
                out[f"topk_two_stage_{chunk}_exact"] = bool(torch.equal(two_stage_topk(pre, k, chunk)[0], ref))
    del pre, ref
    if device.type == "cuda" and hasattr(torch, "float8_e4m3fn"):
        try:
            with torch.inference_mode():
                fmax = torch.finfo(torch.float8_e4m3fn).max
                xs = (x.abs().amax(1, keepdim=True).float() / fmax).clamp_min(1e-12)  # [N, 1]
                ws = (w.abs().amax(0, keepdim=True).float() / fmax).clamp_min(1e-12)  # [1, W]
                xq = (x.float() / xs).to(torch.float8_e4m3fn)
                wq = (w.float() / ws).to(torch.float8_e4m3fn).t().contiguous().t()  # column-major
                def fp8() -> torch.Tensor:
                    y = torch._scaled_mm(xq, wq, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
                    return y.add_(b).relu_()
                run("relu_fp8_rowwise", fp8)
                exact = torch.addmm(b, x, w).relu_()
                approx = fp8()
                on_e, on_a = exact > 0, approx > 0
                out["fp8_active_agreement"] = float((on_e == on_a).float().mean())
                out["fp8_rel_error_active"] = float(((approx - exact).float().norm() / exact.float().norm()))
                del exact, approx, xq, wq
        except Exception as exc:  # noqa: BLE001
            out["relu_fp8_rowwise"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
    return out


def decode_loop(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    n_new: int,
    serve: dict[str, Any] | None,
) -> float:
    """Greedy decoding with a DynamicCache; ``serve`` installs the product's steering hook.

    Serve mode is what :func:`auditor.steering.generate` runs: :class:`SteeringHook` encodes the
    watched and steered latents of every new position once, keeps them as the sequence's
    history, evaluates the policy's rules with ``steer`` actions every ``policy_every`` tokens,
    applies one clamp, and the whole policy gives the verdict once at the end.
    """
    cache = transformers.DynamicCache(config=model.config)
    key = _cache_keyword(model)

    def step(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, use_cache=True, **{key: cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]

    with torch.inference_mode():
        if serve is None:
            nxt = step(prompt)
            for _ in range(n_new - 1):
                nxt = step(nxt)
            return 0.0
        b, p = prompt.shape
        hook = SteeringHook(
            serve["sae"], [serve["clamp"]], engine=serve["engine"], policy_every=serve["policy_every"],
            cuda_graph=serve.get("cuda_graph", True),
        )
        hook.reset(b, torch.ones(b, dtype=torch.bool))
        host = [0.0, 0]  # host seconds spent inside the hook on decode steps, and their count

        def timed(tensor: torch.Tensor, *, hook: Any, inner: SteeringHook = hook) -> torch.Tensor:
            # Decoding is bound by the host launching kernels: the hook's host time per step is its
            # cost, measured without a device sync (which would change what it measures).
            t0 = time.perf_counter()
            out = inner(tensor, hook=hook)
            if tensor.shape[1] == 1:
                host[0] += time.perf_counter() - t0
                host[1] += 1
            return out

        with hooks(model, [(serve["hook"], timed)]):
            hook.set_positions(torch.ones(b, p, dtype=torch.bool), torch.zeros(b, p, dtype=torch.bool))
            nxt = step(prompt)
            for _ in range(n_new - 1):
                hook.set_positions(torch.ones(b, 1, dtype=torch.bool), torch.ones(b, 1, dtype=torch.bool))
                nxt = step(nxt)
            sync(prompt.device)
            t0 = time.perf_counter()
            hook.evaluate()
            sync(prompt.device)
            serve["graph_steps"] = hook.graph_steps
            serve.setdefault("capture_s", []).append(hook.graph_capture_s)
            serve["captures"] = hook.graph_captures
            serve.setdefault("hook_host_s", []).append(host[0] / max(host[1], 1))
            return time.perf_counter() - t0


def lockstep_decode(model: torch.nn.Module, prompt: torch.Tensor, n_new: int, serve: dict[str, Any]) -> dict[str, Any]:
    """Plain and serve-mode greedy decoding of ``prompt``, advanced one step at a time in turns.

    Each generation keeps its own cache; the serve one has the product's steering hook installed
    for its steps only (as :func:`decode_loop` sets it up: one clamp, the watched latents of every
    new position, the steering rules every ``policy_every`` tokens). Every step is timed alone,
    the device synchronized before and after it (a generation loop that checks its stopping
    criteria each step waits for the step too), and the two generations alternate which goes
    first at each position, so whatever slows the machine for a while slows both alike. The serve
    generation's whole-policy verdict at the end is timed on its own. Returns the seconds of each
    step (index 0 is the prompt's forward) of each generation and of the verdict.
    """
    device = prompt.device
    key = _cache_keyword(model)
    b, p = prompt.shape
    caches = {False: transformers.DynamicCache(config=model.config), True: transformers.DynamicCache(config=model.config)}
    nxt = {False: prompt, True: prompt}
    times: dict[bool, list[float]] = {False: [], True: []}
    hook = SteeringHook(
        serve["sae"], [serve["clamp"]], engine=serve["engine"], policy_every=serve["policy_every"],
        cuda_graph=serve.get("cuda_graph", True),
    )
    hook.reset(b, torch.ones(b, dtype=torch.bool))

    def step(serving: bool, first: bool) -> None:
        ids = nxt[serving]
        sync(device)
        t0 = time.perf_counter()
        if serving:
            n = ids.shape[1]
            hook.set_positions(torch.ones(b, n, dtype=torch.bool), torch.full((b, n), not first, dtype=torch.bool))
        out = model(input_ids=ids, use_cache=True, **{key: caches[serving]})
        nxt[serving] = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times[serving].append(time.perf_counter() - t0)

    with torch.inference_mode():
        for i in range(n_new):
            for serving in ((False, True) if i % 2 == 0 else (True, False)):
                if serving:
                    with hooks(model, [(serve["hook"], hook)]):
                        step(True, i == 0)
                else:
                    step(False, i == 0)
        sync(device)
        t0 = time.perf_counter()
        hook.evaluate()
        sync(device)
        verdict = time.perf_counter() - t0
    return {"plain_steps_s": times[False], "serve_steps_s": times[True], "verdict_s": verdict}


def lockstep_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of :func:`lockstep_decode` runs of one configuration.

    ``serve_vs_plain`` is the headline: each run's plain total (prompt forward and every step)
    against its serve total (the same, plus the final verdict), whose steps ran interleaved with
    the plain ones, and the median of those ratios over the runs. The machine's speed may differ
    between runs by tens of percent; inside a run both sides see it alike. Also: each position's
    median step over the runs, summed per side (``serve_vs_plain_by_position``, which unpairs the
    two sides, so it carries the runs' spread), and the median ratio of the decode steps paired by
    run and position.
    """
    n = len(runs[0]["plain_steps_s"])
    per_pos = {side: [statistics.median(r[f"{side}_steps_s"][i] for r in runs) for i in range(n)] for side in ("plain", "serve")}
    verdict = statistics.median(r["verdict_s"] for r in runs)
    totals = [(sum(r["plain_steps_s"]), sum(r["serve_steps_s"]) + r["verdict_s"]) for r in runs]
    pairs = [r["plain_steps_s"][i] / r["serve_steps_s"][i] for r in runs for i in range(1, n)]
    return {
        "runs": len(runs),
        "serve_vs_plain": statistics.median(p / q for p, q in totals),
        "serve_vs_plain_by_position": sum(per_pos["plain"]) / (sum(per_pos["serve"]) + verdict),
        "decode_step_ratio_median": statistics.median(pairs) if pairs else None,
        "plain_step_ms": 1000 * statistics.median(per_pos["plain"][1:] or per_pos["plain"]),
        "serve_step_ms": 1000 * statistics.median(per_pos["serve"][1:] or per_pos["serve"]),
        "plain_prompt_ms": 1000 * per_pos["plain"][0],
        "serve_prompt_ms": 1000 * per_pos["serve"][0],
        "final_verdict_ms": 1000 * verdict,
        "plain_total_s": [p for p, _ in totals],
        "serve_total_s": [q for _, q in totals],
    }


def lockstep_line(r: dict[str, Any]) -> str:
    """The summary line of a generation row's lockstep figures (:func:`lockstep_summary`)."""
    q = r["lockstep"]
    steps = q["decode_step_ratio_median"]
    return (f"generation batch {r['batch_size']:>2}, {r['steer_rules']:>3} steering rules every {r['policy_every']} "
            f"token(s), hook {'graph' if r['cuda_graph'] else 'eager'}, lockstep with plain ({q['runs']} runs): "
            f"serve/plain {q['serve_vs_plain']:.3f}, median of the runs' ratios (goal >= 0.98 at batch 16 on the GPU; "
            f"by each position's median step {q['serve_vs_plain_by_position']:.3f}; decode steps paired "
            f"{'none (one new token)' if steps is None else format(steps, '.3f')}); a step {q['plain_step_ms']:.2f} ms "
            f"plain, {q['serve_step_ms']:.2f} ms serve; the prompt {q['plain_prompt_ms']:.1f} / {q['serve_prompt_ms']:.1f} "
            f"ms; the final verdict {q['final_verdict_ms']:.1f} ms")


def profile_policy(engine: PolicyEngine, batch: AuditBatch, device: torch.device, out_dir: Path) -> None:
    """Write a ``torch.profiler`` op table of the policy's decision (``matched``) and of a whole
    evaluation (``evaluate``) on ``batch`` to ``out_dir/profile_policy.txt``: best wall times and,
    per call, the operators and (on CUDA) the kernel launches, which bound the decision there."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n = 5
    text = [f"policy: {len(engine.compiled.rules)} rules, batch {tuple(batch.features.shape)}, {n} calls each", ""]
    with torch.inference_mode():
        for name, fn in (("matched", lambda: engine.matched(batch)), ("evaluate", lambda: engine.evaluate(batch))):
            best = best_time(fn, device, n)
            with profile(activities=acts) as prof:
                for _ in range(n):
                    fn()
                sync(device)
            table = prof.key_averages()
            line = f"{name}: best {best * 1000:.3f} ms"
            if device.type == "cuda":
                launches = sum(e.count for e in table if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC"))
                line += f", {launches / n:.0f} kernel launches a call"
            text.append(line)
            text.append(table.table(sort_by="self_cpu_time_total", row_limit=25))
            if device.type == "cuda":
                text.append(table.table(sort_by="self_cuda_time_total", row_limit=25))
    (out_dir / "profile_policy.txt").write_text("\n".join(text))


def profile_generation(model: torch.nn.Module, serve: dict[str, Any], cfg: dict[str, Any], batch: int, prompt_len: int,
                       n_new: int, device: torch.device, out_dir: Path) -> None:
    """Write ``torch.profiler`` op tables of one plain and one serve-mode generation to ``out_dir``.

    Each table (``profile_plain.txt``, ``profile_serve.txt``) is sorted by self CPU time, then
    by self device time; the wall time of each profiled run heads its file.
    """
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    gen = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, cfg["vocab_size"], (batch, prompt_len), generator=gen, device=device)
    for name, conf in (("plain", None), ("serve", serve)):
        decode_loop(model, prompt, n_new, conf)  # warm
        sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            decode_loop(model, prompt, n_new, conf)
            sync(device)
            wall = time.perf_counter() - t0
        table = prof.key_averages()
        text = [f"{name}: batch {batch}, {n_new} new tokens, {wall * 1000:.1f} ms under the profiler", ""]
        text.append(table.table(sort_by="self_cpu_time_total", row_limit=40))
        if device.type == "cuda":
            text.append(table.table(sort_by="self_cuda_time_total", row_limit=25))
        (out_dir / f"profile_{name}.txt").write_text("\n".join(text))


def streaming(
    model: torch.nn.Module, hook: str, vocab: int, device: torch.device, n_streams: int, prompt: int, tokens: int,
    chunk: int, repeats: int, gen: torch.Generator,
) -> dict[str, Any]:
    """Chunked streamed forwards (the prompt with the first chunk, then ``chunk`` tokens at a time)
    vs one stopped forward of the whole sequence, for one stream and for ``n_streams`` fed together."""
    if not streams_supported(model, hook):
        return {"supported": False}
    seqs = torch.randint(0, vocab, (n_streams, prompt + tokens), generator=gen, device=device).tolist()
    cuts = [0, *range(prompt + chunk, prompt + tokens, chunk), prompt + tokens]

    def chunked(k: int) -> None:
        caches = [StreamCache() for _ in range(k)]
        for a, b in zip(cuts, cuts[1:]):
            capture_streams(model, hook, caches, [s[a:b] for s in seqs[:k]])

    def whole(k: int) -> None:
        capture(model, torch.tensor(seqs[:k], device=device), None, [hook], stop_early=True)

    out: dict[str, Any] = {"supported": True, "streams": n_streams, "tokens": prompt + tokens, "chunk": chunk,
                           "chunks": len(cuts) - 1}
    for name, k in (("one", 1), ("many", n_streams)):
        t_whole = best_time(lambda: whole(k), device, repeats)
        t_chunked = best_time(lambda: chunked(k), device, repeats)
        out[name] = {"whole_s": t_whole, "chunked_s": t_chunked, "chunked_vs_whole": t_chunked / t_whole}
    return out


def policy_programs(engine: PolicyEngine, f: torch.Tensor, m: torch.Tensor, comp: torch.Tensor, x: torch.Tensor, sae: SAE,
                    watched: torch.Tensor, audit_rows: list[dict[str, Any]], device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Watch-list encode + evaluation (and the decision alone) at each batch size, with the tensor
    program eager or compiled, run directly or as CUDA graphs (allowed up to the largest batch here);
    what each compilation and each graph's memory cost."""
    seq = f.shape[1]
    rows = []
    for compiled in (False, True):
        engine.compile_program = compiled
        engine._program, engine._program_failed = None, False
        engine.graph_max_tokens = f.shape[0] * seq
        engine._graphs = EvalGraphs(engine._program_outputs)
        for row in audit_rows:
            bs = row["batch_size"]
            xs, batch = x[: bs * seq], AuditBatch(f[:bs].contiguous(), m[:bs], comp[:bs])
            with torch.inference_mode():
                t_w = best_time(lambda: sae.encode(xs, features=watched), device, repeats)
            out: dict[str, Any] = {"batch_size": bs, "compiled": compiled, "stopped_forward_s": row["stopped_forward_s"],
                                   "watch_list_encode_s": t_w}
            for graphs in ((False, True) if device.type == "cuda" else (False,)):
                engine.cuda_graphs = graphs
                sync(device)
                start = time.perf_counter()
                engine.evaluate(batch)  # the first of its kind compiles; a graph is captured on the next call
                sync(device)
                first_s = time.perf_counter() - start
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                engine.evaluate(batch)
                held = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else 0
                t_eval = best_time(lambda: engine.evaluate(batch), device, repeats)
                t_matched = best_time(lambda: engine.matched(batch), device, repeats)
                key = "graph" if graphs else "direct"
                out[key] = {"first_call_s": first_s, "eval_s": t_eval, "matched_s": t_matched,
                            "share": (t_w + t_eval) / row["stopped_forward_s"],
                            "decision_share": (t_w + t_matched) / row["stopped_forward_s"],
                            "graph_memory_mib": held / 2**20 if graphs else None}
            out["failed"] = engine._program_failed
            rows.append(out)
    engine.compile_program, engine.cuda_graphs, engine.graph_max_tokens = False, True, None
    return rows


def with_steer_rules(engine: PolicyEngine, n: int, feature: str) -> PolicyEngine:
    """``engine``'s policy with a clamp of ``feature`` added to the first ``n`` rules' actions."""
    data = engine.policy.model_dump(mode="json", by_alias=True, exclude_none=True)
    for rule in data["rules"][:n]:
        rule["actions"] = [*rule["actions"], {"steer": {"feature": feature, "mode": "clamp", "value": 0.0}}]
    policy = Policy.model_validate(data)
    return PolicyEngine(policy, engine.library, compile_policy(policy, engine.library, base_dir=".", path="<gpu-bench>"))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model and small SAEs, for a CPU smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--widths", default="65536,131072")
    ap.add_argument("--layer", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--gen-batches", default="1,16")
    ap.add_argument("--gen-prompt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers as `auditor serve --compile` "
                    "does (slower start)")
    ap.add_argument("--steer-rules", default="0,10", help="comma list: rules of the random policy given a steer "
                    "action, one serve-mode run each (0: one requested clamp, the policy watching and giving its "
                    "verdict at the end; N: also N rules evaluated every --policy-every tokens; 100 = all)")
    ap.add_argument("--encode-variants", action="store_true", help="also time ways of computing the full-width "
                    "encode (matmul+add+relu, addmm+relu_, fused addmm activation, two-stage top-k, fp8 on CUDA)")
    ap.add_argument("--policy-every", type=int, default=1)
    ap.add_argument("--graph-policy-steps", action=argparse.BooleanOptionalAction, default=True,
                    help="let the steering hook's CUDA graph also cover steps that decide steering rules "
                    "(SteeringHook.graph_policy_steps, the default)")
    ap.add_argument("--serve-eager", action="store_true", help="also time each serve configuration with the steering "
                    "hook's decode step run eagerly (no CUDA graph), in the same alternating runs")
    ap.add_argument("--gen-repeats", type=int, default=5, help="timed runs of each generation configuration (median)")
    ap.add_argument("--lockstep", type=int, default=0, metavar="N", help="also run each serve configuration N times "
                    "(after one warm-up) in lockstep with plain decoding: the two generations advance one step at a "
                    "time in turns, each step timed alone (see lockstep_decode)")
    ap.add_argument("--streams", type=int, default=16, help="streams fed together in the streaming case (0: skip it)")
    ap.add_argument("--stream-chunk", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=256, help="completion tokens per stream (after a 49-token prompt)")
    ap.add_argument("--compile-policy", action="store_true", help="also time the policy evaluation with its tensor "
                    "program compiled (PolicyEngine.compile_program, what `auditor serve --compile` sets on a GPU), "
                    "eagerly and as CUDA graphs (up to the largest batch), at every --batch-sizes size, at the widest SAE")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="after the timings, profile one plain and one serve-mode (first --steer-rules entry) "
                         "generation at the largest --gen-batches size and write the op tables to DIR")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    SteeringHook.graph_policy_steps = args.graph_policy_steps
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if args.tiny else LLAMA_31_8B
    layer = min(args.layer, cfg["num_hidden_layers"] - 2) if args.tiny else args.layer
    widths = [4608, 8192] if args.tiny else [int(w) for w in args.widths.split(",")]
    seq = min(args.seq, 64) if args.tiny else args.seq
    gen_tokens = min(args.gen_tokens, 8) if args.tiny else args.gen_tokens
    hook = f"blocks.{layer}.hook_resid_post"
    t_start = time.perf_counter()
    model = build_model(cfg, device, dtype)
    if args.compile:
        # The product's option (`auditor serve --compile`): attention and MLP of every layer, hooks eager.
        adapter = get_adapter(model)
        compile_layers(LoadedModel(model=model, tokenizer=None, name="llama-3.1-8b-shaped", adapter=adapter,
                                   d_model=adapter.d_model(model), n_layers=adapter.n_layers(model), device=device))
    build_s = time.perf_counter() - t_start
    d = cfg["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(0)

    audit_rows = []
    acts_by_bs: dict[int, torch.Tensor] = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        ids = torch.randint(0, cfg["vocab_size"], (bs, seq), generator=gen, device=device)
        mask = torch.ones_like(ids)

        def full(ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> None:
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, use_cache=False)

        def stopped(ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> None:
            capture(model, ids, mask, [hook], stop_early=True)

        t_full = best_time(full, device, args.repeats)
        t_stop = best_time(stopped, device, args.repeats)
        acts_by_bs[bs] = capture(model, ids, mask, [hook], stop_early=True)[hook]
        audit_rows.append(
            {"batch_size": bs, "tokens": bs * seq, "full_forward_s": t_full, "stopped_forward_s": t_stop,
             "full_tok_s": bs * seq / t_full, "stopped_tok_s": bs * seq / t_stop, "stopped_vs_full": t_full / t_stop}
        )

    # Encode and policy cost, at the largest batch size, as a share of that batch's stopped forward.
    big = max(acts_by_bs)
    x = acts_by_bs[big].reshape(-1, d)  # [N, d]
    t_stop_big = next(r["stopped_forward_s"] for r in audit_rows if r["batch_size"] == big)
    encode_rows = []
    engine: PolicyEngine | None = None
    saes: dict[int, SAE] = {}
    for width in widths:
        sae = random_sae(d, width, hook, device, dtype)
        saes[width] = sae
        engine = engine or random_engine(width, device)
        watched = engine.watched.to(device)
        topk = random_sae(d, width, hook, device, dtype, arch="topk", weights=dict(sae.state_dict()))
        with torch.inference_mode():
            t_watch = best_time(lambda: sae.encode(x, features=watched), device, args.repeats)
            t_full_enc = best_time(lambda: sae.encode(x), device, args.repeats)
            t_topk = best_time(lambda topk=topk: topk.encode(x), device, args.repeats)
            # The same ranking with the codes kept sparse (indices + values, k a row) and as the
            # audit runs it (encode_watched: the codes at the watched latents, no [N, d_sae] tensor).
            t_topk_codes = best_time(lambda topk=topk: topk.encode_topk(x), device, args.repeats)
            t_topk_watched = best_time(lambda topk=topk: topk.encode_watched(x, watched), device, args.repeats)
            f = sae.encode(x, features=watched).float().reshape(big, seq, -1)
        m = torch.ones((big, seq), dtype=torch.bool, device=device)
        comp = torch.zeros_like(m)
        comp[:, seq // 2 :] = True
        t_eval = best_time(lambda: engine.evaluate(AuditBatch(f, m, comp)), device, args.repeats)
        t_matched = best_time(lambda: engine.matched(AuditBatch(f, m, comp)), device, args.repeats)
        # The host side of a verdict alone: the rules' tensors computed and copied once, then only
        # the Python that builds the verdict objects (what evaluate adds to matched, past the copy).
        t_verdicts = min(verdict_build_times(engine, AuditBatch(f, m, comp), args.repeats))
        if args.profile is not None and width == max(widths):
            profile_policy(engine, AuditBatch(f, m, comp), device, args.profile)
        variants = encode_variants(x, sae, 64, device, args.repeats) if args.encode_variants else {}
        del topk
        small = []
        if width == max(widths):
            # Smaller batches (the first texts' features), where launching the evaluation's kernels
            # weighs most: watch-list encode + evaluation, eagerly and replayed as a CUDA graph.
            for row in audit_rows:
                bs = row["batch_size"]
                if bs == big or bs * seq > engine._graphs.max_tokens:
                    continue
                xs, batch = x[: bs * seq], AuditBatch(f[:bs].contiguous(), m[:bs], comp[:bs])
                with torch.inference_mode():
                    t_w = best_time(lambda: sae.encode(xs, features=watched), device, args.repeats)
                times = {}
                for graphs in (False, True):
                    engine.cuda_graphs = graphs
                    engine.evaluate(batch)  # seen once: a graph is captured on the next call
                    times[graphs] = best_time(lambda: engine.evaluate(batch), device, args.repeats)
                t_s = row["stopped_forward_s"]
                small.append({"batch_size": bs, "tokens": bs * seq, "stopped_forward_s": t_s, "watch_list_encode_s": t_w,
                              "policy_eval_eager_s": times[False], "policy_eval_graph_s": times[True],
                              "eager_share": (t_w + times[False]) / t_s, "graph_share": (t_w + times[True]) / t_s})
            engine.cuda_graphs = True
        programs = policy_programs(engine, f, m, comp, x, sae, watched, audit_rows, device, args.repeats) if (
            args.compile_policy and width == max(widths)) else []
        encode_rows.append(
            {"d_sae": width, "tokens": x.shape[0], "watched": int(watched.numel()),
             "watch_list_encode_s": t_watch, "full_encode_relu_s": t_full_enc, "full_encode_topk_s": t_topk,
             "full_encode_topk_codes_s": t_topk_codes, "topk_watched_encode_s": t_topk_watched,
             "policy_eval_s": t_eval, "policy_matched_only_s": t_matched, "policy_verdict_objects_s": t_verdicts,
             "stopped_forward_s": t_stop_big,
             "watch_plus_eval_share": (t_watch + t_eval) / t_stop_big,
             "full_relu_share": t_full_enc / t_stop_big, "full_topk_share": t_topk / t_stop_big,
             "topk_codes_share": t_topk_codes / t_stop_big, "topk_watched_share": t_topk_watched / t_stop_big,
             "variants_s": variants, "smaller_batches": small, "programs": programs}
        )

    gen_rows = []
    assert engine is not None  # widths is never empty
    sae = saes[max(saes)]
    clamp_feature = engine.library.name_for_index(int(engine.watched[0]))
    clamp = ResolvedIntervention(int(engine.watched[0]), "clamp", 0.0, "all", clamp_feature)
    # "N" or "N/E": N steering rules evaluated every E tokens (E defaults to --policy-every).
    configs = [(int(c.split("/")[0]), int(c.split("/")[1]) if "/" in c else args.policy_every)
               for c in str(args.steer_rules).split(",")]
    graphs = (True, False) if args.serve_eager else (True,)
    serves = {(n, e, g): {"sae": sae, "clamp": clamp, "engine": with_steer_rules(engine, n, clamp_feature), "hook": hook,
                          "policy_every": e, "cuda_graph": g} for n, e in configs for g in graphs}
    for gb in [int(b) for b in args.gen_batches.split(",")]:
        prompt = torch.randint(0, cfg["vocab_size"], (gb, args.gen_prompt), generator=gen, device=device)
        for conf in serves.values():
            conf["hook_host_s"] = []
            conf["capture_s"] = []
        # Plain and every serve configuration take turns, so drift on the machine hits them alike;
        # each is the median of its runs after one warm-up.
        runs: dict[Any, list[float]] = {None: [], **{key: [] for key in serves}}
        verdict: dict[Any, list[float]] = {key: [] for key in serves}
        for rep in range(args.gen_repeats + 1):
            # Alternate the order too: whatever runs first after a switch (allocator, clocks) is
            # not always the same configuration.
            for key in (list(runs) if rep % 2 else list(runs)[::-1]):
                sync(device)
                t0 = time.perf_counter()
                t_v = decode_loop(model, prompt, gen_tokens, serves[key] if key is not None else None)
                sync(device)
                if rep:
                    runs[key].append(time.perf_counter() - t0)
                    if key is not None:
                        verdict[key].append(t_v)
        t_plain = statistics.median(runs[None])
        for (n, e, g) in serves:
            t_serve = statistics.median(runs[(n, e, g)])
            t_verdict = statistics.median(verdict[(n, e, g)])
            gen_rows.append(
                {"batch_size": gb, "steer_rules": n, "policy_every": e, "new_tokens": gen_tokens,
                 "cuda_graph": g, "graph_steps": serves[(n, e, g)].get("graph_steps", 0),
                 # The hook's host time per decode step (median over all its runs) against a plain step.
                 "hook_host_ms_per_step": 1000 * statistics.median(serves[(n, e, g)].get("hook_host_s", [0.0])),
                 # Each generation captures its graphs anew (warm-up steps included): host ms per generation.
                 "graph_captures": serves[(n, e, g)].get("captures", 0),
                 "graph_capture_ms": 1000 * statistics.median(serves[(n, e, g)].get("capture_s", [0.0])),
                 "plain_step_ms": 1000 * t_plain / gen_tokens,
                 "plain_tok_s": gb * gen_tokens / t_plain, "serve_tok_s": gb * gen_tokens / t_serve,
                 "serve_vs_plain": t_plain / t_serve, "final_verdict_s": t_verdict,
                 # Each repeat's plain and serve runs ran back to back: the median of their ratios.
                 "serve_vs_plain_paired": statistics.median(p / q for p, q in zip(runs[None], runs[(n, e, g)])),
                 # Interference on the host only ever adds time: the fastest run of each.
                 "serve_vs_plain_best": min(runs[None]) / min(runs[(n, e, g)]),
                 "decoding_vs_plain": t_plain / (t_serve - t_verdict), "runs": args.gen_repeats,
                 # Every timed run in order (plain and serve of one repeat ran back to back).
                 "plain_runs_s": runs[None], "serve_runs_s": runs[(n, e, g)]}
            )
        if args.lockstep:
            # The same configurations again, plain and serve decoding in turns step by step.
            for (n, e, g), conf in serves.items():
                lock = [lockstep_decode(model, prompt, gen_tokens, conf) for _ in range(args.lockstep + 1)][1:]
                row = next(r for r in gen_rows if (r["batch_size"], r["steer_rules"], r["policy_every"], r["cuda_graph"]) == (gb, n, e, g))
                row["lockstep"] = lockstep_summary(lock)

    stream_row = None
    if args.streams:
        stream_tokens = min(args.stream_tokens, 32) if args.tiny else args.stream_tokens
        stream_row = streaming(model, hook, cfg["vocab_size"], device, args.streams, 49, stream_tokens, args.stream_chunk,
                               args.repeats, gen)

    if args.profile is not None:
        profile_generation(model, serves[(*configs[0], True)], cfg, max(int(b) for b in args.gen_batches.split(",")),
                           args.gen_prompt, gen_tokens, device, args.profile)

    result = {
        "benchmark": "gpu_llama8b",
        "tiny": args.tiny,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "compile": args.compile,
        "graph_policy_steps": args.graph_policy_steps,
        "hookpoint": hook,
        "seq": seq,
        "build_s": build_s,
        "audit": audit_rows,
        "encode": encode_rows,
        "generation": gen_rows,
        "steer_rules": [n for n, _ in configs],
        "streaming": stream_row,
        "gpu_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "total_s": time.perf_counter() - t_start,
    }
    print(json.dumps(result, indent=2))
    print()
    for r in audit_rows:
        print(f"audit batch {r['batch_size']:>3}: full {r['full_tok_s']:.0f} tok/s, stopped {r['stopped_tok_s']:.0f} tok/s, "
              f"ratio {r['stopped_vs_full']:.2f}x")
    for r in encode_rows:
        print(f"SAE {r['d_sae']:>6}: watch-list + policy {100 * r['watch_plus_eval_share']:.2f}% of stopped forward "
              f"(goal <= 1%; the rules' decision alone, no verdicts: "
              f"{100 * (r['watch_list_encode_s'] + r['policy_matched_only_s']) / r['stopped_forward_s']:.2f}%; building the verdict "
              f"objects {100 * r['policy_verdict_objects_s'] / r['stopped_forward_s']:.2f}%), full ReLU {100 * r['full_relu_share']:.2f}%, full TopK {100 * r['full_topk_share']:.2f}% "
              f"(goal <= 10%; TopK as sparse codes {100 * r['topk_codes_share']:.2f}%, as the audit's watch-list encode "
              f"{100 * r['topk_watched_share']:.2f}%)")
        for q in r["smaller_batches"]:
            print(f"SAE {r['d_sae']:>6}, batch {q['batch_size']} x {seq}: watch-list + policy {100 * q['eager_share']:.2f}% eagerly "
                  f"({1000 * q['policy_eval_eager_s']:.2f} ms), {100 * q['graph_share']:.2f}% "
                  f"{'as a CUDA graph' if device.type == 'cuda' else 'again (the CPU has no graphs)'} "
                  f"({1000 * q['policy_eval_graph_s']:.2f} ms) of the stopped forward ({1000 * q['stopped_forward_s']:.1f} ms)")
    for r in encode_rows:
        for q in r.get("programs", []):
            for key in ("direct", "graph"):
                if key in q:
                    v = q[key]
                    print(f"SAE {r['d_sae']:>6}, batch {q['batch_size']:>2} x {seq}, program {'compiled' if q['compiled'] else 'eager'}"
                          f"{' (compile failed)' if q['failed'] else ''}, {'CUDA graph' if key == 'graph' else 'run directly'}: "
                          f"watch-list + policy {100 * v['share']:.2f}% ({1000 * v['eval_s']:.2f} ms), decision alone "
                          f"{100 * v['decision_share']:.2f}% ({1000 * v['matched_s']:.2f} ms); first call {v['first_call_s']:.1f} s"
                          + (f", graph memory {v['graph_memory_mib']:.0f} MiB" if v["graph_memory_mib"] is not None else ""))
    for r in gen_rows:
        print(f"generation batch {r['batch_size']:>2}, {r['steer_rules']:>3} steering rules every {r['policy_every']} "
              f"token(s), hook {'graph' if r['cuda_graph'] else 'eager'} ({r['graph_steps']} graph steps): plain {r['plain_tok_s']:.1f} "
              f"tok/s, serve {r['serve_tok_s']:.1f} tok/s, ratio {r['serve_vs_plain']:.3f} (median of paired runs "
              f"{r['serve_vs_plain_paired']:.3f}; fastest runs {r['serve_vs_plain_best']:.3f}; hook host time {r['hook_host_ms_per_step']:.3f} ms a step of "
              f"{r['plain_step_ms']:.2f} ms; {r['graph_captures']} graph capture(s) {r['graph_capture_ms']:.1f} ms; the final verdict "
              f"{1000 * r['final_verdict_s']:.1f} ms; decoding alone {r['decoding_vs_plain']:.3f})")
    for r in gen_rows:
        if "lockstep" in r:
            print(lockstep_line(r))
    if stream_row is not None and stream_row["supported"]:
        for name, label in (("one", "one stream"), ("many", f"{stream_row['streams']} streams fed together")):
            r = stream_row[name]
            print(f"streaming, {label}, {stream_row['chunks']} chunks of {stream_row['chunk']} tokens: "
                  f"{1000 * r['chunked_s']:.1f} ms vs {1000 * r['whole_s']:.1f} ms for the whole sequence(s), "
                  f"{r['chunked_vs_whole']:.2f}x (goal <= 1.5x; forwards only)")
    elif stream_row is not None:
        print("streaming: streamed forwards are off for this model (compiled layers, or attention they do not cover)")
    for r in encode_rows:
        if r["variants_s"]:
            print(f"SAE {r['d_sae']:>6} full-encode variants: " + json.dumps(r["variants_s"]))
    return result


if __name__ == "__main__":
    main()
