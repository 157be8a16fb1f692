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


def number_answer(question: str) -> str:
    return f"{question}\n{NUMBER_ANSWER}"


def count_question(name: str) -> str:
    return number_answer(COUNT_QUESTION.format(name=name))


def benchmark_prompt(benchmark: str, text: str) -> str:
    """The prompt of one question of a benchmark (``docvqa``, ``chartqa``, ``ocrbench``, ``countbench``, ``refcoco``;
    `text` is the question, for ``refcoco`` the referring expression), as the FineViT lmms-eval tasks ask it: in the
    wording of the matching training data."""
    if benchmark in ("docvqa", "chartqa"):
        return short_answer(text)
    if benchmark == "ocrbench":
        # Our OCR training data asks with the short-answer suffix; OCRBench scores by substring, so the suffix is safe.
        return short_answer(text.strip())
    if benchmark == "countbench":
        # Training's `count_question(name)` for CountBench's "How many {name} are there in the image?".
        return number_answer(text.strip())
    if benchmark == "refcoco":
        return CAPTION_TO_BOX.format(text=text)
    raise ValueError(f"no prompt for benchmark {benchmark!r}; one of docvqa, chartqa, ocrbench, countbench, refcoco")


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
    "benchmark_prompt",
    "count_question",
    "number_answer",
    "short_answer",
]
