"""The VQA score (issue 17, item 2; AGFSync's sense): questions written once per prompt and
model, cached and reported in info; answered by the in-process Qwen2-VL's log-probabilities,
by a server's (vLLM, integration) or, without them, counted as a share of right answers."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from artloop.agents.questions import MAX_QUESTIONS, VQAQuestions, answer_messages
from artloop.config import ChatConfig, ScorersConfig
from artloop.models.chat import build_chat_model
from artloop.models.inprocess import ChatQwen2VLLocal
from artloop.models.scripted import ScriptedChat
from artloop.rewards import REWARDS, configure_scorers, get_reward, reward_entry
from artloop.rewards.vqa import NO, YES, model_key, p_yes, vqa_reward
from PIL import Image
from pydantic import ValidationError

QUESTIONS = ["Is there a fox?", "Is the fox red?", "Is there snow?"]
PAIRS = {"pairs": [{"question": q, "answer": "yes"} for q in QUESTIONS]}
RED = Image.new("RGB", (32, 32), (200, 40, 30))
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def yes_no(*answers: str) -> list[dict]:
    return [{"answer": a} for a in answers]


def test_questions_generated_cached_and_the_share_exactly():
    chat = ScriptedChat(
        scripts={"VQAQuestions": [PAIRS], "VQAAnswer": yes_no("yes", "no", "yes", "no")}
    )
    fn = vqa_reward(chat)
    scores, info = fn([RED], ["a red fox in snow"], [{}])
    assert scores.tolist() == [2 / 3]  # exactly the share of "yes"
    assert info["method"] == "share" and info["sources"] == ["generated"]
    assert info["questions"] == [QUESTIONS] and info["question_calls"] == 1
    assert info["probabilities"] == [[1.0, 0.0, 1.0]]
    assert chat.calls.count("VQAQuestions") == 1 and chat.calls.count("VQAAnswer") == 3
    # The second call does not ask again: the same questions, from the cache.
    scores, info = fn([RED], ["a red fox in snow"], [{}])
    assert chat.calls.count("VQAQuestions") == 1 and chat.calls.count("VQAAnswer") == 6
    assert info["sources"] == ["cache"] and info["question_calls"] == 0
    assert info["questions"] == [QUESTIONS] and scores.tolist() == [0.0]  # "no", then repeated


def test_questions_from_metadata_are_not_asked_for():
    chat = ScriptedChat(scripts={"VQAAnswer": yes_no("yes", "no")})
    scores, info = vqa_reward(chat)([RED], ["a fox"], [{"vqa_questions": QUESTIONS[:2]}])
    assert "VQAQuestions" not in chat.calls and info["sources"] == ["metadata"]
    assert scores.tolist() == [0.5]


def test_the_question_schema_is_bounded_and_always_yes():
    too_many = {"pairs": [{"question": f"Is there {i}?", "answer": "yes"} for i in range(9)]}
    with pytest.raises(ValidationError):
        VQAQuestions.model_validate(too_many)
    with pytest.raises(ValidationError):
        VQAQuestions.model_validate({"pairs": [{"question": "Is it red?", "answer": "no"}]})
    with pytest.raises(ValueError, match="n_questions"):
        vqa_reward(ScriptedChat(), n_questions=MAX_QUESTIONS + 1)


def test_p_yes_and_the_cache_key():
    assert p_yes({"yes": math.log(0.3), " No": math.log(0.1), "cat": 0.0}) == pytest.approx(0.75)
    assert p_yes({"Yes": math.log(0.2), "yes": math.log(0.2)}) == pytest.approx(1.0)
    assert p_yes({"cat": 0.0}) is None
    assert model_key(ChatQwen2VLLocal(model="a")) != model_key(ChatQwen2VLLocal(model="b"))


def test_logprobs_on_the_tiny_inprocess_qwen2vl(tiny_chat):
    writer = ScriptedChat(scripts={"VQAQuestions": [PAIRS]})
    fn = vqa_reward(tiny_chat, questions_chat=writer)
    images, prompts = [RED, NOISE], ["a red fox in snow", "a red fox in snow"]
    scores, info = fn(images, prompts, [{}, {}])
    assert info["method"] == "logprobs" and writer.calls.count("VQAQuestions") == 1
    assert info["sources"] == ["generated", "cache"]
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    flat = [p for row in info["probabilities"] for p in row]
    assert len(flat) == 6 and all(0 <= p <= 1 for p in flat)
    assert info["unseen_answers"] == 0  # the log-softmax covers every token
    again, _ = fn(images, prompts, [{}, {}])
    np.testing.assert_array_equal(scores, again)  # deterministic
    # The mean of each question's P(yes) / (P(yes) + P(no)) from the backend's log-probabilities.
    messages = answer_messages(RED, QUESTIONS[0])
    logprobs = tiny_chat.choice_logprobs(messages, YES + NO)
    assert all(lp <= 0 for lp in logprobs.values())
    assert info["probabilities"][0][0] == pytest.approx(p_yes(logprobs))


def test_choice_logprobs_keep_the_batching(tiny_chat):
    """Concurrent scoring calls and a generate share the one worker: the same numbers as alone."""
    asks = [answer_messages(im, q) for im in (RED, NOISE) for q in QUESTIONS[:2]]
    alone = [tiny_chat.choice_logprobs(m, ("yes", "no")) for m in asks]
    with ThreadPoolExecutor(5) as pool:
        gen = pool.submit(tiny_chat.invoke, "Say hi", max_new_tokens=3)
        together = list(pool.map(lambda m: tiny_chat.choice_logprobs(m, ("yes", "no")), asks))
        assert isinstance(gen.result().content, str)
    for a, b in zip(alone, together, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-4)


def test_registered_with_the_model_identity():
    configure_scorers(ScorersConfig(models={"vqa": "tiny-qwen2vl"}))
    try:
        entry = reward_entry("vqa")
        ident = entry.identity()
    finally:
        configure_scorers(None)
    assert entry.range == (0.0, 1.0) and entry.judge_problem() is None
    assert ident["model"]["id"] == "tiny-qwen2vl" and ident["model"]["backend"] == "inprocess"
    assert len(ident["model"]["sha256"]) == 16
    assert callable(get_reward("vqa"))


def test_the_chat_section_is_the_one_the_cli_read(tmp_path, monkeypatch):
    """`--config FILE`: the VQA model's config is the `chat` section of the config the CLI read
    (file included), as the `scorers` section is, not the environment's alone; after the
    command (configure_scorers(None)) the environment's again."""
    from artloop.cli.common import read_config
    from artloop.rewards.vqa import vqa_chat_config

    monkeypatch.delenv("ARTLOOP_CHAT__MODEL", raising=False)
    monkeypatch.delenv("ARTLOOP_CHAT__TEMPERATURE", raising=False)
    monkeypatch.delenv("ARTLOOP_SCORERS__MODELS", raising=False)
    env = vqa_chat_config()
    plain = tmp_path / "plain.toml"
    plain.write_text('[chat]\nmodel = "file-vlm"\ntemperature = 0.5\n')
    named = tmp_path / "named.toml"
    named.write_text(plain.read_text() + '[scorers.models]\nvqa = "scorer-vlm"\n')
    home = {"home": str(tmp_path / "home")}
    try:
        read_config(plain, home, create_home=False)
        chat = vqa_chat_config()
        assert env.model != "file-vlm" and chat.model == "file-vlm" and chat.temperature == 0.5
        read_config(named, home, create_home=False)  # scorers.models.vqa, on the file's section
        chat = vqa_chat_config()
        assert chat.model == "scorer-vlm" and chat.temperature == 0.5
    finally:
        configure_scorers(None)
    assert vqa_chat_config() == env


def test_a_run_scoring_vqa_loads_the_vlm_once(monkeypatch, tmp_path):
    """A run whose fact scorer is vqa answers with its context's in-process VLM: the same
    object, so the weights load once in the process, not once for the agents and again for
    the scorer."""
    from artloop.config import load_config
    from artloop.graphs.context import build_context
    from artloop.graphs.refine import scores_of
    from artloop.models import chat as chat_module

    monkeypatch.setattr(chat_module, "_shared", {})  # this test's process: nothing built yet
    loads: list[int] = []
    setup = ChatQwen2VLLocal.setup

    def counted(self):
        if self._loaded is None:  # this call loads the weights
            loads.append(id(self))
        return setup(self)

    monkeypatch.setattr(ChatQwen2VLLocal, "setup", counted)
    # The registered scorer with scripted questions (the tiny VLM writes them slowly): its
    # answering model is still the configured one.
    writer = ScriptedChat(scripts={"VQAQuestions": [PAIRS]})
    vqa = replace(REWARDS["vqa"], fn=vqa_reward(questions_chat=writer))
    monkeypatch.setitem(REWARDS, "vqa", vqa)
    cfg = load_config(overrides={"home": str(tmp_path / "home"), "loop.fact_scorers": ["vqa"]})
    ctx = build_context(cfg)
    ctx.chat.setup()  # the agents' model, loaded as the first agent call would
    scores = scores_of(ctx.loop.fact_scorers, RED, "a red fox in snow")
    assert 0 <= scores["vqa"]["score"] <= 1 and writer.calls == ["VQAQuestions"]
    assert loads == [id(ctx.chat)]  # one load, the context's: the scorer reused it
    assert build_context(cfg).chat is ctx.chat  # a second context (a batch's) shares it too


def test_vllm_logprobs(vllm_server):
    """One small case against the real server: logprobs=True, top_logprobs=k, one token."""
    cfg = ChatConfig(backend="openai", base_url=vllm_server.base_url, model="tiny-qwen2vl")
    writer = ScriptedChat(scripts={"VQAQuestions": [PAIRS]})
    fn = vqa_reward(build_chat_model(cfg), questions_chat=writer)
    scores, info = fn([RED], ["a red fox in snow"], [{}])
    assert info["method"] == "openai-logprobs" and scores.shape == (1,)
    assert 0 <= scores[0] <= 1 and all(0 <= p <= 1 for p in info["probabilities"][0])
    again, _ = fn([RED], ["a red fox in snow"], [{}])
    assert again[0] == pytest.approx(scores[0], abs=1e-3)  # greedy, the same answer


# --- BLIP-2 FlanT5 as the answerer (AGFSync's own: rewards/blip2.py) -----------------------------
def _blip2_pictures() -> list[Image.Image]:
    from artloop.models.tiny.blip2 import colour_picture

    rng = np.random.default_rng(5)  # not the fitting's pictures
    return [colour_picture(c, rng) for c in ("red", "green", "blue", "red", "blue")]


def test_blip2_answers_from_config_and_follows_the_picture():
    """`scorers.models.vqa = "tiny-blip2"`: the registered scorer answers with BLIP-2 (fitted
    to "Is the picture red?"), the chat model still writes the questions; red pictures score
    high and the others low; the same batch scores the same, one pair per pass or all at once."""
    from artloop.models.tiny.blip2 import FIT_QUESTION

    pictures = _blip2_pictures()
    meta = [{"vqa_questions": [FIT_QUESTION]}] * len(pictures)
    scores = {}
    for batch in (1, 16):
        configure_scorers(ScorersConfig(models={"vqa": "tiny-blip2"}, batch_size=batch))
        try:
            scores[batch], info = get_reward("vqa")(pictures, ["a red picture"] * 5, meta)
            ident = reward_entry("vqa").identity()["model"]
        finally:
            configure_scorers(None)
        assert info["method"] == "blip2" and info["sources"] == ["metadata"] * 5
    assert scores[1] == pytest.approx(scores[16], abs=1e-5)
    red, other = scores[16][[0, 3]], scores[16][[1, 2, 4]]
    assert red.min() > 0.9 and other.max() < 0.1
    assert ident["id"] == "tiny-blip2" and ident["answerer"] == "blip2"
    assert len(ident["sha256"]) == 16 and ident["questions_by"]  # the chat model's id


def test_blip2_probability_is_generates_first_step():
    """P(yes) is the first decoder step's yes / (yes + no), as transformers' own generate()
    scores that step for AGFSync's prompt; and the chat model writes questions, once a prompt."""
    import torch
    from artloop.models.tiny import resolve_model
    from artloop.models.tiny.blip2 import VQA_PROMPT
    from artloop.rewards.blip2 import _answer_ids
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    writer = ScriptedChat(scripts={"VQAQuestions": [PAIRS]})
    pictures = _blip2_pictures()[:2]
    scores, info = vqa_reward(questions_chat=writer, blip2="tiny-blip2")(
        pictures, ["a red fox in snow"] * 2, [{}, {}]
    )
    assert writer.calls == ["VQAQuestions"] and info["sources"] == ["generated", "cache"]
    path = resolve_model("tiny-blip2")
    model = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    processor = Blip2Processor.from_pretrained(path)
    yes, no = _answer_ids(processor.tokenizer)
    for image, row in zip(pictures, info["probabilities"], strict=True):
        for question, prob in zip(QUESTIONS, row, strict=True):
            batch = processor(
                images=image, text=VQA_PROMPT.format(question=question), return_tensors="pt"
            )
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=1, output_scores=True, return_dict_in_generate=True
                )
            p = out.scores[0][0].softmax(-1)
            assert prob == pytest.approx(
                (p[yes].sum() / (p[yes].sum() + p[no].sum())).item(), abs=1e-5
            )
    assert scores == pytest.approx([np.mean(r) for r in info["probabilities"]])


def test_blip2_names_and_bad_models(tmp_path):
    """Which names are BLIP-2; an OPT BLIP-2 and a pickle-only directory: one-line errors."""
    import torch
    from artloop.rewards.blip2 import blip2_p_yes, is_blip2
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    assert is_blip2("Salesforce/blip2-flan-t5-xxl") and is_blip2("tiny-blip2")
    assert not is_blip2("Qwen/Qwen2-VL-7B-Instruct") and not is_blip2("tiny-qwen2vl")
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    opt = Blip2Config(
        vision_config={**small, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        qformer_config={**small, "intermediate_size": 64, "encoder_hidden_size": 32},
        text_config={
            "model_type": "opt",
            **small,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "vocab_size": 64,
            "max_position_embeddings": 64,
        },
        num_query_tokens=2,
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(opt).save_pretrained(tmp_path / "opt")
    assert is_blip2(str(tmp_path / "opt"))  # by its config.json, whatever the folder's name
    with pytest.raises(ValueError, match="decoder-only language model"):
        blip2_p_yes(str(tmp_path / "opt"), [RED], ["Is it red?"])
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text('{"model_type": "blip-2"}')
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        blip2_p_yes(str(tmp_path / "pickled"), [RED], ["Is it red?"])
