"""The agents' findings as a person reads them: per iteration, one card per agent that ran, in
loop order (the prompt, Data-CoT's facts, Concept-CoT's critique, Thesis-CoT's plan, the
verdict), then what waits for the person at a pause. Pure functions from a session's view to
HTML; every text in it is escaped (the agents' text is untrusted), and each iteration keeps its
raw JSON one click away.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from html import escape
from typing import Any

from artloop.serve.boxes import box_key

Keys = Callable[[str, int], str]  # (layer, index in the agent's list) -> the box's key

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


def _list(items: list[str], keys: list[str | None] | None = None) -> str:
    """A list; an item with a key (a finding with a box) lights its box on the image when
    hovered (serve/boxes.py)."""
    keys = keys or [None] * len(items)
    tagged = (
        f'<li data-box-key="{_e(k)}">{i}</li>' if k else f"<li>{i}</li>"
        for i, k in zip(items, keys, strict=True)
    )
    return "<ul>" + "".join(tagged) + "</ul>" if items else ""


def _keys(items: list[dict], layer: str, keys: Keys | None) -> list[str | None]:
    return [keys(layer, i) if keys and item.get("box") else None for i, item in enumerate(items)]


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


def facts_body(facts: dict, keys: Keys | None = None) -> str:
    found = facts.get("objects") or []
    objects = [f"{_e(o.get('label'))} {_box(o.get('box'))}" for o in found]
    listed = _list(objects, _keys(found, "objects", keys))
    return (
        _field("description", facts.get("description"))
        + (f"<div><i>objects:</i>{listed}</div>" if objects else "")
        + _field("lighting", facts.get("lighting"))
        + _field("palette", facts.get("palette"))
    )


def critique_body(critique: dict, keys: Keys | None = None) -> str:
    found = critique.get("artifacts") or []
    artifacts = [
        f"{_e(a.get('kind'))} (severity {_e(a.get('severity'))}, {_box(a.get('box'))})"
        + (f": {_e(a['note'])}" if a.get("note") else "")
        for a in found
    ]
    listed = _list(artifacts, _keys(found, "artifacts", keys))
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
        + (f"<div><i>artifacts:</i>{listed}</div>" if artifacts else "")
        + (f"<table>{ratings}</table>" if ratings else "")
        + (f"<div><i>prompt alignment:</i> {bar(alignment)}</div>" if alignment is not None else "")
        + _field("summary", critique.get("summary"))
    )


def plan_body(plan: dict, keys: Keys | None = None, layer: str = "edits") -> str:
    found = plan.get("regional_edits") or plan.get("regions") or []
    edits = [
        f"{_box(r.get('box'))} {_e(r.get('prompt'))}"
        + (f" (strength {_e(r['strength'])})" if r.get("strength") is not None else "")
        for r in found
    ]
    listed = _list(edits, _keys(found, layer, keys))
    params = {k: v for k, v in (plan.get("params") or {}).items() if v is not None}
    return (
        _field("rationale", plan.get("rationale"))
        + _field("revised prompt", plan.get("revised_prompt") or plan.get("prompt"))
        + _field("negative", plan.get("negative_prompt"))
        + (f"<div><i>box edits:</i>{listed}</div>" if edits else "")
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
    i = step.get("iteration", 0)

    def keys(layer: str, index: int) -> str:
        return box_key(i, layer, index)

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
        out.append(card("data", f"Data-CoT: facts{merged}", facts_body(agents["data_cot"], keys)))
    if "concept_cot" in agents:
        body = critique_body(agents["concept_cot"], keys)
        out.append(card("concept", f"Concept-CoT: critique{merged}", body))
    if "thesis_cot" in agents:
        body = plan_body(agents["thesis_cot"], keys)
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
    elif point == "plan":  # its box edits fill the person's table: the "yours" boxes
        body = plan_body(proposal, lambda _layer, index: f"yours-{index}", "yours")
    elif point == "verdict":
        body = verdict_body(proposal)
    else:
        body = ""
    if pause.get("error"):
        body += f'<div style="color:#b91c1c">{_e(pause["error"])}</div>'
    return card("pause", f"Waiting for you: {point}", body) + raw_json(proposal)


# The agent whose proposal a pause shows (its card is the pause's, not the step's).
PROPOSED_BY = {"prompt": "enhance", "plan": "thesis_cot", "verdict": "validate"}


def findings_html(v: Any, live: dict | None = None) -> str:
    """A session's findings (a graphs/sessions.py SessionView): what waits for the person at a
    pause, the iteration under way so far (`live`: its step, from the checkpoint), then every
    finished iteration's cards, the newest first."""
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
    agents = dict((live or {}).get("agents") or {})
    agents.pop(PROPOSED_BY.get((v.pause or {}).get("pause", ""), ""), None)
    if pending and agents.keys() & {"data_cot", "concept_cot", "thesis_cot"}:
        under_way = {**(live or {}), "agents": agents, "iteration": v.iteration}
        pending += (
            f'<div class="iteration under-way"><h4>Iteration {_e(v.iteration + 1)} so far</h4>'
            f"{step_cards(under_way, previous)}</div>"
        )
    if not iterations and not pending:
        return "<p>No findings yet.</p>"
    return f'<div class="findings">{pending}{"".join(reversed(iterations))}</div>'


def timeline_html(v: Any, url: Callable[[str], str], selected: int | None = None) -> str:
    """The finished iterations side by side: each one's image (the edit, if there is one), its
    score as a bar, the verdict and who decided it; a click selects it (`TIMELINE_JS`)."""
    tiles = []
    for step in v.steps:
        i, digest = step.get("iteration", 0), step.get("edited_image") or step.get("image")
        who = (step.get("decided_by") or {}).get("verdict", "agent")
        border = "#2563eb" if i == selected else "#d1d5db"
        tiles.append(
            f'<div class="tile" data-iteration="{_e(i)}" title="compare and fork from here"'
            f' style="display:inline-block;width:150px;margin:4px;padding:4px;cursor:pointer;'
            f'border:2px solid {border};border-radius:6px;vertical-align:top">'
            f'<img src="{_e(url(digest))}" alt="iteration {_e(i + 1)}" style="width:100%;'
            f'image-rendering:pixelated">'
            f"<div><b>{_e(i + 1)}</b> {_e(step.get('verdict', ''))} ({_e(who)})</div>"
            f"<div>{bar(step.get('score'))}</div></div>"
        )
    if not tiles:
        return "<p>No finished iteration yet.</p>"
    return '<div class="timeline">' + "".join(tiles) + "</div>"


TIMELINE_JS = """
element.addEventListener('click', (e) => {
  const tile = e.target.closest('[data-iteration]');
  if (tile) trigger('click', {iteration: Number(tile.dataset.iteration)});
});
"""
