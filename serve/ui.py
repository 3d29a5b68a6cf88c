"""The web UI (`artloop serve ui`): refine an image together with the agents, in a browser.

Start a session from a prompt, or from your own image (the loop then edits it), and watch it
run: the node, the iteration and a bar of the diffusion steps, as they happen. The image shows
the agents' boxes (serve/boxes.py); hovering a finding lights its box. At each pause, accept,
reject, edit the prompt or the parameters, or drag boxes on the image with a local prompt. Each
finished iteration sits in a timeline with its score; choosing one compares its image before and
after the edit, and forks a new session from it. Past sessions can be reopened, resumed and
exported. Sessions are the CLI's (graphs/runner.py): they survive restarts of the UI.

A refused input is said beside the field that caused it; nothing else on screen changes.

Binds 127.0.0.1 unless told otherwise; any other address needs a token (the password of the
login page), read from the environment or a file. serve/guard.py checks the bind before anything
starts, limits failed logins, and caps every request body (10 MB) and every uploaded image's
pixels (4096 x 4096) on every route. The image boxes are drawn on is the server's own (a State),
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
from artloop.graphs.sessions import fork_iteration, view
from artloop.serve.boxes import (
    AGENT_LAYERS,
    CANVAS_CSS,
    CANVAS_JS,
    agent_boxes,
    apply_op,
    canvas_html,
    iteration_agents,
    legend_html,
    region_boxes,
)
from artloop.serve.cards import TIMELINE_JS, findings_html, timeline_html
from artloop.serve.guard import MAX_UPLOAD_BYTES, Guard, UIError, check_serve
from artloop.serve.progress import Progress
from artloop.serve.screen import (
    REGION_COLUMNS,
    answer_from,
    compared,
    focus_digest,
    regions_from_proposal,
    rows_of,
    status_line,
)
from artloop.store.export import ExportError, ExportFilters, export_dataset
from artloop.store.trajectories import StoreError, new_run_id
from artloop.tools.images import ImageStoreError, import_image
from starlette.middleware import Middleware


def ui_dir(ctx: RefineContext) -> Path:
    """Where the UI writes its own files (export zips): under the home."""
    path = ctx.store.home / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_app(ctx: RefineContext) -> gr.Blocks:
    """The Gradio app over one context (models load on the first session)."""
    store = ctx.store
    scratch = ui_dir(ctx)

    def url(digest: str) -> str:  # served from the image store (an allowed path)
        return f"gradio_api/file={store.images.path(digest)}"

    def path(digest: str | None) -> str | None:
        return str(store.images.path(digest)) if digest else None

    # --- what a session looks like on screen ----------------------------------------------
    def canvas(focus: str | None, overlay: list, layers: list[str], rows: list, pending=None):
        boxes = [*overlay, *region_boxes(rows)]
        return canvas_html(url(focus) if focus else None, boxes, layers, pending)

    def comparison(v: Any, selected: int | None) -> dict:
        """The timeline, with `selected`'s before and after (None: the latest edit)."""
        pair = compared(v, selected)
        return {
            timeline: timeline_html(v, url, selected),
            compare: gr.update(
                value=(path(pair[0]), path(pair[1])) if pair else None, visible=pair is not None
            ),
            fork_btn: gr.update(visible=bool(v.steps)),
            chosen: selected,
        }

    def screen(run_id: str, log: str, layers: list[str], selected: int | None = None) -> dict:
        v = view(store, run_id)
        paused = v.pause is not None
        point = v.pause["pause"] if paused else ""
        proposal = v.pause["proposal"] if paused else {}
        prompt = proposal.get("prompt") or proposal.get("revised_prompt") or ""
        params = proposal.get("params", {}) if point == "prompt" else {}
        editable = point in ("prompt", "plan")  # the verdict is accepted or rejected, not edited
        live = v.step if paused else None
        focus = focus_digest(v)  # kept server-side (`shown`): boxes are drawn on it
        iteration, agents = iteration_agents(v, focus, (live or {}).get("agents"))
        overlay = agent_boxes(agents, iteration)
        rows = regions_from_proposal(v)
        return {
            run_state: run_id,
            log_box: log,
            status: status_line(v),
            image: canvas(focus, overlay, layers, rows),
            **comparison(v, selected),
            found: findings_html(v, live),
            panel: gr.update(visible=paused),
            point_box: point,
            edit_prompt: gr.update(  # no prompt to edit at the verdict
                value=prompt,
                visible=editable,
                label="Revised prompt" if point == "plan" else "Prompt",
            ),
            edit_negative: gr.update(value=proposal.get("negative_prompt", ""), visible=editable),
            seed: params.get("seed"),
            steps: params.get("num_inference_steps"),
            guidance: params.get("guidance_scale"),
            regions_table: rows,
            pending: None,
            box: "",
            accept_btn: gr.update(visible=point == "verdict"),
            reject_btn: gr.update(visible=point == "verdict"),
            edit_btn: gr.update(visible=editable),
            params_row: gr.update(visible=point == "prompt"),
            boxes_col: gr.update(visible=point == "plan"),
            shown: focus,
            overlay_state: overlay,
            start_error: "",
            answer_error: "",
            box_error: "",
        }

    def stream(work, run_id: str, log: str, layers: list[str], max_iters: int) -> Iterator[dict]:
        """Run `work(on_update, on_event)` in a thread: the progress after every event, the
        whole screen after every node."""
        updates: queue.Queue = queue.Queue()
        error: list[str] = []
        now = Progress(max_iters)

        def target() -> None:
            try:
                work(lambda name, _: updates.put(("node", name)), lambda e: updates.put(("ev", e)))
            except Exception as e:  # shown in the log; the session stays resumable
                error.append(f"{type(e).__name__}: {e}")
            finally:
                updates.put(None)

        threading.Thread(target=target, daemon=True).start()
        while (item := updates.get()) is not None:
            kind, payload = item
            if kind == "ev":
                now.feed(payload)
                if updates.empty():  # behind: skip to the newest
                    yield {progress: now.html()}
                continue
            log += f"{payload}\n"
            yield screen(run_id, log, layers) | {progress: now.html()}
        if error:
            log += f"error: {error[0]}\n"
            gr.Warning(error[0])
        yield screen(run_id, log, layers) | {progress: ""}

    # --- what a person does ---------------------------------------------------------------
    def start(
        prompt: str, upload: str | None, pause_at: list[str], max_iters: float, layers: list[str]
    ) -> Iterator[dict]:
        local = replace(ctx, loop=ctx.loop.model_copy(update={"max_iters": int(max_iters)}))
        try:
            prompt = validate_prompt(prompt)
            size = (ctx.diffusion_config.width, ctx.diffusion_config.height)
            init = import_image(store.images, upload, size) if upload else None
        except (ConfigError, ImageStoreError) as e:
            yield {start_error: f"**{e}**"}
            return
        run_id = new_run_id()
        config = {"loop": local.loop.model_dump(), "ui": True}
        yield from stream(
            lambda on_update, on_event: run_session(
                local,
                prompt=prompt,
                run_id=run_id,
                config=config,
                pause_at=pause_at,
                init_image=init,
                on_update=on_update,
                on_event=on_event,
            ),
            run_id,
            f"session {run_id}: {prompt}" + (" (from your image)\n" if init else "\n"),
            layers,
            local.loop.max_iters,
        )

    def resume(run_id: str, log: str, reply: dict | None, layers: list[str]) -> Iterator[dict]:
        if not run_id:
            yield {answer_error: "**no session: start one or open a past one**"}
            return
        try:  # a bad answer fails here, before anything runs: the session stays paused
            stored = store.get_run(run_id)["config"].get("loop")  # the session's own loop rules
            local = replace(ctx, loop=type(ctx.loop)(**stored)) if stored else ctx
            v = view(store, run_id)
            if v.pause is not None:
                check_action(v.pause["pause"], reply)
        except (HumanActionError, StoreError) as e:
            yield {answer_error: f"**{e}**"}
            return
        yield from stream(
            lambda on_update, on_event: run_session(
                local, run_id=run_id, answer=reply, on_update=on_update, on_event=on_event
            ),
            run_id,
            log + f"answer: {json.dumps(reply)}\n",
            layers,
            local.loop.max_iters,
        )

    def answer(action: str):
        def handler(run_id, log, point, prompt, negative, seed, steps, guidance, regions, layers):
            try:
                reply = answer_from(action, point, prompt, negative, seed, steps, guidance, regions)
            except HumanActionError as e:
                yield {answer_error: f"**{e}**"}
                return
            yield from resume(run_id, log, reply, layers)

        return handler

    def on_canvas(
        focus: str | None, overlay: list, layers: list[str], regions: Any, evt: gr.EventData
    ) -> dict:
        """A box drawn, moved, resized or deleted on the image (serve/boxes.py's CANVAS_JS)."""
        op = {k: getattr(evt, k, None) for k in ("op", "box", "index")}
        try:
            rows, drawn = apply_op(rows_of(regions), op)
        except ValueError as e:
            return {box_error: f"**{e}**"}
        out = {regions_table: rows, image: canvas(focus, overlay, layers, rows, drawn)}
        if drawn:  # waits for its local prompt
            out |= {box: ",".join(map(str, drawn)), pending: drawn}
        return out | {box_error: ""}

    def add_box(
        box_text: str,
        local_prompt: str,
        strength: float,
        regions: Any,
        focus: str | None,
        overlay: list,
        layers: list[str],
    ) -> dict:
        try:
            coords = [int(float(c)) for c in box_text.split(",")]
        except ValueError:
            return {box_error: f"**box {box_text!r} is not four numbers x1,y1,x2,y2 (0-1000)**"}
        if len(coords) != 4 or not local_prompt.strip():
            return {box_error: "**a box edit needs a box (drag on the image) and a local prompt**"}
        rows = [*rows_of(regions), [*coords, local_prompt, strength]]
        return {
            regions_table: rows,
            box: "",
            local: "",
            pending: None,
            image: canvas(focus, overlay, layers, rows),
            box_error: "",
        }

    def redraw(focus: str | None, overlay: list, layers: list[str], regions: Any, drawn: Any):
        return canvas(focus, overlay, layers, rows_of(regions), drawn)

    def select(run_id: str, evt: gr.EventData) -> dict:
        """A timeline tile chosen: its before/after, and the iteration "fork" starts from."""
        if not run_id:
            return {}
        return comparison(view(store, run_id), int(evt.iteration))

    def fork(run_id: str, log: str, layers: list[str], selected: int | None) -> dict:
        try:
            v = view(store, run_id)
            iteration = selected if selected is not None else len(v.steps) - 1
            new_id = fork_iteration(store, run_id, iteration)
        except StoreError as e:
            return {answer_error: f"**cannot fork: {e}**"}
        said = f"forked {run_id} at iteration {iteration + 1} as {new_id}: press Resume to run it\n"
        return screen(new_id, log + said, layers) | {past: sessions_list(new_id)}

    def sessions_list(chosen_id: str | None = None) -> gr.update:
        runs = store.list_runs(200)
        choices = [(f"{r['run_id']}  {r['status']}  {r['prompt'][:60]}", r["run_id"]) for r in runs]
        return (
            gr.update(choices=choices, value=chosen_id) if chosen_id else gr.update(choices=choices)
        )

    def open_session(run_id: str | None, layers: list[str]) -> dict:
        if not run_id:
            return {answer_error: "**choose a session first**"}
        return screen(run_id, f"opened session {run_id}\n", layers)

    def resume_chosen(chosen_id: str | None, log: str, layers: list[str]):
        yield from resume(chosen_id or "", log, None, layers)

    def export(run_id: str) -> dict:
        if not run_id:
            return {answer_error: "**no session to export**"}
        with tempfile.TemporaryDirectory() as tmp:  # exports go outside the home; the zip in
            out = Path(tmp) / f"export-{run_id}"
            try:
                export_dataset(store, out, "raw", ExportFilters(run_ids=(run_id,)))
            except ExportError as e:
                return {answer_error: f"**{e}**"}
            return {export_file: shutil.make_archive(str(scratch / out.name), "zip", out)}

    # --- the page -------------------------------------------------------------------------
    with gr.Blocks(title="artloop", analytics_enabled=False) as app:
        gr.Markdown("## artloop: refine an image with the agents")
        run_state, shown, pending = gr.State(""), gr.State(None), gr.State(None)
        overlay_state = gr.State([])  # the shown iteration's agents' boxes (agent_boxes)
        chosen = gr.State(None)  # the timeline's chosen iteration
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=2)
                upload = gr.Image(
                    label="Start from your image (optional)",
                    type="filepath",
                    sources=["upload"],
                    elem_id="upload",
                    height=180,
                )
                start_error = gr.Markdown("", elem_id="start-error")
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
                log_box = gr.Textbox(label="Log (node by node)", lines=6, elem_id="log")
            with gr.Column(scale=2):
                status = gr.Markdown("No session yet.", elem_id="status")
                progress = gr.HTML("", elem_id="progress")
                image = gr.HTML(
                    canvas_html(None, []),
                    css_template=CANVAS_CSS,
                    js_on_load=CANVAS_JS,
                    elem_id="canvas",
                )
                box_layers = gr.CheckboxGroup(
                    AGENT_LAYERS,
                    value=AGENT_LAYERS,
                    label="The agents' boxes on the image (hover a finding to light its box)",
                    elem_id="box-layers",
                )
                gr.HTML(legend_html(), elem_id="box-legend")
                with gr.Group(visible=False, elem_id="pause-panel") as panel:
                    point_box = gr.Textbox(label="Pause", interactive=False, elem_id="pause-point")
                    edit_prompt = gr.Textbox(label="Prompt", elem_id="edit-prompt")
                    edit_negative = gr.Textbox(label="Negative prompt", elem_id="edit-negative")
                    with gr.Row(visible=False) as params_row:
                        seed = gr.Number(label="Seed", precision=0, elem_id="seed")
                        steps = gr.Number(label="Steps", precision=0, elem_id="steps")
                        guidance = gr.Number(label="Guidance", elem_id="guidance")
                    with gr.Column(visible=False) as boxes_col:  # the plan's box edits
                        gr.Markdown("Drag on the image to draw a box, then name what goes in it.")
                        with gr.Row():
                            box = gr.Textbox(label="Box x1,y1,x2,y2 (0-1000)", elem_id="box")
                            local = gr.Textbox(label="Local prompt", elem_id="local-prompt")
                            strength = gr.Slider(0.1, 1.0, value=0.6, step=0.05, label="Strength")
                        add_btn = gr.Button("Add box edit", elem_id="add-box")
                        box_error = gr.Markdown("", elem_id="box-error")
                        regions_table = gr.Dataframe(
                            headers=REGION_COLUMNS,
                            interactive=True,
                            elem_id="regions",
                            label="Box edits (edit or delete rows, or on the image)",
                        )
                    with gr.Row():
                        agent_btn = gr.Button("Let the agent decide", elem_id="agent")
                        edit_btn = gr.Button("Apply my edit", variant="primary", elem_id="apply")
                        accept_btn = gr.Button("Accept", elem_id="accept")
                        reject_btn = gr.Button("Reject", elem_id="reject")
                answer_error = gr.Markdown("", elem_id="answer-error")
            with gr.Column(scale=2):
                gr.Markdown("**Iterations** (choose one to compare it and fork from it)")
                timeline = gr.HTML("", js_on_load=TIMELINE_JS, elem_id="timeline")
                compare = gr.ImageSlider(
                    label="Before / after the edit",
                    type="filepath",
                    visible=False,
                    elem_id="compare",
                    max_height=420,
                )
                fork_btn = gr.Button(
                    "Fork a new session from this iteration", visible=False, elem_id="fork"
                )
                gr.Markdown("**Agents' findings** (newest first)")
                found = gr.HTML("<p>No findings yet.</p>", elem_id="findings")

        outputs = [
            run_state,
            log_box,
            status,
            progress,
            image,
            timeline,
            compare,
            fork_btn,
            chosen,
            found,
            panel,
            point_box,
            edit_prompt,
            edit_negative,
            seed,
            steps,
            guidance,
            regions_table,
            pending,
            box,
            local,
            accept_btn,
            reject_btn,
            edit_btn,
            params_row,
            boxes_col,
            shown,
            overlay_state,
            start_error,
            answer_error,
            box_error,
            past,
            export_file,
        ]
        start_btn.click(start, [prompt, upload, pause_at, max_iters, box_layers], outputs)
        inputs = [run_state, log_box, point_box, edit_prompt, edit_negative, seed, steps, guidance]
        inputs += [regions_table, box_layers]
        for button, action in (
            (agent_btn, "agent"),
            (edit_btn, "edit"),
            (accept_btn, "accept"),
            (reject_btn, "reject"),
        ):
            button.click(answer(action), inputs, outputs)
        continue_btn.click(resume_chosen, [past, log_box, box_layers], outputs)
        # The image boxes are drawn on is the server's State, not the client's.
        image.submit(on_canvas, [shown, overlay_state, box_layers, regions_table], outputs)
        add_btn.click(
            add_box,
            [box, local, strength, regions_table, shown, overlay_state, box_layers],
            outputs,
        )
        redrawn = [shown, overlay_state, box_layers, regions_table, pending]
        box_layers.change(redraw, redrawn, image)
        regions_table.input(redraw, redrawn, image)  # a row typed in the table
        timeline.click(select, [run_state], outputs)
        fork_btn.click(fork, [run_state, log_box, box_layers, chosen], outputs)
        refresh_btn.click(lambda: sessions_list(), None, past)
        open_btn.click(open_session, [past, box_layers], outputs)
        export_btn.click(export, run_state, outputs)
        app.load(lambda: sessions_list(), None, past)
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
