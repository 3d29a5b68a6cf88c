"""The measured effect (issue 4): loop sessions judged by a measured preference ("dark, subdued
images" = darkness) collect trajectories; sft / dpo / ddpo LoRAs trained on their exports are
scored against the base on held-out prompts and seeds, with no loop. Prints, side by side: the
loop's mean gain, each LoRA's mean change, and that change as a share of the loop gain, for each
training seed, then the study's checks on each seed's figures (effect_study.check: the loop
darkens, sft carries half its gain, dpo and ddpo move toward darker beyond noise; they were
tests/test_effect.py's assertions): exit status 1 if one fails. The study is bench/effect_study.py.

    .venv/bin/python bench/measured_effect.py [--sessions 8] [--seeds 0 1 2] [--agents scripted]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from effect_study import EffectStudy, check, run_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (runs)")
    ap.add_argument("--agents", choices=["scripted", "tiny-vlm"], default="scripted")
    ap.add_argument("--model", default="tiny-sd-fit", help="SD-family diffusion model")
    ap.add_argument("--out", type=Path, default=Path("bench/results/measured_effect.json"))
    args = ap.parse_args()
    runs = []
    for seed in args.seeds:
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="artloop-effect-"))
        study = EffectStudy(
            work_dir=work, model=args.model, agents=args.agents, sessions=args.sessions, seed=seed
        )
        figures = {"seed": seed, **run_study(study), "seconds": time.perf_counter() - started}
        runs.append(figures)
        print(
            f"seed {seed}: loop mean gain (darkness) {figures['loop_mean_gain']:+.4f} over "
            f"{args.sessions} sessions; base held-out mean {figures['base_mean']:.4f}"
        )
        for k in study.trainers:
            f = figures[k]
            print(
                f"  {k:5s}: mean change {f['mean_change']:+.4f} (std {f['std_change']:.4f}, "
                f"{f['cells']} held-out cells) = {f['share_of_loop_gain']:.2f} x loop gain"
            )
        figures["checks"] = [
            {"claim": c, "holds": ok, "seen": seen} for c, ok, seen in check(figures)
        ]
        for c in figures["checks"]:
            print(f"  {'ok  ' if c['holds'] else 'FAIL'} {c['claim']}: {c['seen']}")
        print(f"  ({figures['seconds']:.0f} s; work dir {work})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2))
    print(f"written {args.out}")
    failed = [
        f"seed {r['seed']}: {c['claim']}" for r in runs for c in r["checks"] if not c["holds"]
    ]
    if failed:
        sys.exit("checks failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
