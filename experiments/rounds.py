"""ArtAug's iterated enhancement (`artloop rounds ROUNDS.toml`): round after round, the loop
collects sessions on the base model with every earlier round's LoRA, the kept ones are exported
and a LoRA is trained on them, and base + the LoRAs so far is evaluated against the model of the
round before, with no loop, on held-out prompts and seeds, by scorers the loop does not see.

Each round is an experiment with a [train] table (spec.py, training.py), built from the ROUNDS
file (rounds_schema.py): its base is the ROUNDS base with `diffusion.lora` = the earlier rounds'
LoRAs (so the loop column collects with them, and the baseline column is the model before the
round), and its LoRA column is that base with the round's LoRA fused after them (the model after
the round). The experiment harness makes it resumable: finished sessions are skipped, an export
with its card is kept, a LoRA with its summary is kept, scores are cached; a round whose
round.json is written is not touched again. A changed setting is refused before anything runs
(each round's columns' hashes, as any experiment's).

    OUT/rounds.json, rounds.md   the rounds table (written after each round)
    OUT/round-N/                 round N: an experiment directory, the artloop home of its runs
        train/data/sft/          its export (the [filter] applied)
        train/base/              (rounds after the first) the base model with the earlier LoRAs
                                 fused in: what the round's LoRA is trained on (its denoiser; the
                                 other components are links to the base model's)
        train/loras/sft-seedS/   its LoRA and train_summary.json
        train/train.json         what its stages did (sessions, rows, LoRA)
        eval.json, eval.md       base + LoRAs after the round vs before it, per scorer
        round.json               the round's summary, written last: the round is done

Training: round N's LoRA learns on the model that collected round N (the base with the earlier
LoRAs fused in, in order, as the diffusion tool fuses them), so that fused after them at
inference it adds what the round's sessions taught. With differential training (`artloop train
sft --differential`, used when the installed trainer has it, unless the file says otherwise) a
first LoRA learns what that model drew (the sessions' originals) and is fused in while the
round's LoRA learns the enhanced images on top; only the second is kept in the stack.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artloop.config import ArtloopConfig, lora_entries
from artloop.experiments.results import collect
from artloop.experiments.rounds_schema import RoundsFile
from artloop.experiments.runner import (
    Progress,
    check_drift,
    contexts,
    prepare,
    run_column,
    score_cells,
    store_of,
    trained,
)
from artloop.experiments.schema import BASELINE, ExperimentFile, Train
from artloop.experiments.spec import (
    Experiment,
    ExperimentError,
    _deep_merge,
    parse_file,
    read_toml,
    record_hash,
    resolve_experiment,
)
from artloop.experiments.stats import mean_ci, paired
from artloop.experiments.training import _finished, run_stages
from artloop.rewards import reward_entry
from artloop.tools.diffusion import DiffusionTool
from artloop.tools.images import ImageStore, atomic_write
from artloop.tools.lora import LORA_FILE, sha256
from artloop.trainers.sft import SFTConfig

LOOP = "loop"  # the collecting column of each round's experiment
ROUND = "round.json"  # a round's summary: written last, so its presence means the round is done
TABLE = "rounds"  # OUT/rounds.json and OUT/rounds.md
FUSED = "artloop_fused.json"  # in a fused base: what it is (the base model, the LoRAs fused)
# Set by the rounds themselves, not the file's [train.sft].
OWN_FIELDS = ("data", "output_dir", "model", "seed", "resume", "differential", "preset_lora")
Log = Callable[[str], None]


def differential_supported() -> bool:
    """Whether the installed `artloop train sft` has ArtAug's differential training."""
    return "differential" in {f.name for f in dataclasses.fields(SFTConfig)}


@dataclass
class Rounds:
    """A ROUNDS file resolved: every round's experiment (round N's base draws with rounds
    1..N-1's LoRAs, at the paths they will be trained to), checked before anything runs."""

    path: Path
    directory: Path
    spec: RoundsFile
    differential: bool
    experiments: list[Experiment]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def column(self) -> str:
        """Each round's LoRA column (the model after the round)."""
        return f"sft-seed{self.spec.train.seed}"

    def round_dir(self, n: int) -> Path:
        return self.directory / f"round-{n}"

    def lora(self, n: int) -> Path:
        """Round n's LoRA directory (1-based)."""
        return self.round_dir(n) / "train" / "loras" / self.column

    def experiment(self, n: int) -> Experiment:
        return self.experiments[n - 1]


def _sft_options(spec: RoundsFile, differential: bool) -> dict[str, Any]:
    options = dict(spec.train.sft)
    if taken := [k for k in OWN_FIELDS if k in options]:
        raise ExperimentError(f"train.sft.{taken[0]}: set by the rounds, not the file")
    if isinstance(options.get("learning_rate"), list):
        raise ExperimentError("train.sft.learning_rate: one rate (each round trains one LoRA)")
    if differential:
        options["differential"] = True
    return options


def _lora_list(given: Any) -> list[Any]:
    """A diffusion.lora setting (a path, {path, scale} or a list) as a list."""
    if not given:
        return []
    return list(given) if isinstance(given, list) else [given]


def round_file(
    spec: RoundsFile, base: dict[str, Any], options: dict[str, Any], n: int, earlier: list[Path]
) -> ExperimentFile:
    """Round n's experiment: the loop (collecting) on base + the earlier rounds' LoRAs, the
    baseline (that model, no loop: before the round) and the [train] LoRA column (after it)."""
    base = json.loads(json.dumps(base))  # a copy
    diffusion = base.setdefault("diffusion", {})
    stack = _lora_list(diffusion.get("lora"))  # a LoRA the file starts from comes first
    stack += [{"path": str(p), "scale": spec.train.scale} for p in earlier]
    if stack:
        diffusion["lora"] = stack
    return ExperimentFile(
        name=f"{spec.name}-round{n}",
        description=f"Round {n} of {spec.rounds} of {spec.name} (artloop rounds). "
        + spec.description,
        prompts=spec.eval.prompts,
        seeds=spec.eval.seeds,
        base=base,
        variants={LOOP: {}},
        baseline=True,
        scorers=spec.scorers,
        allow_judge_as_scorer=spec.allow_judge_as_scorer,
        concurrency=spec.concurrency,
        score_iterations=False,
        bootstrap=spec.bootstrap,
        train=Train(
            collect_from=LOOP,
            prompts=spec.collect.prompts,
            seeds=spec.collect.seeds,
            accepted_only=spec.filter.accepted_only,
            sft=options,
            training_seeds=[spec.train.seed],
            scale=spec.train.scale,
        ),
    )


def load_rounds(path: str | Path, home: Path, out: Path | None = None) -> Rounds:
    """Read and check a ROUNDS file: every round resolved as an experiment (its prompts found,
    its configs valid, its scorers none of the loop's judges, its trainer options valid). Its
    directory is `out`, else HOME/rounds/NAME; nothing is created here."""
    path = Path(path).expanduser()
    spec: RoundsFile = parse_file(path, RoundsFile, "rounds")
    supported = differential_supported()
    differential = supported if spec.train.differential == "auto" else spec.train.differential
    if differential and not supported:
        raise ExperimentError(
            "train.differential: the installed `artloop train sft` has no --differential; "
            'set differential = false (or "auto")'
        )
    options = _sft_options(spec, bool(differential))
    base: dict[str, Any] = {}
    if spec.base_config is not None:
        base = read_toml(path.parent / spec.base_config, "base_config")
    base = _deep_merge(base, spec.base)
    base.pop("home", None)  # each round's directory is its runs' home
    directory = (out if out is not None else home / "rounds" / spec.name).expanduser()
    found = Rounds(path, directory, spec, bool(differential), [])
    filters = {
        k: v for k in ("min_gain", "top_fraction") if (v := getattr(spec.filter, k)) is not None
    }
    for n in range(1, spec.rounds + 1):
        earlier = [found.lora(k) for k in range(1, n)]
        exp = resolve_experiment(
            round_file(spec, base, options, n, earlier), path, home, found.round_dir(n)
        )
        assert exp.train is not None and found.column in exp.train.loras
        exp.train.filters = filters
        if filters:  # what the LoRA learnt from: part of its column's hash (a change is refused)
            exp.records[found.column]["train"]["filters"] = filters
            exp.hashes[found.column] = record_hash(exp.records[found.column])
        if lora_entries(exp.configs[BASELINE].diffusion.lora):  # trained on base + them, fused
            exp.train.base_model = str(exp.train.directory / "base")
        found.experiments.append(exp)
    return found


def check_rounds(rounds: Rounds) -> None:
    """Every round's runs were made with what the file now gives (else one line naming the
    round's column and the change); nothing is touched."""
    for exp in rounds.experiments:
        check_drift(exp)


# --- the fused base -------------------------------------------------------------------------------
def fused_base(cfg: ArtloopConfig, out: Path, log: Log) -> Path:
    """The model `cfg` draws with (its diffusion.model with its LoRAs fused in, in order) as a
    diffusers model directory in `out`, for a trainer's `model`: the fused denoiser saved, the
    other components linked to the base model's. Made once (written beside, then renamed)."""
    if (out / FUSED).is_file():
        return out
    d = cfg.diffusion
    log(f"fusing {len(lora_entries(d.lora))} LoRA(s) into {d.model} -> {out}")
    scratch = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    tool = DiffusionTool(
        model=d.model,
        store=ImageStore(scratch / ".unused"),
        family=d.family,
        device=d.device,
        dtype=d.dtype,
        lora=d.lora.path if d.lora else None,
        lora_scale=d.lora.scale if d.lora else 1.0,
    )
    identity = tool.identity
    pipe = tool.pipeline
    denoiser = "transformer" if tool.family == "flux" else "unet"
    resolved = Path(identity["resolved"])
    for entry in resolved.iterdir():
        if entry.name != denoiser:
            (scratch / entry.name).symlink_to(entry.resolve())
    getattr(pipe, denoiser).save_pretrained(scratch / denoiser, safe_serialization=True)
    loras = identity["lora"] if isinstance(identity["lora"], list) else [identity["lora"]]
    record = {"model": d.model, "resolved": str(resolved), "denoiser": denoiser, "loras": loras}
    (scratch / FUSED).write_text(json.dumps(record, indent=1))
    shutil.rmtree(scratch / ".unused", ignore_errors=True)
    tool.unload()
    shutil.rmtree(out, ignore_errors=True)
    scratch.replace(out)
    return out


# --- a round -------------------------------------------------------------------------------------
def finished_round(exp: Experiment) -> dict[str, Any] | None:
    """A round's summary when it is done with the config it now resolves to; else None."""
    path = exp.directory / ROUND
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("hashes") == exp.hashes else None


def evaluation(exp: Experiment, after: str, loop: bool) -> dict[str, Any]:
    """Per scorer: before (the baseline column) and after (the LoRA column), each a mean with
    its 95% bootstrap interval, and after - before paired over the (prompt, seed) cells; with
    `loop`, the loop's mean and gain over before too."""
    data = collect(exp.directory)
    resamples = exp.spec.bootstrap
    out: dict[str, Any] = {}
    for scorer in exp.spec.scorers:
        columns = {"before": BASELINE, "after": after} | ({"loop": LOOP} if loop else {})
        cells = {key: data.column(name) for key, name in columns.items()}
        result: dict[str, Any] = {
            "higher_is_better": reward_entry(scorer).higher_is_better,
        }
        for key, column in cells.items():
            values = [c.scores[scorer] for c in column.values() if c.scores.get(scorer) is not None]
            result[key] = mean_ci(values, resamples)
        for key, name in (("change", "after"), ("loop_gain", "loop")):
            if name not in cells:
                continue
            pairs = [
                (c.scores[scorer], cells["before"][k].scores[scorer])
                for k, c in cells[name].items()
                if c.scores.get(scorer) is not None
                and k in cells["before"]
                and cells["before"][k].scores.get(scorer) is not None
            ]
            result[key] = paired([t for t, _ in pairs], [b for _, b in pairs], resamples)
        out[scorer] = result
    return out


async def run_round(
    rounds: Rounds,
    n: int,
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
    log: Log | None = None,
) -> dict[str, Any] | None:
    """Round n, each stage skipped where its outputs are on disk: its summary (also
    OUT/round-N/round.json), or None when `stop` was set first."""
    log = log or (lambda line: None)
    exp = rounds.experiment(n)
    plan = exp.train
    assert plan is not None
    if (done := finished_round(exp)) is not None:
        return done
    prepare(exp)
    lora = rounds.lora(n)
    if plan.base_model is not None and not trained(lora):
        fused_base(exp.configs[BASELINE], Path(plan.base_model), log)
    after, loop = rounds.column, rounds.spec.eval.loop
    columns = [BASELINE, after] + ([LOOP] if loop else [])
    ctxs = contexts({name: exp.configs[name] for name in dict.fromkeys([LOOP, *columns])})

    def progress(column: str, result: Any) -> None:
        if on_progress is not None:
            on_progress(f"round {n} {column}", result)

    record = await run_stages(exp, ctxs, stop=stop, on_progress=progress, log=log)
    if record is None:
        return None
    cells = [(p, s) for p in exp.prompts for s in exp.spec.seeds]
    for name in columns:
        cfg = exp.configs[name]
        await run_column(exp, ctxs[name], name, cfg, cells, stop=stop, on_progress=progress)
        if stop is not None and stop.is_set():
            return None
    for name in columns:  # every evaluation session finished (else: run again to retry)
        _finished(exp, store_of(exp), name, cells)
    log(f"round {n}: scoring ...")
    score_cells(exp, store_of(exp), {name: cells for name in columns})
    result = evaluation(exp, after, loop)
    summary_file = json.loads((lora / "train_summary.json").read_text())
    data = record["data"]["sft"]
    summary = {
        "round": n,
        "experiment": exp.name,
        "directory": str(exp.directory),
        "hashes": exp.hashes,
        "collect": record["collect"],
        "kept": data["runs"],
        "rows": data["rows"],
        "lora": {
            "path": str(lora),
            "sha256": sha256(lora / LORA_FILE),
            "differential": bool(summary_file.get("differential")),
            "trained_on": plan.base_model or exp.configs[BASELINE].diffusion.model,
            "steps": summary_file.get("steps"),
            "first_loss": summary_file.get("first_loss"),
            "last_loss": summary_file.get("last_loss"),
        },
        # the model after the round: the base with these LoRAs fused in this order
        "stack": [
            {"path": str(e.path), "scale": e.scale}
            for e in lora_entries(exp.configs[after].diffusion.lora)
        ],
        "cells": len(cells),
        "eval": result,
    }
    atomic_write(exp.directory / "eval.json", json.dumps(result, indent=1).encode())
    atomic_write(exp.directory / "eval.md", eval_markdown(summary).encode())
    atomic_write(exp.directory / ROUND, json.dumps(summary, indent=1).encode())
    return summary


async def run_rounds(
    rounds: Rounds,
    *,
    stop: threading.Event | None = None,
    stop_after: int | None = None,
    on_progress: Progress | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Every round in order (a done one read back, not run), the rounds table rewritten after
    each; stops after round `stop_after`, or when `stop` is set. The table (OUT/rounds.json)."""
    check_rounds(rounds)
    done: list[dict[str, Any]] = []
    ran = False
    for n in range(1, rounds.spec.rounds + 1):
        ran = finished_round(rounds.experiment(n)) is None
        summary = await run_round(rounds, n, stop=stop, on_progress=on_progress, log=log)
        if summary is None:
            break
        done.append(summary)
        if ran:  # as soon as a round is done; one read back changes nothing
            write_table(rounds, done)
        if stop_after is not None and n >= stop_after:
            break
    if ran or not (rounds.directory / f"{TABLE}.json").is_file():
        write_table(rounds, done)
    return table(rounds, done)


# --- the rounds table ------------------------------------------------------------------------------
def table(rounds: Rounds, done: list[dict[str, Any]]) -> dict[str, Any]:
    """Round 0 (the base model: round 1's before), then each round done: its sessions, what
    the filters kept, its LoRA, and per scorer the mean after it with its interval and the
    paired change against the round before."""
    rows: list[dict[str, Any]] = []
    if done:
        rows.append(
            {
                "round": 0,
                "model": "base",
                "scores": {s: {"mean": r["before"]} for s, r in done[0]["eval"].items()},
            }
        )
    for summary in done:
        rows.append(
            {
                "round": summary["round"],
                "model": f"base + {len(summary['stack'])} LoRA(s)",
                "sessions": summary["collect"]["sessions"],
                "accepted": summary["collect"]["accepted"],
                "kept": summary["kept"],
                "rows": summary["rows"],
                "lora": summary["lora"],
                "scores": {
                    s: {"mean": r["after"], "change": r["change"]}
                    | ({"loop": r["loop"]} if "loop" in r else {})
                    for s, r in summary["eval"].items()
                },
            }
        )
    return {
        "name": rounds.name,
        "file": str(rounds.path),
        "directory": str(rounds.directory),
        "rounds": rounds.spec.rounds,
        "done": len(done),
        "differential": rounds.differential,
        "eval": {
            "prompts": len(rounds.experiments[0].prompts),
            "seeds": rounds.spec.eval.seeds,
            "scorers": rounds.spec.scorers,
        },
        "rows": rows,
    }


def write_table(rounds: Rounds, done: list[dict[str, Any]]) -> None:
    """OUT/rounds.json and rounds.md, where they changed (a rerun that redoes nothing writes
    nothing)."""
    result = table(rounds, done)
    rounds.directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("json", json.dumps(result, indent=1)), ("md", markdown(result))):
        path = rounds.directory / f"{TABLE}.{name}"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write(path, text.encode())


def _interval(m: dict[str, Any] | None, key: str = "mean") -> str:
    """A mean (or a paired difference, signed) with its 95% interval."""
    if not m or m.get(key) is None:
        return "—"
    value = f"{m[key]:+.3f}" if key == "diff" else f"{m[key]:.3f}"
    return f"{value} [{m['lo']:.3f}, {m['hi']:.3f}]"


def markdown(result: dict[str, Any]) -> str:
    """The rounds table: one per scorer."""
    e = result["eval"]
    lines = [
        f"# {result['name']}: ArtAug rounds ({result['done']} of {result['rounds']} done)",
        "",
        f"Evaluated with no loop on {e['prompts']} held-out prompts x {len(e['seeds'])} seeds; "
        "each round's change is paired over those cells against the round before. "
        f"Training: sft{' --differential' if result['differential'] else ''}.",
    ]
    for scorer in e["scorers"]:
        head = [
            "round", "model", "sessions", "accepted", "kept", "LoRA (sha256)",
            f"{scorer} mean [95% CI]", "vs previous round [95% CI]", "p",
        ]  # fmt: skip
        rows = []
        for row in result["rows"]:
            s = row["scores"].get(scorer, {})
            change = s.get("change")
            lora = row.get("lora")
            rows.append(
                [
                    str(row["round"]),
                    row["model"],
                    str(row.get("sessions", "—")),
                    str(row.get("accepted", "—")),
                    str(row.get("kept", "—")),
                    "—" if lora is None else f"{_short(lora['path'])} ({lora['sha256'][:12]})",
                    _interval(s.get("mean")),
                    _interval(change, "diff"),
                    "—" if not change or change.get("p") is None else f"{change['p']:.2g}",
                ]
            )
        lines += ["", f"## {scorer}", "", _md(head, rows)]
    return "\n".join(lines) + "\n"


def _short(path: str) -> str:
    """A LoRA's path from its round's directory on (round-N/train/loras/...)."""
    parts = Path(path).parts
    starts = [i for i, p in enumerate(parts) if p.startswith("round-")]
    return "/".join(parts[starts[-1] :]) if starts else path


def _md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def eval_markdown(summary: dict[str, Any]) -> str:
    """A round's evaluation: before and after (and the loop), per scorer."""
    lines = [
        f"# Round {summary['round']}: {summary['experiment']}",
        "",
        f"{summary['cells']} cells (held-out prompt x seed), no loop; before: the model the "
        f"round collected with; after: + {_short(summary['lora']['path'])}.",
    ]
    for scorer, r in summary["eval"].items():
        rows = [
            ["before", _interval(r["before"]), str(r["before"]["n"]), "—", "—"],
            [
                "after",
                _interval(r["after"]),
                str(r["after"]["n"]),
                _interval(r["change"], "diff"),
                _wins(r["change"]),
            ],
        ]
        if "loop" in r:
            rows.append(
                [
                    "loop",
                    _interval(r["loop"]),
                    str(r["loop"]["n"]),
                    _interval(r["loop_gain"], "diff"),
                    _wins(r["loop_gain"]),
                ]
            )
        head = ["model", f"{scorer} mean [95% CI]", "n", "vs before [95% CI]", "win/tie/loss"]
        lines += ["", f"## {scorer}", "", _md(head, rows)]
    return "\n".join(lines) + "\n"


def _wins(p: dict[str, Any]) -> str:
    if p.get("win") is None:
        return "—"
    return f"{p['win']:.0%} / {p['tie']:.0%} / {p['loss']:.0%}"
