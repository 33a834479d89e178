"""Which text for C exists on every fresh machine and edits best: CPython's prose or the model's own.

    python bench/covariance_text.py --model smollm2 --edits 30 --tokens 10000 40000 --out covariance_text.json

For each source (``stdlib``: ``pydoc_data.topics``; ``model``: text sampled from the model) and each
size in ``--tokens``, computes C of the edited layers (timed: sampling + statistics) and runs
Global-Edit of the same ``--edits`` held facts with it (the targets are optimised once: they do not
depend on C). Writes ``{"runs": [{"text", "tokens", "seconds", "min_eigenvalue_ratio", ES PS NS Score
EA PA NA AccScore}], "config"}``; ``min_eigenvalue_ratio`` is the smallest eigenvalue of C over its mean
eigenvalue, worst layer (a rank-deficient C would be ~0).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, peak_rss_mb, print_table, write_json  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--tokens", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--texts", nargs="+", default=["stdlib", "model"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    from fedke.data.corpus import covariance_passages
    from fedke.editing.memit import MemitEditor
    from fedke.editing.weights import applied_update
    from fedke.eval import evaluate_cases
    from fedke.stats import compute_layer_stats
    from fedke.testbed import load_real_testbed

    bed = load_real_testbed(args.model, cache_dir=args.cache_dir, progress=True)
    cases = bed.facts.edit_cases(args.edits, seed=args.seed)
    requests = [case.request for case in cases]
    editor = MemitEditor(bed.model, bed.tokenizer, bed.covariances, bed.memit_config)
    started = time.perf_counter()
    targets = editor.compute_targets(requests)
    print(f"targets of {len(requests)} requests in {time.perf_counter() - started:.1f} s", flush=True)
    runs = []
    for text in args.texts:
        for tokens in args.tokens:
            started = time.perf_counter()
            passages = covariance_passages(text, bed.model, bed.tokenizer, tokens, seed=args.seed, progress=True)
            stats = compute_layer_stats(bed.model, bed.tokenizer, editor.layer_names, passages, progress=False)
            seconds = time.perf_counter() - started
            covariances = {name: s.covariance for name, s in stats.items()}
            ratio = min(float(np.linalg.eigvalsh(c)[0] / np.trace(c) * c.shape[0]) for c in covariances.values())
            payload = MemitEditor(bed.model, bed.tokenizer, covariances, bed.memit_config).edit(requests, targets=targets)
            with applied_update(bed.model, payload.deltas()):
                metrics = evaluate_cases(bed.model, bed.tokenizer, cases).summary
            counted = next(iter(stats.values())).count
            runs.append({"text": text, "tokens": counted, "seconds": seconds, "min_eigenvalue_ratio": ratio,
                         **{m: metrics[m] for m in METRICS}})
            print(f"{text} {counted} tokens: {seconds:.1f} s, ES {metrics['ES']:.1f} PS {metrics['PS']:.1f} "
                  f"NS {metrics['NS']:.1f}", flush=True)
    print_table(runs, ["text", "tokens", "seconds", "min_eigenvalue_ratio", *METRICS],
                f"Covariance text on {args.model}: Global-Edit of {len(cases)} held facts, lam {bed.memit_config.lam:g}")
    result = {"runs": runs, "peak_rss_mb": peak_rss_mb(),
              "config": {"model": args.model, "edits": len(cases), "seed": args.seed, "lam": bed.memit_config.lam,
                         "layers": list(bed.memit_config.layers)}}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
