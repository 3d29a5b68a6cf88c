"""The trajectory store and the content-addressed image store, on real SQLite and files."""

from __future__ import annotations

import hashlib
import io
import threading

import pytest
from artloop.store.trajectories import StoreError, TrajectoryStore, new_run_id
from artloop.tools.images import ImageStoreError
from PIL import Image


def test_run_lifecycle(store):
    rid = new_run_id()
    store.create_run(rid, "a fox", {"loop": {"max_iters": 3}}, {"chat": {"model": "m"}}, "1")
    store.put_step(rid, 0, {"iteration": 0, "score": 4.0})
    store.put_step(rid, 1, {"iteration": 1, "score": 6.0})
    store.put_step(rid, 0, {"iteration": 0, "score": 4.5})  # a re-run node: replaces, no duplicate
    store.finish_run(rid, "max_iters", final_image="ab" * 32, best_score=6.0)
    run = store.get_run(rid)
    assert run["status"] == "max_iters" and run["best_score"] == 6.0
    assert [s["score"] for s in run["steps"]] == [4.5, 6.0]
    assert run["config"]["loop"]["max_iters"] == 3 and run["models"]["chat"]["model"] == "m"
    assert store.list_runs()[0]["iterations"] == 2


def test_creating_a_run_twice_keeps_the_first(store):
    rid = new_run_id()
    store.create_run(rid, "first", {}, {}, "1")
    store.create_run(rid, "second", {}, {}, "1")
    assert store.get_run(rid)["prompt"] == "first"


def test_data_survives_reopening(home):
    rid = new_run_id()
    TrajectoryStore(home).create_run(rid, "a fox", {}, {}, "1")
    assert TrajectoryStore(home).get_run(rid)["prompt"] == "a fox"


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "ABCDEF0123456789", "0" * 15, "0" * 17])
def test_malformed_run_ids_are_refused(store, bad):
    with pytest.raises(StoreError, match="not a run id"):
        store.get_run(bad)


def test_unknown_run(store):
    with pytest.raises(StoreError, match="no run 0000000000000000"):
        store.get_run("0000000000000000")


def test_concurrent_writers(store):
    """32 sessions (each with its own store object and connections) create, write steps and
    images, and finish at once: nothing lost, no 'database is locked'."""
    ids = [new_run_id() for _ in range(32)]
    errors = []
    start = threading.Barrier(len(ids))

    def session(rid):
        try:
            own = TrajectoryStore(store.home)
            start.wait()
            own.create_run(rid, "p", {}, {}, "1")
            for i in range(10):
                image = own.images.put(
                    Image.new("RGB", (8, 8), (i, len(rid) % 7, int(rid, 16) % 255))
                )
                own.put_step(rid, i, {"iteration": i, "image": image})
            own.finish_run(rid, "max_iters", final_image=image, best_score=1.0)
        except Exception as e:  # collected: a thread's exception would otherwise vanish
            errors.append(repr(e))

    threads = [threading.Thread(target=session, args=(rid,)) for rid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(store.get_run(rid)["steps"]) == 10 for rid in ids)
    assert {r["status"] for r in store.list_runs(limit=-1)} == {"max_iters"}


def test_images_are_content_addressed(store):
    red = Image.new("RGB", (32, 16), (255, 0, 0))
    digest = store.images.put(red)
    path = store.images.path(digest)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert store.images.put(red.copy()) == digest  # same pixels, same hash, one file
    assert store.images.get(digest).getpixel((0, 0)) == (255, 0, 0)
    assert digest in store.images and ("0" * 64) not in store.images


def test_bad_images_are_refused(store):
    with pytest.raises(ImageStoreError, match="not a readable image"):
        store.images.put_bytes(b"definitely not a png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    with pytest.raises(ImageStoreError, match="not a readable image"):
        store.images.put_bytes(buf.getvalue()[:40])  # truncated
    with pytest.raises(ImageStoreError, match="not an image hash"):
        store.images.get("../../x")
    with pytest.raises(ImageStoreError, match="no image"):
        store.images.get("0" * 64)


def test_decompression_bomb_is_refused(store, monkeypatch):
    import artloop.tools.images as images

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ImageStoreError, match="too large"):
        store.images.put_bytes(buf.getvalue())


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_images_in_other_modes_are_stored_as_rgb(store, mode):
    buf = io.BytesIO()
    Image.new(mode, (12, 8)).save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    digest = store.images.put_bytes(buf.getvalue())
    back = store.images.get(digest)
    assert back.mode == "RGB" and back.size == (12, 8)
