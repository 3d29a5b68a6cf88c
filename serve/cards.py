"""The agents' findings as a person reads them: per iteration, one card per agent that ran, in
loop order (the prompt, Data-CoT's facts, Concept-CoT's critique, Thesis-CoT's plan, the
verdict), then what waits for the person at a pause. Pure functions from a session's view to
HTML; every text in it is escaped (the agents' text is untrusted), and each iteration keeps its
raw JSON one click away.
"""

from __future__ import annotations

import difflib
import json
from html import escape
from typing import Any

BAR = (
    '<span style="display:inline-block;width:8em;height:0.6em;background:#e5e7eb;'
    'border-radius:3px;vertical-align:middle"><span style="display:block;height:100%;'
    'width:{pct}%;background:{colour};border-radius:3px"></span></span>'
)
CARD = (
    '<div class="card card-{kind}" style="border:1px solid #d1d5db;border-radius:8px;'
    'padding:6px 10px;margin:6px 0"><b>{title}</b>{who}{body}</div>'
)


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _box(box: Any) -> str:
    return f"[{', '.join(_e(c) for c in box)}]" if box else "whole image"


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>" if items else ""


def _field(name: str, value: Any) -> str:
    return f"<div><i>{_e(name)}:</i> {_e(value)}</div>" if value not in (None, "", []) else ""


def bar(value: Any, top: float = 10.0) -> str:
    """A small horizontal bar for a 0-`top` rating, with the number beside it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _e(value)
    pct = round(max(0.0, min(number / top, 1.0)) * 100)
    colour = "#dc2626" if pct < 40 else "#d97706" if pct < 70 else "#16a34a"
    return BAR.format(pct=pct, colour=colour) + f" {_e(value)}"


def prompt_diff(before: str, after: str) -> str:
    """The words `after` added (<ins>) and removed (<del>) against `before`."""
    old, new = before.split(), after.split()
    parts = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new).get_opcodes():
        if op in ("delete", "replace"):
            parts.append(f'<del style="color:#b91c1c">{_e(" ".join(old[i1:i2]))}</del>')
        if op in ("insert", "replace"):
            parts.append(f'<ins style="color:#15803d">{_e(" ".join(new[j1:j2]))}</ins>')
        if op == "equal":
            parts.append(_e(" ".join(old[i1:i2])))
    return " ".join(parts)


def card(kind: str, title: str, body: str, who: str | None = None) -> str:
    tag = f" <small>(decided by {_e(who)})</small>" if who else ""
    return CARD.format(kind=kind, title=_e(title), who=tag, body=body)


def prompt_body(prompt: str, negative: str = "", previous: str | None = None) -> str:
    changed = (
        f"<div><i>changes:</i> {prompt_diff(previous, prompt)}</div>"
        if previous is not None and previous != prompt
        else ""
    )
    same = "<div><i>unchanged from the last prompt</i></div>" if previous == prompt else ""
    return _field("prompt", prompt) + changed + same + _field("negative", negative)


def facts_body(facts: dict) -> str:
    objects = [f"{_e(o.get('label'))} {_box(o.get('box'))}" for o in facts.get("objects", [])]
    return (
        _field("description", facts.get("description"))
        + (f"<div><i>objects:</i>{_list(objects)}</div>" if objects else "")
        + _field("lighting", facts.get("lighting"))
        + _field("palette", facts.get("palette"))
    )


def critique_body(critique: dict) -> str:
    artifacts = [
        f"{_e(a.get('kind'))} (severity {_e(a.get('severity'))}, {_box(a.get('box'))})"
        + (f": {_e(a['note'])}" if a.get("note") else "")
        for a in critique.get("artifacts", [])
    ]
    ratings = "".join(
        f"<tr><td>{_e(aspect)}</td><td>{bar(r.get('rating'))}</td>"
        f"<td><small>{_e(r.get('note', ''))}</small></td></tr>"
        for aspect, r in (critique.get("aesthetics") or {}).items()
        if isinstance(r, dict)
    )
    alignment = critique.get("prompt_alignment")
    return (
        _list([_e(o) for o in critique.get("observations", [])])
        + _field("missing", ", ".join(critique.get("missing") or []))
        + (f"<div><i>artifacts:</i>{_list(artifacts)}</div>" if artifacts else "")
        + (f"<table>{ratings}</table>" if ratings else "")
        + (f"<div><i>prompt alignment:</i> {bar(alignment)}</div>" if alignment is not None else "")
        + _field("summary", critique.get("summary"))
    )


def plan_body(plan: dict) -> str:
    edits = [
        f"{_box(r.get('box'))} {_e(r.get('prompt'))}"
        + (f" (strength {_e(r['strength'])})" if r.get("strength") is not None else "")
        for r in plan.get("regional_edits") or plan.get("regions") or []
    ]
    params = {k: v for k, v in (plan.get("params") or {}).items() if v is not None}
    return (
        _field("rationale", plan.get("rationale"))
        + _field("revised prompt", plan.get("revised_prompt") or plan.get("prompt"))
        + _field("negative", plan.get("negative_prompt"))
        + (f"<div><i>box edits:</i>{_list(edits)}</div>" if edits else "")
        + (_field("parameters", ", ".join(f"{k} {v}" for k, v in params.items())))
    )


def verdict_body(verdict: dict) -> str:
    better = verdict.get("better_than_before")
    return (
        f"<div><b>{_e(verdict.get('verdict', ''))}</b>, score {bar(verdict.get('score'))}"
        + (f", {'better' if better else 'not better'} than before" if better is not None else "")
        + "</div>"
        + _list([_e(r) for r in verdict.get("reasons", [])])
    )


def step_cards(step: dict, previous_prompt: str | None = None) -> str:
    """One iteration's cards, in loop order: only the agents that ran have one."""
    agents, who = step.get("agents") or {}, step.get("decided_by") or {}
    merged = " (the merged critic)" if step.get("answered_by") else ""
    title = "Prompt (enhancer)" if "enhance" in agents else "Prompt"
    out = [
        card(
            "prompt",
            title,
            prompt_body(step.get("prompt", ""), step.get("negative_prompt", ""), previous_prompt),
            who.get("prompt"),
        )
    ]
    if "data_cot" in agents:
        out.append(card("data", f"Data-CoT: facts{merged}", facts_body(agents["data_cot"])))
    if "concept_cot" in agents:
        body = critique_body(agents["concept_cot"])
        out.append(card("concept", f"Concept-CoT: critique{merged}", body))
    if "thesis_cot" in agents:
        body = plan_body(agents["thesis_cot"])
        mine = (step.get("human") or {}).get("plan") or {}
        if mine.get("action") == "edit":  # what the person made of it
            body += f"<div><b>your edit:</b>{plan_body(mine)}</div>"
        out.append(card("thesis", f"Thesis-CoT: plan{merged}", body, who.get("plan")))
    if "validate" in agents:
        body = verdict_body(agents["validate"])
        if step.get("verdict") and step["verdict"] != agents["validate"].get("verdict"):
            body += _field("final verdict", step["verdict"])
        out.append(card("verdict", "Verdict", body, who.get("verdict")))
    return "".join(out)


def raw_json(value: Any) -> str:
    return (
        '<details class="raw"><summary>raw JSON</summary><pre style="white-space:pre-wrap">'
        f"{_e(json.dumps(value, indent=1, default=str))}</pre></details>"
    )


def pause_cards(pause: dict) -> str:
    """What waits for the person: the proposal of the pause, as its agent's card."""
    point, proposal = pause.get("pause", ""), pause.get("proposal") or {}
    if point == "prompt":
        params = ", ".join(f"{k} {v}" for k, v in (proposal.get("params") or {}).items())
        body = prompt_body(proposal.get("prompt", ""), proposal.get("negative_prompt", ""))
        body += _field("parameters", params)
    elif point == "plan":
        body = plan_body(proposal)
    elif point == "verdict":
        body = verdict_body(proposal)
    else:
        body = ""
    if pause.get("error"):
        body += f'<div style="color:#b91c1c">{_e(pause["error"])}</div>'
    return card("pause", f"Waiting for you: {point}", body) + raw_json(proposal)


def findings_html(v: Any) -> str:
    """A session's findings (a graphs/sessions.py SessionView): every finished iteration's
    cards, the newest first, then what waits for the person."""
    iterations, previous = [], None
    for step in v.steps:
        iterations.append(
            f'<div class="iteration"><h4>Iteration {_e(step.get("iteration", 0) + 1)}</h4>'
            f"{step_cards(step, previous)}"
            + raw_json({k: step.get(k, {}) for k in ("agents", "decided_by", "human")})
            + "</div>"
        )
        previous = step.get("prompt")
    pending = pause_cards(v.pause) if v.pause else ""
    if not iterations and not pending:
        return "<p>No findings yet.</p>"
    return f'<div class="findings">{pending}{"".join(reversed(iterations))}</div>'
