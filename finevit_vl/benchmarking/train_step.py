"""Benchmark 3: one Stage III training step (everything trains), packed vs padded, activation checkpointing on/off.

The samples are image + question + answer conversations with mixed-resolution images, encoded by the trainer's own
data path (`SampleEncoder` -> `pack_rows` -> `collate_rows` -> `attention_inputs`) and trained with its loss
(`token_losses`, summed and divided by the supervised-token count) and AdamW. A step processes the same samples in
every variant:

* padded: one row per sample, right-padded to the longest sample (plain batching);
* packed: samples packed into rows of at most `pack_length` tokens (`pack_rows`), with the exact block-diagonal
  causal mask of `finevit_vl.data.packing` on sdpa.

The images always go through the encoder as one pack, so the variants differ in the LLM. Tokens/s counts real
(non-padding) tokens. Peak memory is how far one step raises the resident set size (see
`common.peak_memory_growth_mb`): activations, gradients and temporaries; the weights, the AdamW state (created by the
warm-up steps) and the batch already exist.
"""

import torch

from ..data.collator import SampleEncoder, collate_rows, dummy_image_inputs
from ..data.packing import attention_inputs, pack_rows, token_efficiency
from ..tiny import build_tiny_model
from ..train.loss import num_targets, token_losses
from .common import (
    SMALL_VL,
    fmt_stat,
    goal,
    goals_markdown,
    paired_ratio,
    peak_memory_growth_mb,
    rate,
    result_skeleton,
    sizes_text,
    summarize,
    synthetic_image,
    time_interleaved,
)


# (width, height) of the samples' images, 112-448 px; answers of different lengths.
IMAGE_SIZES = [(448, 448), (112, 112), (224, 168), (336, 336), (168, 336), (448, 224), (112, 224), (280, 280),
               (392, 308), (140, 112), (224, 448), (196, 196)]

SETTINGS = {
    "full": {**SMALL_VL["full"], "image_sizes": IMAGE_SIZES, "max_pixels": 448 * 448, "pack_length": 768,
             "repeats": 3},
    "quick": {**SMALL_VL["quick"], "image_sizes": [(112, 112), (56, 112), (84, 56)], "max_pixels": 112 * 112,
              "pack_length": 256, "repeats": 1},
}

VARIANTS = {
    "padded": {"pack": False, "checkpointing": False},
    "packed": {"pack": True, "checkpointing": False},
    "packed_checkpointing": {"pack": True, "checkpointing": True},
    "padded_checkpointing": {"pack": False, "checkpointing": True},
}

ANSWERS = ["a red circle", "two squares and a blue triangle next to a chart", "the total is 42",
           "a document with a table, a date and an invoice value", "green"]


def build(s: dict) -> tuple:
    """The model (train mode), its optimizer, and the encoded samples."""
    model, processor = build_tiny_model("qwen3", vision_preset=s["vision_preset"], text_overrides=s["text"],
                                        max_pixels=s["max_pixels"], seed=0)
    model.set_attn_implementation("sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    encoder = SampleEncoder(processor, max_length=4096)
    samples = []
    for index, (width, height) in enumerate(s["image_sizes"]):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[index % len(ANSWERS)]}]},
        ]
        samples.append(encoder.encode_messages(messages, [synthetic_image(width, height, seed=index)]))
    return model, optimizer, processor, samples


def make_batch(samples: list, processor, s: dict, pack: bool) -> dict:
    lengths = [sample.length for sample in samples]
    if pack:
        rows = [[samples[i] for i in row] for row in pack_rows(lengths, s["pack_length"])]
    else:
        rows = [[sample] for sample in samples]
    batch = collate_rows(rows, processor.tokenizer.pad_token_id, dummy_image_inputs(processor))
    batch["attention"] = attention_inputs(batch["segment_ids"], batch["position_ids"])
    return batch


def train_step(model, optimizer, batch: dict) -> float:
    outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"], use_cache=False, **batch["attention"])
    loss = token_losses(outputs.logits, batch["labels"]).sum() / max(num_targets(batch["labels"]), 1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def set_checkpointing(model, enabled: bool) -> None:
    if enabled:
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()


def step_fn(model, optimizer, batch: dict, checkpointing: bool):
    def step():
        set_checkpointing(model, checkpointing)
        return train_step(model, optimizer, batch)
    return step


def run(quick: bool = False) -> dict:
    s = SETTINGS["quick" if quick else "full"]
    result = result_skeleton("train_step", "Training step (Stage III): packing vs padding, activation checkpointing",
                             quick, s)
    torch.manual_seed(0)
    model, optimizer, processor, samples = build(s)
    batches = {pack: make_batch(samples, processor, s, pack) for pack in (False, True)}
    variants = {name: step_fn(model, optimizer, batches[options["pack"]], options["checkpointing"])
                for name, options in VARIANTS.items()}
    samples_s = time_interleaved(variants, repeats=s["repeats"])
    set_checkpointing(model, False)
    real_tokens = sum(sample.length for sample in samples)
    results = {
        "samples": len(samples),
        "real_tokens": real_tokens,
        "image_patches": sum(sample.num_patches for sample in samples),
        "parameters": sum(p.numel() for p in model.parameters()),
        "variants": {},
    }
    for name, options in VARIANTS.items():
        batch = batches[options["pack"]]
        results["variants"][name] = {
            **options,
            "rows": int(batch["input_ids"].shape[0]),
            "row_length": int(batch["input_ids"].shape[1]),
            "slots": int(batch["input_ids"].numel()),
            "real_token_fraction": token_efficiency(batch["segment_ids"]),
            "seconds": summarize(samples_s[name]),
            "tokens_per_s": rate(samples_s[name], real_tokens),
            "peak_memory_growth_mb": peak_memory_growth_mb(variants[name]),
        }
    results["speedup_packed_vs_padded"] = paired_ratio(samples_s["padded"], samples_s["packed"])
    results["checkpointing_time_cost"] = paired_ratio(samples_s["packed_checkpointing"], samples_s["packed"])
    result["results"] = results
    speedup = results["speedup_packed_vs_padded"]
    result["goals"].append(goal("packed vs padded, real tokens/s (x)", speedup["median"], 1.3,
                                f"range {speedup['min']:.2f}-{speedup['max']:.2f}"))
    result["notes"].append("fp32, sdpa; one optimizer step = forward + backward + AdamW over all samples in one "
                           "micro-batch. The padded variant's mask is transformers' causal + padding mask; the packed "
                           "one is a dense (rows, 1, len, len) block-diagonal causal mask (sdpa/eager; on GPU, "
                           "flash-attention varlen needs no mask).")
    return result


def markdown(result: dict) -> str:
    r, s = result["results"], result["settings"]
    lines = [
        (f"{r['samples']} samples ({r['real_tokens']} real tokens, {r['image_patches']} image patches, images "
         f"{sizes_text(s['image_sizes'])}); FineViT-VL with a `{s['vision_preset']}` encoder and "
         f"a {s['text']['num_hidden_layers']}-layer, {s['text']['hidden_size']}-wide Qwen3 "
         f"({r['parameters'] / 1e6:.1f}M parameters); packing budget {s['pack_length']} tokens; "
         f"{s['repeats']} interleaved repetitions after one warm-up."),
        "",
        "| variant | rows x length | real-token fraction | step s | real tokens/s | peak memory growth (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['rows']} x {v['row_length']} | {v['real_token_fraction']:.2f} | "
                     f"{fmt_stat(v['seconds'])} | {fmt_stat(v['tokens_per_s'], 0)} | "
                     f"{'n/a' if v['peak_memory_growth_mb'] is None else round(v['peak_memory_growth_mb'])} |")
    lines += ["", (f"Packed vs padded: **{fmt_stat(r['speedup_packed_vs_padded'])}x** real tokens/s. Activation "
                  f"checkpointing (packed) costs {fmt_stat(r['checkpointing_time_cost'])}x the step time."), "",
              goals_markdown(result["goals"])]
    return "\n".join(lines)


__all__ = ["markdown", "run"]
