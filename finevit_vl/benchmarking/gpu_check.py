"""The GPU check (`benchmarks/gpu_check.sh`): correctness and speed on one accelerator, in one short run.

Correctness: packed vs unpacked per-sample losses on the device; flash-attention vs sdpa (encoder features and LLM
logits, bf16) when flash-attn is installed. Speed: encoder forward+backward MFU at the paper's 0.86B FineViT next to
transformers' Qwen2-VL vision tower at the matched config (`qwen2-vl-0.86b`), a Stage III training step (packed rows,
AdamW; tokens/s and MFU with the encoder's FLOPs counted) and batched generation. FLOPs come from
`torch.utils.flop_counter` on one pass; MFU divides by the device's dense peak (`GPU_PEAK_TFLOPS`, or `--peak-tflops`).
Writes `gpu_check.json` and `gpu_check.md` to `--out`.

`--tiny --device cpu` runs every step with test-size models (the test suite does, to keep the script working); the
numbers then mean nothing.
"""

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


LLM_1_7B = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192}
LLM_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}


def _settings(tiny: bool) -> dict[str, Any]:
    if tiny:
        return {"size": "test", "text": LLM_TINY, "image_sides": [(56, 84), (84, 56), (112, 112)], "max_pixels": 112 * 112,
                "samples": 4, "pack_length": 512, "new_tokens": 4, "repeats": 1}
    return {"size": "0.86b", "text": LLM_1_7B, "image_sides": [(448, 448), (672, 1008), (1008, 756), (336, 896)],
            "max_pixels": 1008 * 1008, "samples": 16, "pack_length": 8192, "new_tokens": 32, "repeats": 5}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


_MODELS: dict[tuple, tuple] = {}


def _model(encoder: str, s: dict, device: torch.device, dtype: torch.dtype, attn: str, small_llm: bool = False):
    """A random FineViT-VL with `encoder`, built once per (encoder, LLM size) directly on the device, then cast and
    switched to `attn` (the checks run fp32 first, then bf16)."""
    from ..tiny import build_tiny_model

    key = (encoder, str(device), small_llm)
    if key not in _MODELS:
        with torch.device(device):
            _MODELS[key] = build_tiny_model("qwen3", vision_preset=f"{encoder}-{s['size']}", max_pixels=s["max_pixels"],
                                            text_overrides=LLM_TINY if small_llm else s["text"])
    model, processor = _MODELS[key]
    model.set_attn_implementation(attn)
    return model.to(device, dtype), processor


def _samples(processor, s: dict) -> list:
    from ..data.collator import SampleEncoder

    encoder = SampleEncoder(processor, max_length=s["pack_length"])
    samples = []
    for index in range(s["samples"]):
        height, width = s["image_sides"][index % len(s["image_sides"])]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe image {index}."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "a red circle and a blue square " * 4}]}]
        samples.append(encoder.encode_messages(messages, [_image(height, width, index)]))
    return samples


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in batch.items() if torch.is_tensor(v)}


def _losses(model, batch: dict):
    from ..data.collator import IMAGE_INPUT_NAMES
    from ..data.packing import attention_inputs
    from ..train.loss import per_sample_losses

    images = {name: batch[name] for name in IMAGE_INPUT_NAMES if name in batch}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **images,
                   **attention_inputs(batch["segment_ids"], batch["position_ids"])).logits
    return per_sample_losses(logits.float(), batch["labels"], batch["sample_ids"])


def packed_vs_unpacked(device: torch.device, s: dict) -> dict:
    """Per-sample losses of the samples alone and packed into rows (fp32)."""
    from ..data.collator import collate_rows, dummy_image_inputs
    from ..data.packing import pack_rows

    model, processor = _model("finevit", s, device, torch.float32, "sdpa")
    samples, dummy, pad = _samples(processor, s), dummy_image_inputs(processor), processor.tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat([_losses(model, _to_device(collate_rows([[x]], pad, dummy), device, torch.float32))
                           for x in samples])
        rows = pack_rows([x.length for x in samples], s["pack_length"])
        packed = _losses(model, _to_device(collate_rows([[samples[i] for i in r] for r in rows], pad, dummy),
                                           device, torch.float32))
    order = [i for row in rows for i in row]
    return {"rows": len(rows), "samples": len(samples), "max_abs_diff": float((packed - alone[order]).abs().max())}


def flash_vs_sdpa(device: torch.device, s: dict) -> dict:
    """Encoder features and LLM logits with flash-attention vs sdpa, bf16 (needs CUDA and flash-attn)."""
    from transformers.utils import is_flash_attn_2_available

    if device.type != "cuda" or not is_flash_attn_2_available():
        return {"ran": False, "why": "needs CUDA and flash-attn (pip install flash-attn)"}
    from ..data.collator import collate_rows, dummy_image_inputs

    outputs = {}
    for attn in ("sdpa", "flash_attention_2"):
        model, processor = _model("finevit", s, device, torch.bfloat16, attn)
        samples = _samples(processor, s)[:2]
        batch = _to_device(collate_rows([samples], processor.tokenizer.pad_token_id, dummy_image_inputs(processor)),
                           device, torch.bfloat16)
        with torch.no_grad():
            features = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).last_hidden_state
            outputs[attn] = (features.float(), _losses(model, batch))
    (f_sdpa, l_sdpa), (f_flash, l_flash) = outputs["sdpa"], outputs["flash_attention_2"]
    return {"ran": True, "encoder_max_rel_diff": float((f_flash - f_sdpa).abs().max() / f_sdpa.abs().max()),
            "loss_max_abs_diff": float((l_flash - l_sdpa).abs().max())}


def encoder_mfu(device: torch.device, s: dict, peak: float | None, attn: str) -> dict:
    """Forward+backward of the encoder alone on mixed-resolution images: seconds, FLOPs, MFU; FineViT and Qwen2-VL."""
    results = {}
    for encoder in ("finevit", "qwen2-vl"):
        # Only the encoder (+ projector) runs here: Qwen2-VL's tower gets a small LLM.
        model, processor = _model(encoder, s, device, torch.bfloat16 if device.type == "cuda" else torch.float32, attn,
                                  small_llm=encoder != "finevit")
        tower = model.model.vision_tower
        images = [_image(h, w, i) for i, (h, w) in enumerate(s["image_sides"])]
        inputs = _to_device(processor.process_images(images), device, next(tower.parameters()).dtype)

        def step(model=model, inputs=inputs):
            features = model.get_image_features(**inputs).last_hidden_state
            features.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        flops, seconds = _flops(step), _seconds(step, device, s["repeats"])
        results[encoder] = {"patches": int(inputs["image_grid_thw"].prod(-1).sum()), "seconds": seconds,
                            "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None}
    return results


def train_step(device: torch.device, s: dict, peak: float | None, attn: str) -> dict:
    """One Stage III optimizer step (packed rows, encoder trained, AdamW): tokens/s and MFU with every FLOP counted."""
    from ..data.collator import collate_rows, dummy_image_inputs
    from ..data.packing import pack_rows

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = _model("finevit", s, device, dtype, attn)
    samples = _samples(processor, s)
    rows = pack_rows([x.length for x in samples], s["pack_length"])
    batch = _to_device(collate_rows([[samples[i] for i in r] for r in rows], processor.tokenizer.pad_token_id,
                                    dummy_image_inputs(processor)), device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        losses = _losses(model, batch)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops, seconds = _flops(step), _seconds(step, device, s["repeats"])
    tokens = int((batch["segment_ids"] >= 0).sum())
    return {"rows": len(rows), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / peak if peak else None}


def generation(device: torch.device, s: dict, attn: str) -> dict:
    """Batched greedy generation with images: new tokens per second."""
    from ..eval.generation import generate_answers, image_question_chat

    model, processor = _model("finevit", s, device, torch.bfloat16 if device.type == "cuda" else torch.float32, attn)
    model.eval()
    chats = [image_question_chat(_image(h, w, i), "Describe the image.")
             for i, (h, w) in enumerate(s["image_sides"] * 2)]
    kwargs = {"max_new_tokens": s["new_tokens"], "min_new_tokens": s["new_tokens"], "do_sample": False}
    seconds = _seconds(lambda: generate_answers(model, processor, chats, **kwargs), device, max(1, s["repeats"] // 2))
    return {"batch": len(chats), "new_tokens": s["new_tokens"], "seconds": seconds,
            "new_tokens_per_s": len(chats) * s["new_tokens"] / seconds}


def run(device: str, tiny: bool, peak_tflops: float | None) -> dict:
    from ..train.metrics import peak_flops_per_device

    torch_device = torch.device(device)
    s = _settings(tiny)
    peak = peak_tflops * 1e12 if peak_tflops else (peak_flops_per_device(None, torch.bfloat16)
                                                   if torch_device.type == "cuda" else None)
    attn = "sdpa"
    result = {"device": torch.cuda.get_device_name() if torch_device.type == "cuda" else device, "tiny": tiny,
              "peak_tflops": peak / 1e12 if peak else None,
              "packed_vs_unpacked": packed_vs_unpacked(torch_device, s),
              "flash_vs_sdpa": flash_vs_sdpa(torch_device, s)}
    if result["flash_vs_sdpa"]["ran"]:
        attn = "flash_attention_2"
    result.update(attention=attn, encoder=encoder_mfu(torch_device, s, peak, attn),
                  train_step=train_step(torch_device, s, peak, attn), generation=generation(torch_device, s, attn))
    return result


def markdown(result: dict) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    p, f = result["packed_vs_unpacked"], result["flash_vs_sdpa"]
    lines = [f"# GPU check on {result['device']}" + (" (tiny: numbers mean nothing)" if result["tiny"] else ""), "",
             (f"- packed vs unpacked per-sample loss: max abs diff {p['max_abs_diff']:.2e} ({p['samples']} samples in "
             f"{p['rows']} rows)"),
             (f"- flash-attention vs sdpa (bf16): encoder max rel diff {f['encoder_max_rel_diff']:.2e}, loss max abs diff "
              f"{f['loss_max_abs_diff']:.2e}" if f["ran"] else f"- flash-attention vs sdpa: not run ({f['why']})"),
             f"- attention used below: {result['attention']}; peak {result['peak_tflops'] or 'unknown'} TFLOP/s", "",
             "| measurement | FineViT | Qwen2-VL tower |", "|---|---|---|"]
    e = result["encoder"]
    lines += [(f"| encoder fwd+bwd, {e['finevit']['patches']} patches: seconds | {e['finevit']['seconds']:.3f} | "
              f"{e['qwen2-vl']['seconds']:.3f} |"),
              (f"| encoder fwd+bwd: TFLOP/s (MFU) | {e['finevit']['tflops_per_s']:.1f} ({pct(e['finevit']['mfu'])}) | "
              f"{e['qwen2-vl']['tflops_per_s']:.1f} ({pct(e['qwen2-vl']['mfu'])}) |"), ""]
    t, g = result["train_step"], result["generation"]
    lines += [(f"- Stage III step ({t['rows']} packed rows, {t['tokens']} tokens): {t['tokens_per_s']:.0f} tokens/s, "
              f"MFU {pct(t['mfu'])}"),
              f"- generation, batch {g['batch']}: {g['new_tokens_per_s']:.0f} new tokens/s", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--tiny", action="store_true", help="test-size models (checks the script runs; numbers mean nothing)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, for MFU")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"), help="folder for gpu_check.json / .md")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --device cpu --tiny to check the script", flush=True)
        return 2
    result = run(args.device, args.tiny, args.peak_tflops)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
