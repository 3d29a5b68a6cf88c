"""The web UI's findings cards (serve/cards.py), without a browser: a session's view becomes
readable HTML, one card per agent that ran, every agent's text escaped."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

from artloop.serve.cards import bar, findings_html, prompt_diff, timeline_html

AGENTS = {
    "enhance": {"prompt": "a red circle left of a blue square", "negative_prompt": "blur"},
    "data_cot": {
        "description": "flat shapes on white",
        "objects": [{"label": "purple circle", "box": [156, 47, 516, 406]}],
        "lighting": "flat, even",
        "palette": "purple and blue",
    },
    "concept_cot": {
        "observations": ["<script>alert(1)</script> circle is purple"],
        "missing": ["a red circle"],
        "artifacts": [
            {
                "note": "wrong colour",
                "kind": "color_misbinding",
                "box": [1, 2, 3, 4],
                "severity": 2,
            },
            {"note": "", "kind": "omission", "box": None, "severity": 3},
        ],
        "aesthetics": {
            "exposure": {"note": "even", "rating": 7},
            "composition": {"note": "not as asked", "rating": 3},
        },
        "prompt_alignment": 2,
        "summary": "fix the circle's colour",
    },
    "thesis_cot": {
        "rationale": "repaint the circle red",
        "revised_prompt": "a red circle to the left of a blue square",
        "negative_prompt": "",
        "regional_edits": [{"box": [156, 47, 516, 406], "prompt": "a red circle", "strength": 0.9}],
        "params": {"guidance_scale": 7.5, "num_inference_steps": None, "exposure": None},
    },
    "validate": {
        "reasons": ["AFTER the circle is red"],
        "better_than_before": True,
        "score": 8.5,
        "verdict": "revise",
    },
}


def step(i: int = 0, prompt: str = "a red circle left of a blue square", **over) -> dict:
    base = {
        "iteration": i,
        "prompt": prompt,
        "negative_prompt": "blur",
        "agents": copy.deepcopy(AGENTS),
        "decided_by": {"prompt": "agent", "plan": "human", "verdict": "agent"},
        "human": {},
        "verdict": "revise",
    }
    return base | over


def session(steps: list[dict], pause: dict | None = None, iteration: int = 0) -> SimpleNamespace:
    return SimpleNamespace(steps=steps, pause=pause, iteration=iteration)


def test_each_agent_has_a_card_with_its_values_in_loop_order():
    html = findings_html(session([step()]))
    kinds = re.findall(r'class="card card-(\w+)"', html)
    assert kinds == ["prompt", "data", "concept", "thesis", "verdict"]
    for text in (
        "Prompt (enhancer)",
        "a red circle left of a blue square",
        "flat shapes on white",
        "purple circle [156, 47, 516, 406]",
        "a red circle",
        "color_misbinding (severity 2, [1, 2, 3, 4]): wrong colour",
        "omission (severity 3, whole image)",
        "composition",
        "not as asked",
        "repaint the circle red",
        "a red circle to the left of a blue square",
        "[156, 47, 516, 406] a red circle (strength 0.9)",
        "guidance_scale 7.5",
        "AFTER the circle is red",
        "<b>revise</b>, score",
        "better than before",
        "(decided by human)",
    ):
        assert text in html, text
    assert "num_inference_steps" not in html.split("raw JSON")[0]  # a null change is not shown
    assert "width:30%" in html and "width:85%" in html  # composition 3/10, score 8.5/10
    assert "<details" in html and "&quot;data_cot&quot;" in html  # the raw JSON, one click away


def test_a_persons_plan_edit_is_shown_beside_the_agents():
    s = step(
        human={"plan": {"action": "edit", "regions": [{"box": [1, 2, 3, 4], "prompt": "a hat"}]}}
    )
    html = findings_html(session([s]))
    assert "<b>your edit:</b>" in html and "[1, 2, 3, 4] a hat" in html
    assert "your edit" not in findings_html(session([step()]))


def test_agents_text_is_escaped():
    s = step()
    s["agents"]["data_cot"]["objects"][0]["label"] = '<img src=x onerror="alert(2)">'
    s["agents"]["validate"]["reasons"] = ["</div><script>alert(3)</script>"]
    html = findings_html(session([s], {"pause": "verdict", "proposal": {"reasons": ["<b>x"]}}))
    assert "<script" not in html and "<img" not in html and "<b>x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; circle is purple" in html
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in html
    assert "&lt;/div&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in html
    assert html.count("<div") == html.count("</div>")  # no agent text closes a card


def test_missing_agents_do_not_break_it():
    """No enhancer (composed prompt), a merged critic, a loop without a plan, a step with no
    agents at all, an empty session."""
    composed = step()
    del composed["agents"]["enhance"]
    composed["answered_by"] = dict.fromkeys(("data_cot", "concept_cot", "thesis_cot"), "critic")
    html = findings_html(session([composed]))
    assert "Prompt (enhancer)" not in html and "Prompt" in html
    assert "Data-CoT: facts (the merged critic)" in html
    no_plan = step()
    for name in ("enhance", "thesis_cot", "concept_cot"):
        del no_plan["agents"][name]
    kinds = re.findall(r'class="card card-(\w+)"', findings_html(session([no_plan])))
    assert kinds == ["prompt", "data", "verdict"]
    bare = {"iteration": 0}
    assert re.findall(r'class="card card-(\w+)"', findings_html(session([bare]))) == ["prompt"]
    assert findings_html(session([])) == "<p>No findings yet.</p>"


def test_prompt_changes_against_the_last_iteration():
    html = findings_html(
        session([step(0, "a red circle"), step(1, "a bright red circle"), step(2, "a red circle")])
    )
    assert '<ins style="color:#15803d">bright</ins>' in html
    assert '<del style="color:#b91c1c">bright</del>' in html
    assert prompt_diff("a b c", "a c d") == 'a <del style="color:#b91c1c">b</del> c ' + (
        '<ins style="color:#15803d">d</ins>'
    )
    same = findings_html(session([step(0), step(1)]))
    assert "unchanged from the last prompt" in same


def test_the_pause_shows_what_waits_for_the_person():
    plan = {"pause": "plan", "proposal": AGENTS["thesis_cot"], "error": "bad <box>"}
    html = findings_html(session([], plan))
    assert "Waiting for you: plan" in html and "repaint the circle red" in html
    assert "bad &lt;box&gt;" in html
    prompt = {"pause": "prompt", "proposal": {"prompt": "a fox", "params": {"seed": 3}}}
    assert "seed 3" in findings_html(session([], prompt))
    verdict = {"pause": "verdict", "proposal": AGENTS["validate"]}
    html = findings_html(session([step()], verdict))
    assert html.index("Waiting for you: verdict") < html.index("Iteration 1")  # newest first


def test_bar_is_clamped_and_tolerates_non_numbers():
    assert "width:100%" in bar(12) and "width:0%" in bar(-1)
    assert bar("n/a") == "n/a" and bar(None) == "None"


def test_findings_with_a_box_light_it_on_the_image():
    """Each object, artifact and box edit with a box carries its box's key (serve/boxes.py)."""
    html = findings_html(session([step(0), step(1)]))
    keys = re.findall(r'data-box-key="([^"]+)"', html)
    # newest first; the whole-image artifact (index 1) has no box to light
    assert keys == [f"i{i}-{k}" for i in (1, 0) for k in ("objects-0", "artifacts-0", "edits-0")]


def test_a_pause_shows_the_iteration_so_far():
    """At the plan pause: the plan (its box edits are the person's "yours" boxes), then the
    iteration's prompt, facts and critique from its checkpoint, then the finished iterations."""
    done = ("data_cot", "concept_cot", "thesis_cot")  # what has run by the plan pause
    live = {"prompt": "a red circle", "agents": {k: AGENTS[k] for k in done}}
    pause = {"pause": "plan", "proposal": AGENTS["thesis_cot"]}
    html = findings_html(session([step(0)], pause, iteration=1), live)
    order = [html.index(t) for t in ("Waiting for you: plan", "Iteration 2 so far", "Iteration 1")]
    assert order == sorted(order)
    now = html[html.index("Iteration 2 so far") : html.index("<h4>Iteration 1</h4>")]
    assert "Data-CoT: facts" in now and "Concept-CoT: critique" in now
    assert "Thesis-CoT" not in now and "Verdict" not in now  # the plan is the pause's card
    assert 'data-box-key="yours-0"' in html and 'data-box-key="i1-objects-0"' in html
    # nothing under way yet (the prompt pause): no such block
    prompt = {"pause": "prompt", "proposal": {"prompt": "a fox"}}
    assert "so far" not in findings_html(session([], prompt), {"agents": {}})


def test_the_timeline_shows_each_iteration_with_its_score():
    steps = [
        step(0, image="a1", edited_image="b1", score=4.0),
        step(1, image="a2", score=7.5, verdict="accept"),  # no edit: its image is shown
    ]
    html = timeline_html(session(steps), lambda d: f"file={d}", selected=1)
    assert re.findall(r'data-iteration="(\d)"', html) == ["0", "1"]
    assert re.findall(r'src="file=(\w+)"', html) == ["b1", "a2"]
    assert "width:40%" in html and "width:75%" in html  # the scores as bars
    assert html.count("#2563eb") == 1 and "accept (agent)" in html
    assert "No finished iteration" in timeline_html(session([]), str)
