"""The text a locally built tokenizer is trained on (`finevit_vl.tiny.build_tokenizer`): one rule for the trainer's
`model.init: tiny` and the demo's initial model.

The corpus is what the model reads and writes: the text fields of the training records (conversation turns, region
texts, OCR texts, referring expressions, captions; see `finevit_vl.data.schema`) and the task prompts the renderer
wraps around them, with their `{box}` / `{text}` slots. Ids, roles, task names and paths are not text the model sees.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from .prompts import BOX_TO_CAPTION, BOX_TO_OCR, CAPTION, CAPTION_TO_BOX, OCR_TO_BOX


RENDER_PROMPTS: tuple[str, ...] = (CAPTION, BOX_TO_CAPTION, CAPTION_TO_BOX, BOX_TO_OCR, OCR_TO_BOX)


def record_texts(record: Mapping[str, Any]) -> list[str]:
    """The text fields of one schema record, in a fixed order (turns, regions, OCR, grounding, caption)."""
    texts = [turn.get("content") for turn in record.get("conversations") or []]
    texts += [region.get("text") for region in record.get("regions") or []]
    texts += [item.get("text") for item in record.get("ocr") or []]
    texts += [item.get("expression") for item in record.get("grounding") or []]
    texts.append(record.get("caption"))
    # Records are not validated yet here (bad ones are skipped at encoding): keep only real text.
    return [text for text in texts if isinstance(text, str) and text]


def tokenizer_corpus(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Texts of `records` in order, then `RENDER_PROMPTS`; pass as many records as the tokenizer should see."""
    return [text for record in records for text in record_texts(record)] + list(RENDER_PROMPTS)


__all__ = ["RENDER_PROMPTS", "record_texts", "tokenizer_corpus"]
