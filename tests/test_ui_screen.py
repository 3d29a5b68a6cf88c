"""What the web UI shows while a session runs (serve/progress.py) and of a finished one
(serve/screen.py), without a browser."""

from __future__ import annotations

import re

from artloop.serve.progress import Progress
from artloop.serve.screen import compared, rows_of, status_line
from test_ui_cards import session, step


def test_progress_follows_the_events():
    clock = [100.0]
    now = Progress(3, clock=lambda: clock[0])
    clock[0] = 101.0
    now.feed({"event": "node_started", "node": "generate", "iteration": 1})
    clock[0] = 103.5
    now.feed({"event": "diffusion_step", "node": "generate", "step": 7, "steps": 20})
    html = now.html()
    assert "iteration 2 of 3" in html and "drawing the image" in html
    assert "2.5 s" in html and "3.5 s in all" in html  # in the node, and in all
    assert 'max="20" value="7"' in html and "diffusion step 7 of 20" in html
    now.feed({"event": "node_finished", "node": "generate", "seconds": 2.5})
    now.feed({"event": "node_started", "node": "data_cot", "iteration": 1})
    html = now.html()
    assert "Data-CoT: gathering facts" in html and "<progress" not in html  # a new node: no bar
    now.feed({"event": "node_started", "node": "<script>", "iteration": 0})
    assert "<script>" not in now.html()  # an unknown name is escaped


def test_before_and_after_of_an_iteration():
    steps = [step(0, image="a", edited_image="b"), step(1, image="c"), step(2, image="d")]
    steps[2]["edited_image"] = "e"
    v = session(steps)
    assert compared(v, None) == ("d", "e")  # the latest edit
    assert compared(v, 0) == ("a", "b") and compared(v, 1) is None  # no edit: nothing to compare
    paused = session(steps[:1], {"pause": "verdict", "image": "x", "edited_image": "y"}, 1)
    assert compared(paused, None) == ("x", "y")  # the edit the verdict is about


def test_status_and_rows():
    v = session([step(0)], {"pause": "plan"})
    v.run_id, v.status, v.best_score = "abc", "paused", None
    assert re.search(r"paused at \*\*plan\*\* \(iteration 1\)", status_line(v))
    v.pause, v.status = None, "interrupted"
    assert "Resume" in status_line(v)
    assert rows_of([[1, 2, 3, 4, "a", 0.5], ["", "", "", "", "", ""]]) == [[1, 2, 3, 4, "a", 0.5]]
    assert rows_of(None) == []
