"""The sweep that chose a real model's editing settings (``fedke/editing/hparams/<model>.json``).

    python bench/hparams_sweep.py --model smollm2 --edits 30 --out hparams_smollm2.json [--quick]

On ``--edits`` facts the model holds (the real-fact set, seeded), Global-Edit with MEMIT for every
combination of: the fact token (``subject_last`` / ``last``), the target optimisation (``reference``:
5 context prefixes, 25 steps, MEMIT's published settings; ``lean``: no prefixes, 15 steps), and
lam over ``--lams``. The targets of one (fact token, targets) pair are optimised once and reused for
every lam (they do not depend on lam). Writes ``{"runs": [{"fact_token", "targets", "lam", ES PS NS
Score EA PA NA AccScore, "target_seconds"}], "best": {...}, "config"}``; ``best`` is the run with the
highest Score (ties: AccScore), which is what the settings file should hold.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import METRICS, peak_rss_mb, print_table, write_json  # noqa: E402

TARGET_SETTINGS = {
    "reference": {"n_context": 5, "v_num_grad_steps": 25},
    "lean": {"n_context": 0, "v_num_grad_steps": 15},
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a packaged model name or a local model path")
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--lams", type=float, nargs="+", default=[300.0, 1000.0, 3000.0, 10000.0, 30000.0])
    parser.add_argument("--fact-tokens", nargs="+", default=["subject_last", "last"])
    parser.add_argument("--targets", nargs="+", default=list(TARGET_SETTINGS), choices=list(TARGET_SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir")
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="tiny world model, 6 edits, two lams (a smoke run)")
    args = parser.parse_args(argv)

    from fedke.editing.memit import MemitEditor
    from fedke.editing.weights import applied_update
    from fedke.eval import evaluate_cases

    bed = load_bed(args)
    cases = bed.facts.edit_cases(args.edits, seed=args.seed)
    requests = [case.request for case in cases]
    runs = []
    for fact_token in args.fact_tokens:
        for name in args.targets:
            config = replace(bed.memit_config, fact_token=fact_token, **TARGET_SETTINGS[name])
            editor = MemitEditor(bed.model, bed.tokenizer, bed.covariances, config)
            started = time.perf_counter()
            targets = editor.compute_targets(requests)
            target_seconds = time.perf_counter() - started
            print(f"{fact_token} / {name}: targets of {len(requests)} requests in {target_seconds:.1f} s", flush=True)
            for lam in args.lams:
                lam_editor = MemitEditor(bed.model, bed.tokenizer, bed.covariances, replace(config, lam=lam))
                payload = lam_editor.edit(requests, targets=targets)
                with applied_update(bed.model, payload.deltas()):
                    metrics = evaluate_cases(bed.model, bed.tokenizer, cases).summary
                runs.append({"fact_token": fact_token, "targets": name, "lam": lam,
                             **{m: metrics[m] for m in METRICS}, "target_seconds": target_seconds})
    print_table(runs, ["fact_token", "targets", "lam", *METRICS, "target_seconds"],
                f"Editing settings on {args.model}: Global-Edit of {len(cases)} held facts")
    best = max(runs, key=lambda r: (r["Score"], r["AccScore"]))
    print(f"\nbest: {best['fact_token']} / {best['targets']} / lam {best['lam']:g} (Score {best['Score']:.1f}, "
          f"AccScore {best['AccScore']:.1f})")
    result = {"runs": runs, "best": best, "peak_rss_mb": peak_rss_mb(),
              "config": {"model": args.model, "edits": len(cases), "seed": args.seed,
                         "layers": list(bed.memit_config.layers), "target_settings": TARGET_SETTINGS,
                         "covariance": bed.info.get("covariance_text"), "tokens": bed.info.get("covariance_tokens")}}
    write_json(args.out, result)
    return result


def load_bed(args):
    """The testbed a sweep runs on: the real model (or, with ``--quick``, the tiny world)."""
    if args.quick:
        from fedke.data.world import WorldConfig
        from fedke.testbed import load_testbed
        from fedke.worldmodel import WorldModelConfig

        args.edits, args.lams = min(args.edits, 6), args.lams[:2]
        return load_testbed(WorldConfig(n_subjects=120, n_relations=3), WorldModelConfig(n_layer=3, n_embd=64, n_head=2),
                            cache_dir=args.cache_dir, progress=False)
    from fedke.testbed import load_real_testbed

    return load_real_testbed(args.model, cache_dir=args.cache_dir, progress=True)


if __name__ == "__main__":
    main()
