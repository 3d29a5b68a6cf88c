"""An experiment's report, in DIR/report/: report.json (every number), report.md (the tables)
and index.html (the tables, the image grid: rows = (prompt, seed), columns = the columns, each
cell the final image with its scores, and the plots), one self-contained file (images inline as
small thumbnails). `compare` puts two experiments side by side.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

from artloop.experiments.plots import colours, score_by_iteration, score_vs_cost
from artloop.experiments.results import Collected, collect, compare, tables
from artloop.experiments.spec import BASELINE
from artloop.experiments.stats import mean_ci
from artloop.store.trajectories import StoreError, TrajectoryStore
from artloop.tools.images import atomic_write
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

THUMB = 160  # px, the grid's images' longer side
_env = Environment(
    loader=PackageLoader("artloop.experiments", "."),
    autoescape=select_autoescape(["html", "jinja"]),  # prompts are untrusted text
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def num(value: Any, digits: int = 3) -> str:
    """A number for a table ("—" where there is none)."""
    if value is None:
        return "—"
    if isinstance(value, int) or (
        isinstance(value, float) and value.is_integer() and abs(value) >= 100
    ):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ci(m: dict) -> str:
    return "—" if m["mean"] is None else f"{num(m['mean'])} [{num(m['lo'])}, {num(m['hi'])}]"


def pvalue(p: float | None) -> str:
    return "—" if p is None else f"{p:.2g}" if p >= 0.001 else "<0.001"


def share(x: float | None) -> str:
    return "—" if x is None else f"{round(100 * x) + 0}%"  # + 0: never "-0%"


_env.filters.update(num=num, ci=ci, pvalue=pvalue, share=share)


# --- tables as rows (the markdown and the HTML show the same) ------------------------------------
def mean_rows(means: dict[str, dict], marks: dict[str, list[str]], scorer: str) -> list[list]:
    return [
        [n + (" (judge)" if n in marks.get(scorer, []) else ""), m["n"], ci(m)]
        for n, m in means.items()
    ]


def paired_rows(results: dict[str, dict]) -> list[list]:
    return [
        [
            n,
            r["n"],
            ci({"mean": r["diff"], "lo": r["lo"], "hi": r["hi"]}),
            pvalue(r["p"]),
            share(r["win"]),
            share(r["tie"]),
            share(r["loss"]),
        ]  # fmt: skip
        for n, r in results.items()
    ]


PAIRED_HEAD = [
    "column",
    "pairs",
    "mean difference [95% CI]",
    "p (sign-flip)",
    "wins",
    "ties",
    "losses",
]
COST_HEAD = [
    "column", "sessions", "finished", "failed", "accepted", "iterations", "VLM calls",
    "prompt tokens", "completion tokens", "diffusion s", "wall s", "wall s / accepted",
]  # fmt: skip


def cost_rows(cost: dict[str, dict]) -> list[list]:
    return [
        [
            n,
            c["sessions"],
            c["finished"],
            c["failed"],
            num(c["accepted"]),
            num(c["iterations"], 2),
            num(c["vlm_calls"], 1),
            num(c["prompt_tokens"], 0),
            num(c["completion_tokens"], 0),
            num(c["diffusion_s"], 2),
            num(c["wall_s"], 2),
            num(c["wall_per_accepted_s"], 2),
        ]  # fmt: skip
        for n, c in cost.items()
    ]


SHARE_HEAD = [
    "LoRA column", "pairs", "its change over baseline [95% CI]", "the loop's gain [95% CI]",
    "share of the loop's gain [95% CI]",
]  # fmt: skip
TRAIN_HEAD = ["LoRA column", "trainer", "seed", "learning rate", "examples", "steps",
              "loss first -> last", "sha256"]  # fmt: skip


def _diff(r: dict) -> str:
    return ci({"mean": r["diff"], "lo": r["lo"], "hi": r["hi"]})


def share_rows(result: dict[str, Any]) -> list[list]:
    """Each LoRA column: its change, the loop's gain on the same pairs, the share."""
    rows = []
    for n, r in result["columns"].items():
        s = r["share"]
        part = (
            "—"
            if s["share"] is None
            else f"{share(s['share'])} [{share(s['lo'])}, {share(s['hi'])}]"
        )
        rows.append([n, s["n"], _diff(r["change"]), _diff(r["loop_gain"]), part])
    return rows


def share_lines(result: dict[str, Any]) -> list[str]:
    return [
        f"{t}: mean share of the loop's gain over {v['seeds']} training seed(s): "
        f"{share(v['mean_share'])} (ArtAug's goal: 50%)"
        for t, v in result["trainers"].items()
    ]


def training_lines(training: dict[str, Any]) -> list[str]:
    """What the [train] stages did, in sentences."""
    lines = []
    if c := training.get("collect"):
        lines.append(
            f"Collected {c['sessions']} sessions of {c['variant']} ({c['prompts']} prompts x "
            f"{len(c['seeds'])} seed(s)), {c['accepted']} accepted; exported "
            f"{'the accepted' if c['accepted_only'] else 'every finished'} one(s)."
        )
    for fmt, d in training.get("data", {}).items():
        lines.append(f"{fmt} data: {d['rows']} rows from {d['runs']} sessions.")
    for trainer, ch in training.get("choice", {}).items():
        means = ", ".join(f"{lr}: {num(m)}" for lr, m in ch["means"].items())
        lines.append(
            f"{trainer} learning rate {ch['learning_rate']:g}, chosen by {ch['scorer']} on "
            f"{ch['cells']} validation cells (mean by rate: {means})."
        )
    return lines


def training_rows(training: dict[str, Any]) -> list[list]:
    return [
        [
            n,
            r["trainer"],
            r["seed"],
            f"{r['learning_rate']:g}",
            num(r["examples"]),
            num(r["steps"]),
            f"{num(r['first_loss'])} -> {num(r['last_loss'])}",
            r["sha256"][:12],
        ]  # fmt: skip
        for n, r in training.get("loras", {}).items()
    ]


def md_table(head: list[str], rows: list[list]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


# --- the grid --------------------------------------------------------------------------------------
def thumbnail(store: TrajectoryStore, digest: str | None) -> str | None:
    """A data URI of a small copy of a stored image (PNG; JPEG when it was shrunk)."""
    if not digest:
        return None
    try:
        image = store.images.get(digest)
    except (OSError, StoreError, ValueError):
        return None
    shrunk = max(image.size) > THUMB
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG" if shrunk else "PNG", quality=85)
    kind = "jpeg" if shrunk else "png"
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode()}"


def grid(data: Collected, store: TrajectoryStore) -> list[dict[str, Any]]:
    st = data.state
    cols = {n: data.column(n) for n in st["columns"]}
    rows = []
    for p in st["prompts"]:
        for seed in st["seeds"]:
            if len(rows) >= st["grid_rows"]:
                return rows
            cells = []
            for n in st["columns"]:
                c = cols[n].get((p["id"], seed))
                cells.append(
                    {
                        "column": n,
                        "status": c.status if c else "missing",
                        "run_id": c.run_id if c else None,
                        "src": thumbnail(store, c.final_image) if c and c.finished else None,
                        "scores": dict(c.scores) if c else {},
                    }
                )
            rows.append({"prompt": p, "seed": seed, "cells": cells})
    return rows


# --- the report ------------------------------------------------------------------------------------
def build(data: Collected) -> dict[str, Any]:
    """Every number of the report (what report.json holds)."""
    st = data.state
    return {
        "experiment": {
            k: st[k]
            for k in (
                "name",
                "description",
                "file",
                "seeds",
                "columns",
                "baseline",
                "reference",
                "scorers",
                "scorer_identity",
                "judged",
                "hashes",
            )  # fmt: skip
        }
        | {"prompts": len(st["prompts"]), "generated": time.time()},
        "categories": sorted({c for p in st["prompts"] for c in p["categories"]}),
        **tables(data),
        "training": data.training,
    }


def markdown(report: dict[str, Any]) -> str:
    e, marks = report["experiment"], report["experiment"]["judged"]
    out = [f"# Experiment {e['name']}", ""]
    if e["description"]:
        out += [e["description"], ""]
    out += [
        f"{e['prompts']} prompts x {len(e['seeds'])} seeds; columns: {', '.join(e['columns'])}; "
        f"reference: {e['reference']}; scorers: {', '.join(e['scorers'])}.",
        "",
    ]
    for scorer, judged in marks.items():
        out += [f"**Marked:** `{scorer}` is also the judge of {', '.join(judged)} "
                "(allow_judge_as_scorer): those scores are graded by what the loop optimised.", ""]  # fmt: skip
    for s in e["scorers"]:
        out += [f"## {s}", "", "Mean [95% bootstrap CI] per column:", ""]
        out += [
            md_table(["column", "n", "mean [95% CI]"], mean_rows(report["means"][s], marks, s)),
            "",
        ]
        if report["vs_baseline"]:
            out += [f"Paired against {BASELINE} (same prompt and seed):", ""]
            out += [md_table(PAIRED_HEAD, paired_rows(report["vs_baseline"][s])), ""]
        if sh := report["lora_share"].get(s):
            out += [
                f"The LoRAs, with no loop, against the loop they learnt from ({sh['loop']}), "
                f"each over {BASELINE} on the same prompts and seeds:",
                "",
                md_table(SHARE_HEAD, share_rows(sh)),
                "",
                *share_lines(sh),
                "",
            ]
        if report["vs_reference"][s]:
            out += [f"Paired against the reference, {e['reference']}:", ""]
            out += [md_table(PAIRED_HEAD, paired_rows(report["vs_reference"][s])), ""]
        if len(report["categories"]) > 1:
            out += ["By category (mean [95% CI]):", ""]
            head = ["category", *e["columns"]]
            rows = [
                [cat, *(ci(report["by_category"][cat][s][n]) for n in e["columns"])]
                for cat in report["categories"]
            ]
            out += [md_table(head, rows), ""]
            if report["by_category_vs_baseline"]:
                out += [f"By category, mean difference against {BASELINE} [95% CI] (p):", ""]
                others = [n for n in e["columns"] if n != BASELINE]
                rows = [
                    [cat, *(f"{ci({'mean': r['diff'], 'lo': r['lo'], 'hi': r['hi']})} ({pvalue(r['p'])})"
                            for r in (report["by_category_vs_baseline"][cat][s][n] for n in others))]
                    for cat in report["categories"]
                ]  # fmt: skip
                out += [md_table(["category", *others], rows), ""]
    out += [
        "## Cost per column",
        "",
        "Per finished session (means), wall s per accepted image:",
        "",
    ]
    out += [md_table(COST_HEAD, cost_rows(report["cost"])), ""]
    if training := report["training"]:
        out += ["## Training", "", *training_lines(training), ""]
        out += [md_table(TRAIN_HEAD, training_rows(training)), ""]
    return "\n".join(out)


def html(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    e = report["experiment"]
    plots = {}
    for s in e["scorers"]:
        points = {n: (report["cost"][n]["wall_s"], report["means"][s][n]) for n in e["columns"]}
        plots[s] = {
            "cost": score_vs_cost(points, s),
            "iterations": score_by_iteration(report["by_iteration"][s], s),
        }
    return _env.get_template("report.html.jinja").render(
        r=report,
        e=e,
        rows=rows,
        plots=plots,
        palette=colours(e["columns"]),
        tables={
            "mean": mean_rows,
            "paired": paired_rows,
            "cost": cost_rows(report["cost"]),
            "share": share_rows,
            "share_lines": share_lines,
            "training": training_lines(report["training"]) if report["training"] else [],
            "loras": training_rows(report["training"]) if report["training"] else [],
        },
        paired_head=PAIRED_HEAD,
        cost_head=COST_HEAD,
        share_head=SHARE_HEAD,
        train_head=TRAIN_HEAD,
        baseline=BASELINE,
        when=time.strftime("%Y-%m-%d %H:%M", time.localtime(report["experiment"]["generated"])),
    )


def write_report(directory: Path) -> tuple[Path, dict[str, Any]]:
    """Write DIR/report/{report.json, report.md, index.html}; the HTML's path and the numbers."""
    data = collect(directory)
    report = build(data)
    rows = grid(data, TrajectoryStore(directory, create=False))
    out = directory / "report"
    atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write(out / "report.md", markdown(report).encode())
    atomic_write(out / "index.html", html(report, rows).encode())
    return out / "index.html", report


# --- two experiments -------------------------------------------------------------------------------
def compare_experiments(a: Path, b: Path) -> dict[str, Any]:
    """Each scorer both experiments share: every column of both (A:name, B:name) with its mean,
    and for each column name both have, B minus A paired over the (prompt text, seed) both ran."""
    da, db = collect(a), collect(b)
    na, nb = da.state["name"], db.state["name"]
    if na == nb:
        na, nb = f"{na} ({a})", f"{nb} ({b})"
    resamples = max(da.state["bootstrap"], db.state["bootstrap"])

    def by_text(data: Collected, name: str) -> dict[tuple[str, int], Any]:
        text = {p["id"]: p["prompt"] for p in data.state["prompts"]}
        return {(text[k[0]], k[1]): c for k, c in data.column(name).items()}

    out: dict[str, Any] = {"a": na, "b": nb, "scorers": {}}
    for s in [s for s in da.state["scorers"] if s in db.state["scorers"]]:
        means: dict[str, dict] = {}
        for label, data in (("A", da), ("B", db)):
            for n in data.state["columns"]:
                scores = [
                    c.scores[s] for c in data.column(n).values() if c.scores.get(s) is not None
                ]
                means[f"{label}:{n}"] = mean_ci(scores, resamples)
        shared = [n for n in da.state["columns"] if n in db.state["columns"]]
        diffs = {n: compare(by_text(db, n), by_text(da, n), s, resamples) for n in shared}
        out["scorers"][s] = {"means": means, "b_minus_a": diffs}
    return out


def compare_markdown(result: dict[str, Any]) -> str:
    out = [f"# {result['b']} (B) against {result['a']} (A)", ""]
    if not result["scorers"]:
        out.append("The two experiments share no scorer.")
    for s, r in result["scorers"].items():
        out += [f"## {s}", "", md_table(["column", "n", "mean [95% CI]"],
                [[n, m["n"], ci(m)] for n, m in r["means"].items()]), ""]  # fmt: skip
        if r["b_minus_a"]:
            out += ["B minus A, column by column, paired over the prompts and seeds both ran:", ""]
            out += [md_table(PAIRED_HEAD, paired_rows(r["b_minus_a"])), ""]
    return "\n".join(out)
