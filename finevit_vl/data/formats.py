"""Records in the formats users already have -> the one schema of `finevit_vl.data.schema`, detected per record.

Accepted formats (one example record each in the README, section "Data"):

* **FineViT-VL** (``"task"`` key): passed through unchanged.
* **LLaVA** (``"conversations"`` of ``{"from": "human" | "gpt" | "system", "value": str}``, ``"image"``: a path, a
  list of paths or absent), as in LLaVA-1.5 / LLaVA-OneVision JSON and JSONL files. LLaMA-Factory's ShareGPT files
  use the same turns with ``"images"`` and an optional top-level ``"system"``; both are read here.
* **ShareGPT / OpenAI messages** (``"messages"`` of ``{"role": "user" | "assistant" | "system", "content": ...}``,
  ``"images"``: a list of paths), as in LLaMA-Factory's ``mllm_demo`` data. ``content`` is a string, or a list of
  ``{"type": "text", "text"}`` / ``{"type": "image"}`` parts.

``<image>`` in a user turn marks where each image goes (one per image, in order); without any, the images open the
first user turn. A system turn may open the conversation. Any other keys of a foreign record are kept under
``meta``. The result is a ``conversation`` record; every check beyond the format (alternating turns, marker counts,
images) is `validate_record`'s, so a record is rejected for the same reasons whatever format it came in.
"""

import os
from typing import Any

from .schema import IMAGE_MARKER, BadRecordError, Record, record_location


# name -> how a reader recognises it (for the error of a record in none of them).
FORMATS: dict[str, str] = {
    "FineViT-VL": "a 'task' key (caption, region, ocr, grounding, conversation)",
    "LLaVA": "'conversations': [{'from': 'human' | 'gpt' | 'system', 'value': ...}] with 'image'",
    "ShareGPT": "'messages': [{'role': 'user' | 'assistant' | 'system', 'content': ...}] with 'images'",
}
_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# Keys a foreign format defines; everything else goes under "meta".
_FOREIGN_KEYS: frozenset[str] = frozenset({"id", "image", "images", "conversations", "messages", "system"})


def record_format(record: dict[str, Any]) -> str | None:
    """The format of ``record`` (a `FORMATS` key), or ``None`` when it matches none of them."""
    if "task" in record:
        return "FineViT-VL"
    if isinstance(record.get("messages"), list):
        return "ShareGPT"
    turns = record.get("conversations")
    if isinstance(turns, list) and turns and all(isinstance(turn, dict) for turn in turns):
        # LLaMA-Factory lets a dataset name its turn keys either way; so do we.
        if all("from" in turn and "value" in turn for turn in turns):
            return "LLaVA"
        if all("role" in turn and "content" in turn for turn in turns):
            return "ShareGPT"
    return None


def to_schema(record: dict[str, Any], where: str) -> Record:
    """``record`` in our schema (a FineViT-VL record is returned as is); `BadRecordError` naming ``where`` if it is in
    none of the `FORMATS` or its turns cannot be read."""
    found = record_format(record)
    if found == "FineViT-VL" or "_error" in record:
        return record
    location = record_location(record, where)
    if found is None:
        accepted = "; ".join(f"{name} ({signature})" for name, signature in FORMATS.items())
        raise BadRecordError(
            location,
            f"record with keys {sorted(k for k in record if not k.startswith('_'))} is in none of the accepted formats: "
            f"{accepted}. Nearest: {_nearest(record)}",
            "schema",
        )
    turns_key = "messages" if "messages" in record else "conversations"
    try:
        turns = [_turn(turn, f"{turns_key}[{index}]") for index, turn in enumerate(record[turns_key])]
    except ValueError as err:
        raise BadRecordError(location, f"{found} record: {err}", "schema") from None
    if isinstance(record.get("system"), str) and record["system"].strip():
        turns.insert(0, {"role": "system", "content": record["system"]})
    converted: Record = {
        "id": str(record["id"]) if record.get("id") not in (None, "") else os.path.basename(where),
        "task": "conversation",
        "conversations": turns,
    }
    image = record["images"] if "images" in record else record.get("image")
    if image not in (None, []):
        converted["image"] = image
    extra = {key: value for key, value in record.items() if key not in _FOREIGN_KEYS and not key.startswith("_")}
    if extra:
        converted["meta"] = extra
    # Transient keys set by the source (image root, encoded images) travel on.
    converted.update({key: value for key, value in record.items() if key.startswith("_")})
    return converted


def _turn(turn: Any, where: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise ValueError(f"{where} must be an object, got {turn!r}")
    speaker = turn.get("from", turn.get("role"))
    role = _ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        raise ValueError(f"{where} has role {speaker!r}; accepted roles are {sorted(_ROLES)} (tool turns are not supported)")
    content = turn.get("value", turn.get("content"))
    if isinstance(content, list):  # OpenAI-style parts
        content = "".join(_part_text(part, f"{where}.content") for part in content)
    if not isinstance(content, str):
        raise ValueError(f"{where} content must be a string or a list of text / image parts, got {content!r}")
    return {"role": role, "content": content}


def _part_text(part: Any, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind in ("image", "image_url"):
        return IMAGE_MARKER
    raise ValueError(f"{where}: expected {{'type': 'text', 'text': ...}} or {{'type': 'image'}}, got {part!r}")


def _nearest(record: dict[str, Any]) -> str:
    """The format ``record`` most resembles, with what it lacks."""
    turns = record.get("conversations")
    if "conversations" in record and not isinstance(turns, list):
        return f"LLaVA, but its 'conversations' must be a list, got {type(turns).__name__}"
    if isinstance(turns, list):
        return (
            "LLaVA, but its 'conversations' must be a non-empty list of {'from', 'value'} (or {'role', 'content'}) "
            f"objects; the first is {turns[0]!r}" if turns else "LLaVA, but its 'conversations' is empty"
        )
    if "messages" in record:
        return f"ShareGPT, but its 'messages' must be a list, got {type(record['messages']).__name__}"
    if "images" in record:
        return "ShareGPT, but it has no 'messages'"
    return "FineViT-VL, but it has no 'task'"


__all__ = ["FORMATS", "record_format", "to_schema"]
