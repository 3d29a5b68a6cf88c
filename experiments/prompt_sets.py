"""An experiment's prompts: a local file (txt, csv/tsv, jsonl, json) or a named set, each prompt
with its categories (so that results split by category).

Named sets: `shapes` (held-out captions of the shapes world, built here, deterministic; and
`shapes-train`, `shapes-val`, its training and validation splits' captions) and the
field's benchmarks, each read from the first place that has it: a local copy of its own file
(`prompts.file`), a package's cache that holds it (hpsv2 keeps its benchmark prompts under
$HPS_ROOT, default ~/.cache/hpsv2), or its Hugging Face dataset (a machine with hub access, or
one whose hub cache already holds it). No package ships these prompts in its wheel (hpsv2 and
tifascore fetch them at run time), so nothing else is tried.

| set | Hugging Face dataset | categories |
| --- | --- | --- |
| drawbench | sayakpaul/drawbench (Prompts, Category) | its 11 categories |
| partiprompts | nateraw/parti-prompts (Prompt, Category) | its 12 categories |
| genai-bench | BaiqiL/GenAI-Bench-1600 (genai_image.json, genai_skills.json) | basic, advanced and each skill |
| hpsv2 | zhwang/HPDv2 (benchmark/<style>.json) | anime, concept-art, paintings, photo |
| tifa-v1.0 | none: tifa_v1.0_text_inputs.json from the TIFA repository, as prompts.file | coco, drawbench, partiprompt, paintskill (from the ids) |
"""

from __future__ import annotations

# Deliberately lazy: datasets and huggingface_hub are imported inside the loaders that use them.
import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from artloop.config import ConfigError, validate_prompt
from artloop.world.language import Spec
from artloop.world.scenes import sample_scenes


class PromptSetError(ValueError):
    """A prompt set cannot be found or read; the message names it."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt: a stable id (the source's, else from the text), the text, its categories."""

    id: str
    prompt: str
    categories: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "categories": list(self.categories)}


@dataclass(frozen=True)
class NamedSet:
    name: str
    title: str
    hub: str | None  # its Hugging Face dataset id, if it has one
    load: Callable[[Path | None], list[PromptItem]]
    aliases: tuple[str, ...] = field(default=())


# --- ids and rows ------------------------------------------------------------------------------
def _text_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:10]


def _items(rows: Iterable[tuple[str | None, str, Iterable[str]]], where: str) -> list[PromptItem]:
    """PromptItems from (id or None, prompt, categories) rows, each prompt checked. A row
    without an id is named by its text (a repeat by its text and occurrence), so that a file
    reordered or extended keeps every prompt's id, and so its runs."""
    items, seen = [], set()
    for number, (given, prompt, categories) in enumerate(rows, 1):
        try:
            text = validate_prompt(prompt if isinstance(prompt, str) else "")
        except ConfigError as e:
            raise PromptSetError(f"{where}: prompt {given or number}: {e}") from None
        base = str(given) if given not in (None, "") else _text_id(text)
        ident, k = base, 1
        while ident in seen:
            k += 1
            ident = f"{base}-{k}"
        seen.add(ident)
        cats = tuple(dict.fromkeys(str(c).strip() for c in categories if str(c).strip()))
        items.append(PromptItem(ident, text, cats))
    if not items:
        raise PromptSetError(f"{where} holds no prompts")
    return items


PROMPT_KEYS = ("prompt", "prompts", "caption", "text")
CATEGORY_KEYS = ("category", "categories", "style", "skill", "skills")


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The value under the first of `keys` the row has (any case)."""
    lowered = {str(k).lower(): v for k, v in row.items()}
    return next((lowered[k] for k in keys if k in lowered), None)


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _row(obj: Any, given: str | None, where: str) -> tuple[str | None, str, list[str]]:
    """A (id, prompt, categories) row from a string or an object with a prompt field."""
    if isinstance(obj, str):
        return given, obj, []
    if not isinstance(obj, dict):
        raise PromptSetError(f"{where}: {given}: not a prompt or an object with one")
    prompt = _pick(obj, PROMPT_KEYS)
    if prompt is None:
        raise PromptSetError(f"{where}: {given}: no {' / '.join(PROMPT_KEYS)} field")
    ident = obj.get("id", given)
    return (None if ident is None else str(ident)), prompt, _listed(_pick(obj, CATEGORY_KEYS))


# --- local files -------------------------------------------------------------------------------
def read_file(path: Path) -> list[PromptItem]:
    """A local prompts file: .txt (a prompt per line), .csv / .tsv (a `prompt` column, optional
    `category`), .jsonl (an object per line: prompt, optional category and id), .json (a list
    of prompts or of such objects, or an object id -> prompt or object)."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptSetError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptSetError(f"cannot read prompts file {path}: {e}") from None
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        columns = reader.fieldnames or []
        if not any(str(c).lower() in PROMPT_KEYS for c in columns):
            raise PromptSetError(
                f"{where}: no prompt column (one of {', '.join(PROMPT_KEYS)}); it has "
                f"{', '.join(columns) or 'none'}"
            )
        rows = [_row(r, None, where) for r in reader]
        return _items(((i, p, c[0].split("|") if c else c) for i, p, c in rows), where)
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(_row(json.loads(line), None, f"{where}:{number}"))
                except json.JSONDecodeError as e:
                    raise PromptSetError(f"{where}:{number}: not JSON ({e.msg})") from None
        return _items(rows, where)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{where}: not JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            return _items((_row(v, str(k), where) for k, v in data.items()), where)
        if isinstance(data, list):
            return _items((_row(v, None, where) for v in data), where)
        raise PromptSetError(f"{where}: neither a list of prompts nor an object of them")
    # Anything else is text, a prompt per line (blank lines skipped).
    return _items(((None, line, []) for line in text.split("\n") if line.strip()), where)


# --- the hub -----------------------------------------------------------------------------------
def _offline_hint(dataset: str, name: str, error: Exception) -> PromptSetError:
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    return PromptSetError(
        f"prompt set {name}: cannot load the Hugging Face dataset {dataset} ({reason}); "
        f"offline (HF_HUB_OFFLINE=1, or no hub access) it must already be in the hub cache: "
        f"otherwise give a local copy as prompts.file"
    )


def _hub_rows(dataset: str, name: str) -> list[dict[str, Any]]:
    """Every row of a hub dataset's train split."""
    try:
        import datasets

        return list(datasets.load_dataset(dataset, split="train"))
    except Exception as e:  # offline, not cached, no such dataset: all the same to the user
        raise _offline_hint(dataset, name, e) from None


def _hub_file(dataset: str, filename: str, name: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(dataset, filename, repo_type="dataset"))
    except Exception as e:
        raise _offline_hint(dataset, name, e) from None


# --- the named sets ----------------------------------------------------------------------------
def _table(dataset: str, name: str, file: Path | None) -> list[PromptItem]:
    """A set published as a table (DrawBench, PartiPrompts): prompt and category columns."""
    if file is not None:
        return read_file(file)
    rows = _hub_rows(dataset, name)
    return _items(
        (
            (None, _pick(r, PROMPT_KEYS) or "", _listed(_pick(r, CATEGORY_KEYS)))
            for r in rows
            if _pick(r, PROMPT_KEYS)
        ),
        f"{name} ({dataset})",
    )


GENAI = "BaiqiL/GenAI-Bench-1600"


def _genai(file: Path | None) -> list[PromptItem]:
    """genai_image.json ({"00000": {"prompt": ...}}) and genai_skills.json ({skill: [index]}),
    beside it or from the hub; a prompt's categories are the skills it tests."""
    image = file if file is not None else _hub_file(GENAI, "genai_image.json", "genai-bench")
    skills_file = image.with_name("genai_skills.json")
    if file is None:
        skills_file = _hub_file(GENAI, "genai_skills.json", "genai-bench")
    try:
        prompts = json.loads(image.read_text(encoding="utf-8"))
        skills = json.loads(skills_file.read_text()) if skills_file.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise PromptSetError(f"genai-bench: cannot read {image}: {e}") from None
    if not isinstance(prompts, dict):
        raise PromptSetError(f"genai-bench: {image} is not an object of prompts by index")
    member: dict[int, list[str]] = {}
    for skill, indices in skills.items() if isinstance(skills, dict) else ():
        if skill != "all":
            for index in indices:
                member.setdefault(int(index), []).append(skill)
    return _items(
        (
            (f"genai-{key}", _row(value, key, str(image))[1], member.get(int(key), []))
            for key, value in prompts.items()
        ),
        str(image),
    )


HPS = "zhwang/HPDv2"
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def _hpsv2(file: Path | None) -> list[PromptItem]:
    """The four styles' JSON lists: in `file` (a folder of them, or one style's file), in
    hpsv2's own cache ($HPS_ROOT/datasets/benchmark), else from the hub."""
    cache = Path(os.environ.get("HPS_ROOT") or Path.home() / ".cache" / "hpsv2")
    folder = file if file is not None and file.is_dir() else cache / "datasets" / "benchmark"
    if file is not None and not file.is_dir():
        files = {file.stem: file}
    elif all((folder / f"{s}.json").is_file() for s in HPS_STYLES):
        files = {s: folder / f"{s}.json" for s in HPS_STYLES}
    elif file is not None:
        raise PromptSetError(f"hpsv2: {file} holds no {', '.join(HPS_STYLES)} .json files")
    else:
        files = {s: _hub_file(HPS, f"benchmark/{s}.json", "hpsv2") for s in HPS_STYLES}
    rows = []
    for style, path in files.items():
        try:
            prompts = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PromptSetError(f"hpsv2: cannot read {path}: {e}") from None
        rows += [(f"{style}-{i}", p, [style]) for i, p in enumerate(prompts)]
    return _items(rows, "hpsv2")


def _tifa(file: Path | None) -> list[PromptItem]:
    """tifa_v1.0_text_inputs.json: [{"id": "coco_301091", "caption": ...}]; the category is
    the id's source (coco, drawbench, partiprompt, paintskill)."""
    if file is None:
        raise PromptSetError(
            "prompt set tifa-v1.0 is not on the Hugging Face hub: download "
            "tifa_v1.0_text_inputs.json from the TIFA repository (github.com/Yushi-Hu/tifa, "
            "folder tifa_v1.0) and give it as prompts.file"
        )
    items = read_file(file)
    return [PromptItem(i.id, i.prompt, i.categories or (i.id.rsplit("_", 1)[0],)) for i in items]


# The shapes set: held-out captions (combinations no model of the shapes world trained on),
# interleaved by category so that any prefix is balanced. A seed no evaluation of the trained
# models or bench/ study uses. shapes-train and shapes-val: the training and validation splits'
# captions, the same way (no repeats): what an experiment's [train] stage collects and chooses
# its learning rate on, apart from the held-out captions it is evaluated on.
SHAPES_SEED = 60_000
SHAPES_SIZE = 60
SHAPES_SPLITS = {
    "heldout": (SHAPES_SEED, SHAPES_SIZE),
    "train": (61_000, 1000),
    "val": (62_000, 200),
}
SHAPES_CATEGORIES = ("colour", "count", "relation", "position")


def shapes_categories(spec: Spec) -> tuple[str, ...]:
    """What a caption tests: counts, relations, positions; colour binding when none of them."""
    found = [
        name
        for name, present in (
            ("count", any(p.count > 1 for p in spec.phrases)),
            ("relation", bool(spec.relations)),
            ("position", bool(spec.positions)),
        )
        if present
    ]
    return tuple(found) or ("colour",)


def shapes_set(size: int | None = None, split: str = "heldout") -> list[PromptItem]:
    """`size` captions of a split (held-out: 60, train: 1000, val: 200), the same ones every
    time, round-robin over categories; the training and validation sets without repeats."""
    seed, default = SHAPES_SPLITS[split]
    size = default if size is None else size
    pool = sample_scenes(split, size * 4, seed=seed)  # type: ignore[arg-type]  # a known split
    rng = Random(seed)
    prefix = "shapes" if split == "heldout" else f"shapes-{split}"
    buckets: dict[str, list[PromptItem]] = {c: [] for c in SHAPES_CATEGORIES}
    seen = set()
    for index, scene in enumerate(pool):
        cats, caption = shapes_categories(scene.spec), scene.caption(rng)
        if split != "heldout":  # the held-out set is kept as it was (its ids name runs)
            if caption in seen:
                continue
            seen.add(caption)
        buckets[cats[0]].append(PromptItem(f"{prefix}-{index}", caption, cats))
    chosen: list[PromptItem] = []
    while len(chosen) < size and any(buckets.values()):
        for bucket in buckets.values():
            if bucket and len(chosen) < size:
                chosen.append(bucket.pop(0))
    return chosen


NAMED: tuple[NamedSet, ...] = (
    NamedSet("shapes", "the shapes world's held-out captions", None, lambda f: shapes_set()),
    NamedSet(
        "shapes-train",
        "the shapes world's training-split captions",
        None,
        lambda f: shapes_set(split="train"),
    ),
    NamedSet(
        "shapes-val",
        "the shapes world's validation-split captions",
        None,
        lambda f: shapes_set(split="val"),
    ),
    NamedSet(
        "drawbench",
        "DrawBench (Imagen)",
        "sayakpaul/drawbench",
        lambda f: _table("sayakpaul/drawbench", "drawbench", f),
    ),
    NamedSet(
        "partiprompts",
        "PartiPrompts (Parti)",
        "nateraw/parti-prompts",
        lambda f: _table("nateraw/parti-prompts", "partiprompts", f),
        ("parti", "p2"),
    ),
    NamedSet("genai-bench", "GenAI-Bench 1600", GENAI, _genai, ("genai",)),
    NamedSet("tifa-v1.0", "TIFA v1.0", None, _tifa, ("tifa",)),
    NamedSet("hpsv2", "HPSv2's benchmark prompts", HPS, _hpsv2, ("hps", "hpdv2")),
)


def named_set(name: str) -> NamedSet:
    key = name.strip().lower()
    for s in NAMED:
        if key == s.name or key in s.aliases:
            return s
    raise PromptSetError(
        f"unknown prompt set {name!r} (one of {', '.join(s.name for s in NAMED)}; "
        "or give a local file as prompts.file)"
    )


def load_prompts(
    set_name: str | None,
    file: Path | None,
    *,
    limit: int | None = None,
    categories: list[str] | None = None,
) -> list[PromptItem]:
    """The prompts of a named set (its own file when `file` is given too) or of a local file,
    those in any of `categories` (when given), the first `limit` of them."""
    if file is not None and not file.exists():
        what = f"prompt set {set_name}'s file" if set_name else "prompts file"
        raise PromptSetError(f"{what} not found: {file}")
    items = named_set(set_name).load(file) if set_name else read_file(file)  # type: ignore[arg-type]
    if categories:
        known = {c for i in items for c in i.categories}
        if missing := [c for c in categories if c not in known]:
            raise PromptSetError(
                f"prompts.categories: {', '.join(map(repr, missing))} not in the set (its "
                f"categories: {', '.join(sorted(known)) or 'none'})"
            )
        items = [i for i in items if set(i.categories) & set(categories)]
    return items[:limit] if limit is not None else items
