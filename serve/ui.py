"""The web UI (`artloop serve ui`): refine an image together with the agents, in a browser.

Start a session from a prompt and watch it run node by node; every iteration's image sits beside
the edited one with the agents' findings; at each pause, accept, reject, edit the prompt or the
parameters, or draw a box on the image (two clicks: opposite corners) with a local prompt.
Past sessions can be reopened, resumed and exported. Sessions are the same as the CLI's
(graphs/runner.py): they survive restarts of the UI.

Binds 127.0.0.1 unless told otherwise; any other address needs a token (the password of the
login page), read from the environment or a file. serve/guard.py checks the bind before anything
starts, limits failed logins, and caps every request body (10 MB) and every uploaded image's
pixels (4096 x 4096) on every route. The image a box is drawn on is the server's own (a State),
never one a client sends. Gradio's analytics are off.
"""

from __future__ import annotations

import json
import queue
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
from artloop.config import ConfigError, validate_prompt
from artloop.graphs.context import RefineContext
from artloop.graphs.human import HumanActionError, check_action
from artloop.graphs.runner import CheckpointerError, open_checkpointer, run_session
from artloop.graphs.sessions import SessionView, live_agents, view
from artloop.serve.boxes import (
    AGENT_LAYERS,
    agent_boxes,
    draw_boxes,
    iteration_agents,
    legend_html,
    shown_size,
)
from artloop.serve.cards import findings_html
from artloop.serve.guard import MAX_UPLOAD_BYTES, Guard, UIError, check_serve
from artloop.store.export import ExportError, ExportFilters, export_dataset
from artloop.store.trajectories import StoreError, new_run_id
from artloop.tools.images import ImageStoreError, check_pixels
from starlette.middleware import Middleware

REGION_COLUMNS = ["x1", "y1", "x2", "y2", "prompt", "strength"]


# --- what a session looks like on screen --------------------------------------------------------
def gallery(store: Any, v: SessionView) -> list[tuple[str, str]]:
    """(image path, caption) for every finished iteration's before and after, then the images
    of the iteration under way."""
    items = []
    for step in v.steps:
        n, who = step["iteration"] + 1, step.get("decided_by", {}).get("verdict", "agent")
        items.append((str(store.images.path(step["image"])), f"{n}: generated"))
        if step.get("edited_image"):  # a loop with no edit modes has none
            items.append(
                (
                    str(store.images.path(step["edited_image"])),
                    f"{n}: edited, {step.get('verdict')} {step.get('score')} ({who})",
                )
            )
    if v.pause and v.iteration >= len(v.steps):
        for key, what in (("image", "generated"), ("edited_image", "edited")):
            if v.pause.get(key):
                items.append((str(store.images.path(v.pause[key])), f"{v.iteration + 1}: {what}"))
    return items


def status_line(v: SessionView) -> str:
    if v.pause:
        return (
            f"**{v.run_id}**: paused at **{v.pause['pause']}** (iteration {v.iteration + 1}) "
            f"- your turn"
        )
    best = f", best score {v.best_score}" if v.best_score is not None else ""
    return f"**{v.run_id}**: {v.status} after {len(v.steps)} iteration(s){best}"


def focus_digest(v: SessionView) -> str | None:
    """The image to look at (and draw boxes on): the pause's, else the best so far."""
    digest = None
    if v.pause:
        digest = v.pause.get("edited_image") or v.pause.get("image")
    last = v.steps[-1] if v.steps else {}
    return digest or v.best_image or last.get("edited_image") or last.get("image")


def focus_image(store: Any, v: SessionView) -> str | None:
    digest = focus_digest(v)
    return str(store.images.path(digest)) if digest else None


def regions_from_proposal(v: SessionView) -> list[list]:
    if not v.pause or v.pause["pause"] != "plan":
        return []
    return [[*r["box"], r["prompt"], r["strength"]] for r in v.pause["proposal"]["regional_edits"]]


def box_from_clicks(
    first: tuple[int, int], second: tuple[int, int], size: tuple[int, int]
) -> list[int]:
    """Two clicked corners (pixels) as a box normalised to 0-1000 (x1, y1, x2, y2)."""
    (ax, ay), (bx, by), (w, h) = first, second, size
    x1, x2 = sorted((ax, bx))
    y1, y2 = sorted((ay, by))
    return [round(x1 * 1000 / w), round(y1 * 1000 / h), round(x2 * 1000 / w), round(y2 * 1000 / h)]


def region_boxes(regions: Any) -> list[dict]:
    """The person's box edits (the regions table's rows) as the "yours" layer."""
    rows = regions.values.tolist() if hasattr(regions, "values") else list(regions or [])
    out = []
    for r in rows:
        try:
            out.append({"layer": "yours", "box": [float(c) for c in r[:4]], "label": str(r[4])})
        except (ValueError, TypeError, IndexError):
            continue  # a row being typed in
    return out


def answer_from(
    action: str,
    point: str,
    prompt: str,
    negative: str,
    seed: Any,
    steps: Any,
    guidance: Any,
    regions: Any,
) -> dict:
    """The HumanAction fields from the pause panel's inputs (checked by the graph's rules)."""
    if action != "edit":
        return {"action": action}
    if point == "prompt":
        params = {
            k: v
            for k, v in (
                ("seed", seed),
                ("num_inference_steps", steps),
                ("guidance_scale", guidance),
            )
            if v not in (None, "")
        }
        params = {k: (float(v) if k == "guidance_scale" else int(v)) for k, v in params.items()}
        return {"action": "edit", "prompt": prompt, "negative_prompt": negative, "params": params}
    rows = regions.values.tolist() if hasattr(regions, "values") else (regions or [])
    rows = [r for r in rows if any(str(c).strip() for c in r)]
    try:
        boxes = [
            {
                "box": [int(float(c)) for c in r[:4]],
                "prompt": str(r[4]),
                "strength": float(r[5] or 0.6),
            }
            for r in rows
        ]
    except (ValueError, IndexError) as e:
        raise HumanActionError(
            f"a box edit row is not x1, y1, x2, y2, prompt, strength: {e}"
        ) from None
    return {"action": "edit", "prompt": prompt, "negative_prompt": negative, "regions": boxes}


# --- the app ------------------------------------------------------------------------------------
def ui_dir(ctx: RefineContext) -> Path:
    """Where the UI writes its own files (box overlays, export zips): under the home."""
    path = ctx.store.home / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_app(ctx: RefineContext) -> gr.Blocks:
    """The Gradio app over one context (models load on the first session)."""
    store = ctx.store
    scratch = ui_dir(ctx)

    def screen(run_id: str, log: str, layers: list[str]) -> tuple:
        v = view(store, run_id)
        paused = v.pause is not None
        point = v.pause["pause"] if paused else ""
        proposal = v.pause["proposal"] if paused else {}
        prompt = proposal.get("prompt") or proposal.get("revised_prompt") or ""
        params = proposal.get("params", {}) if point == "prompt" else {}
        editable = point in ("prompt", "plan")  # the verdict is accepted or rejected, not edited
        focus = focus_image(store, v)  # kept server-side (`shown`) to draw boxes on
        live = live_agents(store, run_id) if paused else None
        overlay = agent_boxes(iteration_agents(v, focus_digest(v), live))
        drawn = draw_boxes(focus, overlay, scratch, layers) if focus else None
        return (
            run_id,
            log,
            status_line(v),
            drawn,
            gallery(store, v),
            findings_html(v),
            gr.update(visible=paused),
            point,
            gr.update(  # no prompt to edit at the verdict
                value=prompt,
                visible=editable,
                label="Revised prompt" if point == "plan" else "Prompt",
            ),
            gr.update(value=proposal.get("negative_prompt", ""), visible=editable),
            params.get("seed"),
            params.get("num_inference_steps"),
            params.get("guidance_scale"),
            regions_from_proposal(v),
            [],
            *[gr.update(visible=point == "verdict")] * 2,  # accept, reject
            gr.update(visible=editable),  # apply my edit
            gr.update(visible=point == "prompt"),
            gr.update(visible=point == "plan"),
            focus,
            overlay,
        )

    def stream(work, run_id: str, log: str, layers: list[str]) -> Iterator[tuple]:
        """Run `work(on_update)` in a thread; yield the screen after every node."""
        updates: queue.Queue = queue.Queue()
        error: list[str] = []

        def target() -> None:
            try:
                work(lambda name, update: updates.put(name))
            except Exception as e:  # shown in the log; the session stays resumable
                error.append(f"{type(e).__name__}: {e}")
            finally:
                updates.put(None)

        threading.Thread(target=target, daemon=True).start()
        while (name := updates.get()) is not None:
            log += f"{name}\n"
            yield screen(run_id, log, layers)
        if error:
            log += f"error: {error[0]}\n"
            gr.Warning(error[0])
        yield screen(run_id, log, layers)

    def start(
        prompt: str, pause_at: list[str], max_iters: float, layers: list[str]
    ) -> Iterator[tuple]:
        try:
            prompt = validate_prompt(prompt)
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        run_id = new_run_id()
        local = replace(ctx, loop=ctx.loop.model_copy(update={"max_iters": int(max_iters)}))
        config = {"loop": local.loop.model_dump(), "ui": True}
        yield from stream(
            lambda cb: run_session(
                local, prompt=prompt, run_id=run_id, config=config, pause_at=pause_at, on_update=cb
            ),
            run_id,
            f"session {run_id}: {prompt}\n",
            layers,
        )

    def resume(run_id: str, log: str, answer: dict | None, layers: list[str]) -> Iterator[tuple]:
        if not run_id:
            raise gr.Error("no session: start one or open a past one")
        try:  # a bad answer fails here, before anything runs: the session stays paused
            stored = store.get_run(run_id)["config"].get("loop")  # the session's own loop rules
            local = replace(ctx, loop=type(ctx.loop)(**stored)) if stored else ctx
            v = view(store, run_id)
            if v.pause is not None:
                check_action(v.pause["pause"], answer)
        except (HumanActionError, StoreError) as e:
            raise gr.Error(str(e)) from None
        yield from stream(
            lambda cb: run_session(local, run_id=run_id, answer=answer, on_update=cb),
            run_id,
            log + f"answer: {json.dumps(answer)}\n",
            layers,
        )

    def answer(action: str):
        def handler(run_id, log, point, prompt, negative, seed, steps, guidance, regions, layers):
            try:
                reply = answer_from(action, point, prompt, negative, seed, steps, guidance, regions)
            except HumanActionError as e:
                raise gr.Error(str(e)) from None
            yield from resume(run_id, log, reply, layers)

        return handler

    def click(image_path: str | None, clicks: list, evt: gr.SelectData):
        """Two clicks on the image: opposite corners of a box."""
        if not image_path:
            return gr.update(), clicks
        clicks = [*clicks, list(evt.index)]
        if len(clicks) < 2:
            return gr.update(), clicks
        try:
            size = shown_size(check_pixels(image_path))  # the image is shown upscaled
        except ImageStoreError as e:
            raise gr.Error(str(e)) from None
        return ",".join(map(str, box_from_clicks(tuple(clicks[0]), tuple(clicks[1]), size))), []

    def resume_chosen(chosen: str | None, log: str, layers: list[str]):
        yield from resume(chosen or "", log, None, layers)

    def redraw(image_path: str | None, overlay: list, layers: list[str], regions: Any):
        """The shown image again, with the agents' boxes of `layers` and the person's."""
        if not image_path:
            return gr.update()
        return draw_boxes(
            image_path, [*overlay, *region_boxes(regions)], scratch, layers + ["yours"]
        )

    def add_box(
        box: str,
        local_prompt: str,
        strength: float,
        regions: Any,
        image_path: str | None,
        overlay: list,
        layers: list[str],
    ):
        try:
            coords = [int(float(c)) for c in box.split(",")]
        except ValueError:
            raise gr.Error(f"box {box!r} is not four numbers x1,y1,x2,y2 (0-1000)") from None
        if len(coords) != 4 or not local_prompt.strip():
            raise gr.Error("a box edit needs x1,y1,x2,y2 and a local prompt")
        rows = regions.values.tolist() if hasattr(regions, "values") else list(regions or [])
        rows = [r for r in rows if any(str(c).strip() for c in r)] + [
            [*coords, local_prompt, strength]
        ]
        return rows, "", "", redraw(image_path, overlay, layers, rows)

    def sessions_list() -> gr.update:
        runs = store.list_runs(200)
        return gr.update(
            choices=[
                (f"{r['run_id']}  {r['status']}  {r['prompt'][:60]}", r["run_id"]) for r in runs
            ]
        )

    def open_session(run_id: str | None, layers: list[str]):
        if not run_id:
            raise gr.Error("choose a session first")
        return screen(run_id, f"opened session {run_id}\n", layers)

    def export(run_id: str):
        if not run_id:
            raise gr.Error("no session to export")
        with tempfile.TemporaryDirectory() as tmp:  # exports go outside the home; the zip in
            out = Path(tmp) / f"export-{run_id}"
            try:
                export_dataset(store, out, "raw", ExportFilters(run_ids=(run_id,)))
            except ExportError as e:
                raise gr.Error(str(e)) from None
            return shutil.make_archive(str(scratch / out.name), "zip", out)

    with gr.Blocks(title="artloop", analytics_enabled=False) as app:
        gr.Markdown("## artloop: refine an image with the agents")
        run_id, clicks, shown = gr.State(""), gr.State([]), gr.State(None)
        overlay = gr.State([])  # the shown iteration's agents' boxes (agent_boxes)
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=2)
                plans = ctx.loop.plans  # a loop variant without Thesis-CoT has no plan to show
                pause_at = gr.CheckboxGroup(
                    ["prompt", "plan", "verdict"] if plans else ["prompt", "verdict"],
                    value=["plan", "verdict"] if plans else ["verdict"],
                    label="Pause for me at",
                    elem_id="pause-at",
                )
                max_iters = gr.Slider(
                    1, 10, value=ctx.loop.max_iters, step=1, label="Iterations at most"
                )
                start_btn = gr.Button("Start session", variant="primary", elem_id="start")
                past = gr.Dropdown(label="Past sessions", choices=[], elem_id="sessions")
                with gr.Row():
                    refresh_btn = gr.Button("Refresh", elem_id="refresh")
                    open_btn = gr.Button("Open", elem_id="open")
                    continue_btn = gr.Button("Resume", elem_id="resume")
                export_btn = gr.Button("Export session (raw)", elem_id="export")
                export_file = gr.File(label="Export", elem_id="export-file")
            with gr.Column(scale=2):
                status = gr.Markdown("No session yet.", elem_id="status")
                image = gr.Image(
                    label="Image: click two opposite corners to draw a box",
                    type="filepath",
                    interactive=False,
                    elem_id="canvas",
                )
                box_layers = gr.CheckboxGroup(
                    AGENT_LAYERS,
                    value=AGENT_LAYERS,
                    label="The agents' boxes on the image",
                    elem_id="box-layers",
                )
                gr.HTML(legend_html(), elem_id="box-legend")
                with gr.Group(visible=False, elem_id="pause-panel") as panel:
                    point = gr.Textbox(label="Pause", interactive=False, elem_id="pause-point")
                    edit_prompt = gr.Textbox(label="Prompt", elem_id="edit-prompt")
                    edit_negative = gr.Textbox(label="Negative prompt", elem_id="edit-negative")
                    with gr.Row(visible=False) as params_row:
                        seed = gr.Number(label="Seed", precision=0, elem_id="seed")
                        steps = gr.Number(label="Steps", precision=0, elem_id="steps")
                        guidance = gr.Number(label="Guidance", elem_id="guidance")
                    with gr.Column(visible=False) as boxes_col:  # the plan's box edits
                        with gr.Row():
                            box = gr.Textbox(label="Box x1,y1,x2,y2 (0-1000)", elem_id="box")
                            local_prompt = gr.Textbox(label="Local prompt", elem_id="local-prompt")
                            strength = gr.Slider(0.1, 1.0, value=0.6, step=0.05, label="Strength")
                        add_btn = gr.Button("Add box edit", elem_id="add-box")
                        regions = gr.Dataframe(
                            headers=REGION_COLUMNS,
                            interactive=True,
                            elem_id="regions",
                            label="Box edits (edit or delete rows)",
                        )
                    with gr.Row():
                        agent_btn = gr.Button("Let the agent decide", elem_id="agent")
                        edit_btn = gr.Button("Apply my edit", variant="primary", elem_id="apply")
                        accept_btn = gr.Button("Accept", elem_id="accept")
                        reject_btn = gr.Button("Reject", elem_id="reject")
                log = gr.Textbox(label="Progress (node by node)", lines=8, elem_id="log")
            with gr.Column(scale=2):
                shots = gr.Gallery(label="Iterations", columns=2, height=420, elem_id="gallery")
                gr.Markdown("**Agents' findings** (newest first)")
                found = gr.HTML("<p>No findings yet.</p>", elem_id="findings")

        outputs = [
            run_id,
            log,
            status,
            image,
            shots,
            found,
            panel,
            point,
            edit_prompt,
            edit_negative,
            seed,
            steps,
            guidance,
            regions,
            clicks,
            accept_btn,
            reject_btn,
            edit_btn,
            params_row,
            boxes_col,
            shown,
            overlay,
        ]
        start_btn.click(start, [prompt, pause_at, max_iters, box_layers], outputs)
        inputs = [run_id, log, point, edit_prompt, edit_negative, seed, steps, guidance, regions]
        inputs.append(box_layers)
        for button, action in (
            (agent_btn, "agent"),
            (edit_btn, "edit"),
            (accept_btn, "accept"),
            (reject_btn, "reject"),
        ):
            button.click(answer(action), inputs, outputs)
        continue_btn.click(resume_chosen, [past, log, box_layers], outputs)
        # The image path comes from the server's State, not the client: no route takes an image.
        image.select(click, [shown, clicks], [box, clicks])
        add_btn.click(
            add_box,
            [box, local_prompt, strength, regions, shown, overlay, box_layers],
            [regions, box, local_prompt, image],
        )
        box_layers.change(redraw, [shown, overlay, box_layers, regions], image)
        refresh_btn.click(sessions_list, None, past)
        open_btn.click(open_session, [past, box_layers], outputs)
        export_btn.click(export, run_id, export_file)
        app.load(sessions_list, None, past)
    return app


def serve(
    ctx: RefineContext,
    host: str = "127.0.0.1",
    port: int = 7860,
    token: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Launch the UI and block; `on_ready` is called once it listens. A non-loopback `host`
    requires a `token`; a bind that cannot work raises UIError before anything starts."""
    token = check_serve(host, port, token)
    auth = (
        (lambda _user, password: secrets.compare_digest(password.encode(), token.encode()))
        if token
        else None
    )
    try:
        with open_checkpointer(ctx.store):  # the UI's one saver for all its sessions
            app = build_app(ctx)
            try:
                app.launch(
                    server_name=host,
                    server_port=port,
                    auth=auth,
                    max_file_size=MAX_UPLOAD_BYTES,
                    prevent_thread_lock=True,
                    app_kwargs={"middleware": [Middleware(Guard)]},
                    allowed_paths=[str(ctx.store.images.root), str(ui_dir(ctx))],
                    show_error=True,
                    quiet=True,
                )
            except OSError as e:  # the port was taken since check_serve
                raise UIError(f"cannot listen on {host}:{port}: {e}") from None
            if on_ready is not None:
                on_ready()
            app.block_thread()
    except CheckpointerError as e:  # raised only when it cannot be opened
        raise UIError(str(e)) from e
