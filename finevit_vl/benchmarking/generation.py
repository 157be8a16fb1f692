"""Benchmark 4: generation through the lmms-eval plugin, batched vs batch size 1.

`FineViTVL.from_model(model, processor, batch_size=...)` wraps one random-weight FineViT-VL; every variant answers
the same image questions (mixed resolutions) through the plugin's `generate_until`, i.e. chat template, processor,
left padding, `model.generate` and post-processing, exactly as in an lmms-eval run. EOS is disabled so every answer
has `max_new_tokens` tokens and the variants do the same work; batched and unbatched answers are checked to be equal.
"""

import torch

from ..tiny import build_tiny_model
from .common import (
    SMALL_VL,
    fmt_stat,
    paired_ratio,
    rate,
    result_skeleton,
    sizes_text,
    synthetic_image,
    time_interleaved,
)


IMAGE_SIZES = [(448, 336), (224, 224), (112, 168), (336, 336), (280, 140), (168, 224), (392, 392), (140, 112),
               (224, 448), (308, 224), (112, 112), (252, 336), (196, 280), (364, 252), (168, 168), (224, 336)]
QUESTIONS = ["How many circles?", "What is written in the top left corner?", "Describe the chart.", "Total?"]

SETTINGS = {
    "full": {**SMALL_VL["full"], "image_sizes": IMAGE_SIZES, "max_pixels": 448 * 448, "max_new_tokens": 24,
             "batch_sizes": [1, 4, 8], "repeats": 2},
    "quick": {**SMALL_VL["quick"], "image_sizes": [(112, 112), (56, 84), (84, 56)], "max_pixels": 112 * 112,
              "max_new_tokens": 4, "batch_sizes": [1, 3], "repeats": 1},
}

TASK, SPLIT = "bench", "test"


def _doc_to_messages(doc: dict) -> list[dict]:
    content = [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]
    return [{"role": "user", "content": content}]


def build(s: dict) -> tuple:
    from lmms_eval.api.instance import Instance

    from ..eval.lmms_model import FineViTVL

    model, processor = build_tiny_model("qwen3", vision_preset=s["vision_preset"], text_overrides=s["text"],
                                        max_pixels=s["max_pixels"], seed=0)
    model.generation_config.eos_token_id = None  # fixed-length answers: every variant generates the same tokens
    docs = [{"image": synthetic_image(w, h, seed=i), "question": QUESTIONS[i % len(QUESTIONS)]}
            for i, (w, h) in enumerate(s["image_sizes"])]
    gen_kwargs = {"max_new_tokens": s["max_new_tokens"], "temperature": 0, "do_sample": False}
    requests = [Instance(request_type="generate_until", arguments=(doc["question"], _doc_to_messages, dict(gen_kwargs),
                                                                   index, TASK, SPLIT),
                         idx=0, metadata={"task": TASK, "doc_id": index, "repeats": 1})
                for index, doc in enumerate(docs)]
    wrappers = {}
    for batch_size in s["batch_sizes"]:
        wrapper = FineViTVL.from_model(model, processor, batch_size=batch_size, max_new_tokens=s["max_new_tokens"])
        wrapper.task_dict = {TASK: {SPLIT: docs}}
        wrappers[batch_size] = wrapper
    return model, wrappers, requests


def run(quick: bool = False) -> dict:
    s = SETTINGS["quick" if quick else "full"]
    result = result_skeleton("generation", "Generation: lmms-eval plugin, batched vs batch size 1", quick, s)
    torch.manual_seed(0)
    model, wrappers, requests = build(s)
    answers = {batch_size: wrapper.generate_until(requests) for batch_size, wrapper in wrappers.items()}
    samples = time_interleaved({bs: (lambda w=w: w.generate_until(requests)) for bs, w in wrappers.items()},
                               repeats=s["repeats"], warmup=0)  # the answer check above was the warm-up
    result["results"] = {
        "samples": len(requests),
        "parameters": sum(p.numel() for p in model.parameters()),
        "answers_equal_to_batch_size_1": {str(bs): answers[bs] == answers[1] for bs in wrappers},
        "samples_per_s": {str(bs): rate(samples[bs], len(requests)) for bs in wrappers},
        "speedup_vs_batch_size_1": {str(bs): paired_ratio(samples[1], samples[bs]) for bs in wrappers},
    }
    result["notes"].append(f"fp32, greedy, {s['max_new_tokens']} new tokens per answer, sdpa; the prompt images are "
                           "encoded once per batch (one packed encoder call), then the LLM decodes with a KV cache.")
    return result


def markdown(result: dict) -> str:
    r, s = result["results"], result["settings"]
    lines = [(f"{r['samples']} questions on images of {sizes_text(s['image_sizes'])} "
              f"(max_pixels {s['max_pixels']}); FineViT-VL with a `{s['vision_preset']}` encoder and a "
              f"{s['text']['num_hidden_layers']}-layer, {s['text']['hidden_size']}-wide Qwen3 "
              f"({r['parameters'] / 1e6:.1f}M parameters); {s['repeats']} interleaved repetitions."), "",
             "| batch size | samples/s | speed-up vs batch size 1 | answers equal to batch size 1 |",
             "|---|---|---|---|"]
    for bs, samples_per_s in r["samples_per_s"].items():
        lines.append(f"| {bs} | {fmt_stat(samples_per_s)} | {fmt_stat(r['speedup_vs_batch_size_1'][bs])} | "
                     f"{'yes' if r['answers_equal_to_batch_size_1'][bs] else '**no**'} |")
    return "\n".join(lines)


__all__ = ["markdown", "run"]
