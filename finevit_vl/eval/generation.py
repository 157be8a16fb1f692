"""Batched chat generation with a FineViT-VL model: what the lmms-eval plugin and the demo's reports both answer with."""

import torch


Chat = tuple[list[dict], list]  # (HF chat messages with {"type": "image"} placeholders, the images in order)


@torch.no_grad()
def generate_answers(model, processor, chats: list[Chat], device: torch.device | None = None, **generation) -> list[str]:
    """The model's answers to a batch of chats (decoded new tokens, special tokens skipped), with `generation` passed
    to `generate()`. Prompts are left-padded, and the model is in eval mode for the call only."""
    tokenizer = processor.tokenizer
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) for messages, _ in chats]
    images = [image for _, chat_images in chats for image in chat_images]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    try:
        inputs = processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(device if device is not None else model.device)
        model.eval()
        output_ids = model.generate(**inputs, **generation)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    # Left padding: every prompt ends at the same column, so the new tokens are what follows it.
    return tokenizer.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def image_question_chat(image, question: str) -> Chat:
    """One user turn: the image, then the question (the layout of the project's tasks and training data)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], [image]


__all__ = ["Chat", "generate_answers", "image_question_chat"]
