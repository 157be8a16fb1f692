"""`finevit-vl chat`: scripted through stdin, its answers are the model's greedy answers, the conversation history is
fed back through the chat template, and bad paths give one line and exit code 2."""

import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_image
from transformers import AutoModelForImageTextToText, AutoProcessor

from finevit_vl import chat


MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval(), AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_images") / "scene.png"
    random_image(100, 150, 3).save(path)
    return str(path)


def greedy_answer(model, processor, messages, images) -> str:
    """Plain `generate()`, independent of the chat code: prompt through the chat template, new tokens decoded."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images or None, text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def user(text, with_image=False):
    return {"role": "user", "content": [{"type": "image"}] * with_image + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def run_chat(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finevit_vl.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=240, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_piped_question_prints_the_greedy_answer_and_exits(loaded, tiny_checkpoint, image_path):
    model, processor = loaded
    image = chat.open_image(image_path)
    expected = greedy_answer(model, processor, [user("How many circles?", True)], [image])
    result = run_chat("How many circles?\n", tiny_checkpoint, "--image", image_path,
                      "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_scripted_conversation_keeps_history_reset_and_image_command(loaded, tiny_checkpoint, image_path):
    model, processor = loaded
    image = chat.open_image(image_path)
    a1 = greedy_answer(model, processor, [user("How many circles?", True)], [image])
    history = [user("How many circles?", True), assistant(a1), user("And squares?")]
    a2 = greedy_answer(model, processor, history, [image])
    a3 = greedy_answer(model, processor, [user("What is red?")], [])
    # The history changes the answer, so a chat that dropped it would fail here.
    assert a1 and a2 != greedy_answer(model, processor, [user("And squares?")], [])
    # /reset forgets the first image; /image attaches one to the next question.
    script = f"How many circles?\nAnd squares?\n/reset\nWhat is red?\n/reset\n/image {image_path}\nHow many circles?\n"
    result = run_chat(script, tiny_checkpoint, "--image", image_path, "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{a1}\n{a2}\n{a3}\n{a1}\n"


def test_history_goes_through_the_chat_template(loaded, monkeypatch):
    from finevit_vl.eval import generation

    model, processor = loaded
    seen = []
    real = generation.generate_answers

    def spy(model, processor, chats, **kwargs):
        seen.append([list(messages) for messages, _ in chats])
        return real(model, processor, chats, **kwargs)

    monkeypatch.setattr(generation, "generate_answers", spy)
    conversation = chat.Conversation()
    conversation.attach(random_image(84, 84, 1))
    first = chat.reply(model, processor, conversation, "How many circles?", max_new_tokens=MAX_NEW_TOKENS)
    chat.reply(model, processor, conversation, "And squares?", max_new_tokens=MAX_NEW_TOKENS)
    second_call = seen[1][0]  # what the model was asked the second time: the whole conversation so far
    assert [m["role"] for m in second_call] == ["user", "assistant", "user"]
    assert first and first in str(second_call[1]["content"])
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert len(conversation.images) == 1 and conversation.pending == []


def test_failed_answer_leaves_the_conversation_unchanged(loaded):
    model, processor = loaded
    conversation = chat.Conversation()
    conversation.attach(random_image(10, 2500, 0))  # aspect ratio 250: refused by the processor
    with pytest.raises(ValueError, match="aspect ratio"):
        chat.reply(model, processor, conversation, "What is this?", max_new_tokens=MAX_NEW_TOKENS)
    assert conversation.messages == [] and conversation.images == [] and len(conversation.pending) == 1


def test_not_an_image_exits_2_with_one_line(tiny_checkpoint, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = run_chat("hi\n", tiny_checkpoint, "--image", str(bad))
    assert result.returncode == 2
    message = f"finevit-vl chat: error: {bad}: cannot decode image (cannot identify image file {str(bad)!r})"
    assert result.stderr.strip().splitlines() == [message]


@pytest.mark.parametrize("case", ["missing model dir", "not a model dir", "missing image", "missing /image"])
def test_bad_paths_exit_2_without_a_traceback(case, tiny_checkpoint, image_path, tmp_path, monkeypatch, capsys):
    argv, stdin, message = {
        "missing model dir": ([str(tmp_path / "nope")], "", f"model directory not found: {tmp_path / 'nope'}"),
        "not a model dir": ([str(tmp_path)], "", f"{tmp_path} is not a model directory (no config.json)"),
        "missing image": ([tiny_checkpoint, "--image", str(tmp_path / "x.png")], "",
                          f"{tmp_path / 'x.png'}: image file not found"),
        "missing /image": ([tiny_checkpoint, "--max-new-tokens", "2"], f"/image {tmp_path / 'y.png'}\nHello?\n",
                           f"{tmp_path / 'y.png'}: image file not found"),
    }[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert chat.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == f"finevit-vl chat: error: {message}"
    assert out == ""  # the script stopped at the bad path: no answer to "Hello?"
