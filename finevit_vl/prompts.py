"""Task prompts shared by training data and evaluation, so that a model is evaluated with the wording it was trained on.

Region prompts follow GranViT (Bbox2Caption / Caption2Bbox); boxes inside prompts and answers are rendered with
`finevit_vl.boxes` (default: integers 0-1000, ``[x1, y1, x2, y2]``).
"""

CAPTION = "Describe the image in detail."
BOX_TO_CAPTION = "Describe the content contained within the normalized bounding box coordinates {box} in no more than 10 words."
CAPTION_TO_BOX = "Please provide the bounding box coordinate of the region this sentence describes: {text}"
BOX_TO_OCR = "What text is written within the normalized bounding box coordinates {box}?"
OCR_TO_BOX = "Please provide the bounding box coordinate of the text: {text}"
READ_ALL_TEXT = "Read all the text in the image."

# Short-answer VQA suffix, as in lmms-eval's DocVQA / ChartQA prompts.
SHORT_ANSWER = "Answer the question using a single word or phrase."
COUNT_QUESTION = "How many {name} are there in the image?"
NUMBER_ANSWER = "Answer with a single number."


def short_answer(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER}"


def count_question(name: str) -> str:
    return f"{COUNT_QUESTION.format(name=name)}\n{NUMBER_ANSWER}"


__all__ = [
    "BOX_TO_CAPTION",
    "BOX_TO_OCR",
    "CAPTION",
    "CAPTION_TO_BOX",
    "COUNT_QUESTION",
    "NUMBER_ANSWER",
    "OCR_TO_BOX",
    "READ_ALL_TEXT",
    "SHORT_ANSWER",
    "count_question",
    "short_answer",
]
