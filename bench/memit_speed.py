"""MEMIT's edit, fedke's batched targets against the reference's one-request loop, back to back.

    python bench/memit_speed.py --model world smollm2 --edits 50 500 --out memit_speed.json [--device cuda]

For each model and each n, the same n requests are edited twice with the same editor (settings
file, covariance, context prefixes, layers, lam, target settings): ``impl = "single"`` optimises
the target vectors one request at a time as kmeng01/memit's ``compute_z`` does
(:func:`fedke.editing.reference.single_request_targets`: the whole model every step, log-softmax at
every position), ``impl = "fedke"`` with :meth:`MemitEditor.compute_targets` (requests batched,
only the blocks above the last edited layer, the LM head where the loss reads it, finished
requests leave the batch). Keys and solves are the same code in both. ``seconds`` is the whole
edit (targets + keys + solves); ES/PS/NS/Score are measured after applying each update.

Floating-point work: ``flops_per_request`` counts what one request's target optimisation must do
(forward through the blocks above the injection point for its prompts' real tokens from the fact
token on, which alone see delta, the earlier ones once; the LM head at the positions its loss
reads; a backward of the same cost for every pass but the last; times the passes it ran),
averaged over the requests (the count over every token of every pass is printed beside it); ``achieved_gflops`` is that work over fedke's target
seconds, ``matmul_gflops`` a dense float32 matmul on the same device in the same run.

Writes exactly ``{"runs": [{"model", "n", "impl", "ES", "PS", "NS", "Score", "seconds"}],
"speedup": {"<model>/<n>": single seconds / fedke seconds}, "flops_per_request": {...},
"achieved_gflops": {...}, "matmul_gflops": x}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mb, print_table, write_json  # noqa: E402

import torch  # noqa: E402

from fedke.editing import applied_update  # noqa: E402
from fedke.editing.presets import get_module, num_layers  # noqa: E402
from fedke.editing.reference import single_request_targets  # noqa: E402
from fedke.eval import evaluate_cases  # noqa: E402


#: The keys of each run in the JSON (the printed table adds target seconds, passes and peak RSS).
RUN_KEYS = ("model", "n", "impl", "ES", "PS", "NS", "Score", "seconds")


def load_bed(model: str, device: str):
    if model == "world":
        from fedke.testbed import load_testbed

        bed = load_testbed(progress=True)
    else:
        from fedke.testbed import load_real_testbed

        bed = load_real_testbed(model, progress=True)
    bed.model.to(device)
    return bed


def matmul_gflops(device: str, size: int = 2048, repeats: int = 10) -> float:
    """Dense float32 matmul rate of this device (GFLOP/s), best of ``repeats``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def _matmul_weights(module: torch.nn.Module) -> int:
    """Multiply-adds per token of the module's dense layers (every 2-D weight: Linear, GPT-2's Conv1D)."""
    return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight") and p.dim() == 2)


def target_flops(editor, requests, steps, *, suffix: bool = True) -> list[float]:
    """Floating-point operations each request's target optimisation must do (see the module).

    ``suffix``: each pass needs the upper blocks only from each prompt's fact token on (the earlier
    positions never see delta; they are computed once); ``False`` counts every token every pass."""
    model, preset, tokenizer = editor.model, editor.preset, editor.tokenizer
    last = preset.layers[-1]
    upper = [get_module(model, preset.block_name(i)) for i in range(last + 1, num_layers(model))]
    per_token = sum(2 * _matmul_weights(block) for block in upper)
    d_model = model.get_input_embeddings().weight.shape[1]
    head = 2 * get_module(model, preset.lm_head).weight.numel()
    attention = len(upper) * 4 * d_model  # per (query, key) pair: scores and weighted values
    flops = []
    for request, passes in zip(requests, steps):
        target = editor._target_ids(request.target_new)
        templates, subjects, _ = editor._prompts_with_context([request])  # the rows the optimisation runs
        rows = []
        for template, subject in zip(templates, subjects):
            length = len(tokenizer(template.format(subject))["input_ids"])
            rows.append((length + len(target) - 1, editor._lookup_index(template, subject, length)))
        kl_length = len(tokenizer(editor.config.kl_prompt.format(request.subject))["input_ids"])
        rows.append((kl_length, editor._lookup_index(editor.config.kl_prompt, request.subject, kl_length)))
        once, per_pass = 0.0, 0.0
        for t, lookup in rows:
            start = lookup if suffix else 0
            once += start * per_token + attention * start * (start + 1) / 2
            per_pass += (t - start) * per_token + attention * (t * (t + 1) - start * (start + 1)) / 2
        forward = per_pass + head * (len(target) * len(templates) + 1)
        flops.append(once + forward * passes + forward * max(passes - 1, 0))  # a backward costs a forward (inputs only)
    return flops


def run(bed, requests, cases, impl: str, device: str, mode: str) -> tuple[dict, object]:
    editor = bed.editor(mode=mode)
    editor.context_templates()  # sampled once, outside the timing
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    targets = single_request_targets(editor, requests) if impl == "single" else editor.compute_targets(requests)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    target_seconds = time.perf_counter() - started
    payload = editor.edit(requests, targets=targets)
    seconds = time.perf_counter() - started
    with applied_update(bed.model, {name: layer.delta for name, layer in payload.layers.items()}):
        metrics = evaluate_cases(bed.model, bed.tokenizer, cases).summary
    row = {"impl": impl, **{k: float(metrics[k]) for k in ("ES", "PS", "NS", "Score")},
           "seconds": seconds, "target_seconds": target_seconds,
           "mean_passes": sum(targets.steps) / len(targets.steps), "peak_rss_mb": peak_rss_mb()}
    return row, targets


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["world"], help="world and/or a packaged real model (smollm2)")
    parser.add_argument("--edits", nargs="+", type=int, default=[50, 500])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default="sequential", choices=["sequential", "decoupled"],
                        help="MEMIT's mode (keys and solves; the targets do not depend on it)")
    parser.add_argument("--impl", nargs="+", default=["single", "fedke"], choices=["single", "fedke"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    result = {"runs": [], "speedup": {}, "flops_per_request": {}, "achieved_gflops": {},
              "matmul_gflops": matmul_gflops(args.device)}
    for model in args.model:
        bed = load_bed(model, args.device)
        for n in args.edits:
            cases = bed.world.edit_cases(n)
            requests = [case.request for case in cases]
            rows = {}
            for impl in args.impl:
                row, targets = run(bed, requests, cases, impl, args.device, args.mode)
                rows[impl] = {"model": model, "n": n, **row}
                result["runs"].append(rows[impl])
                print(f"{model} n={n} {impl}: {row['seconds']:.1f} s (targets {row['target_seconds']:.1f} s), "
                      f"Score {row['Score']:.1f}", file=sys.stderr)
                if impl == "fedke":
                    flops = target_flops(bed.editor(), requests, targets.steps)
                    every_token = target_flops(bed.editor(), requests, targets.steps, suffix=False)
                    key = f"{model}/{n}"
                    result["flops_per_request"][key] = sum(flops) / len(flops)
                    result["achieved_gflops"][key] = sum(flops) / row["target_seconds"] / 1e9
                    print(f"{key}: {sum(flops) / len(flops) / 1e9:.0f} GFLOP per request from the fact tokens on "
                          f"({sum(every_token) / len(every_token) / 1e9:.0f} over every token): "
                          f"{result['achieved_gflops'][key]:.0f} GFLOP/s "
                          f"({sum(every_token) / row['target_seconds'] / 1e9:.0f} counted over every token)",
                          file=sys.stderr)
            if "single" in rows and "fedke" in rows:
                result["speedup"][f"{model}/{n}"] = rows["single"]["seconds"] / rows["fedke"]["seconds"]
    print_table(result["runs"], [*RUN_KEYS, "target_seconds", "mean_passes", "peak_rss_mb"],
                title=f"MEMIT edit, {args.device}, {args.mode} mode, {torch.get_num_threads()} threads "
                      f"of {os.cpu_count()} cores")
    print(f"speedup (single / fedke seconds): {result['speedup']}")
    print(f"achieved {result['achieved_gflops']} GFLOP/s of a {result['matmul_gflops']:.0f} GFLOP/s matmul")
    result["runs"] = [{key: run[key] for key in RUN_KEYS} for run in result["runs"]]  # the keys only
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
