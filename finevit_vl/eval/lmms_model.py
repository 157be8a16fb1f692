"""The lmms-eval chat model ``finevit_vl``: batched generation with a FineViT-VL checkpoint.

Command line (registered through the ``lmms_eval.models`` entry point)::

    lmms-eval --model finevit_vl --model_args pretrained=DIR,max_pixels=1003520 --batch_size 8 \\
        --include_path "$(finevit-vl tasks-path)" --tasks finevit_suite

(lmms-eval passes ``--batch_size`` itself, so ``batch_size`` inside ``--model_args`` is rejected as a duplicate.)
Multi-process: ``accelerate launch --num_processes N -m lmms_eval ...``; on CPU-only hosts
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m lmms_eval ...``.

Boxes: the model answers in its training convention (``box_format``); each answer's boxes are rewritten into the
convention the task scores (``task_box_format``): ``norm1`` floats in [0, 1] for lmms-eval's built-in
``refcoco*_bbox_rec_*`` tasks (their ``parse_float_sequence_within``), ``int1000`` for every other task (ours, and
the built-in ``refcoco*_grounding_*`` tasks, which read 0-1000 boxes). So ``[100, 200, 500, 600]`` from an
``int1000`` model reaches ``refcoco_bbox_rec_val`` as ``[0.1, 0.2, 0.5, 0.6]``.

In-process, e.g. evaluation during training, wrap an already-loaded model: ``FineViTVL.from_model(model, processor)``.
The wrapper survives ``evaluate()`` (its ``clean()`` keeps the model), so one instance can be evaluated many times.
"""

import copy
import gc
import os
import re

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from lmms_eval.utils import Collator
from tqdm import tqdm

from finevit_vl import boxes
from finevit_vl.eval.generation import generate_answers


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 128
# Built-in lmms-eval tasks that parse boxes in another convention than int1000, by task name.
BUILTIN_TASK_BOX_FORMATS: tuple[tuple[re.Pattern, str], ...] = ((re.compile(r"refcoco(\+|g)?_bbox_rec_"), "norm1"),)
TASK_BOX_FORMATS = ("auto", *boxes.BOX_FORMATS)


def task_box_format(task: str | None) -> str:
    """The box convention a task parses: ``norm1`` for lmms-eval's ``refcoco*_bbox_rec_*``, else ``int1000``."""
    return next((fmt for pattern, fmt in BUILTIN_TASK_BOX_FORMATS if task and pattern.match(task)), "int1000")


class FineViTVL(lmms):
    """FineViT-VL for lmms-eval chat tasks (requests ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``).

    Args:
        pretrained: checkpoint directory (or hub id) loadable with ``AutoModelForImageTextToText``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available. Under ``accelerate launch`` each
            process uses its own device and lmms-eval hands it its share of the documents.
        dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
        batch_size: prompts generated together (left-padded, sorted by length); ``--batch_size`` on the CLI.
        max_pixels, min_pixels: override the image processor's pixel budget.
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``.
        adapter: a PEFT adapter directory, merged into the model after loading.
        box_format: the box convention the model answers in (`finevit_vl.boxes`), the one it was trained with.
        task_box_format: the convention answers are rewritten into: ``auto`` (default) per task (``norm1`` for
            lmms-eval's built-in ``refcoco*_bbox_rec_*``, ``int1000`` for the others, see `task_box_format`), or
            ``int1000`` / ``norm1`` for every task.
        max_new_tokens: used when a task sets none.
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        attn_implementation: str | None = None,
        adapter: str | None = None,
        box_format: str = "int1000",
        task_box_format: str = "auto",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: int | None = None,  # passed by lmms-eval; batch sizes are fixed here
        **kwargs,
    ) -> None:
        if kwargs:
            raise ValueError(f"Unknown finevit_vl model_args {sorted(kwargs)}; see `help(finevit_vl.eval.lmms_model.FineViTVL)`.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        super().__init__()
        from accelerate import Accelerator
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import finevit_vl  # noqa: F401  (registers the FineViT-VL auto classes)

        # lmms-eval shards by the launcher's WORLD_SIZE / RANK; Accelerator picks the device and gathers the results
        # (on CPU-only hosts it needs ACCELERATE_USE_CPU=1).
        accelerator = Accelerator() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if accelerator is not None:
            device = str(accelerator.device)
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"

        load_kwargs = {"dtype": DTYPES[dtype]}
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model = model.to(device).eval()
        processor = AutoProcessor.from_pretrained(pretrained)
        self._attach(model, processor, batch_size, max_pixels, min_pixels, box_format, max_new_tokens, accelerator,
                     task_box_format)

    @classmethod
    def from_model(
        cls,
        model,
        processor,
        batch_size: int = 1,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        box_format: str = "int1000",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        accelerator=None,
        task_box_format: str = "auto",
    ) -> "FineViTVL":
        """Wrap an already-loaded (unwrapped, not DDP) model and its processor, e.g. inside a training loop.

        The model stays where it is; its train/eval mode is restored after each generation call. Pass the training
        ``accelerator`` when running multi-process so lmms-eval gathers results through it.
        """
        self = cls.__new__(cls)
        lmms.__init__(self)
        self._attach(model, processor, batch_size, max_pixels, min_pixels, box_format, max_new_tokens, accelerator,
                     task_box_format)
        return self

    def _attach(self, model, processor, batch_size, max_pixels, min_pixels, box_format, max_new_tokens, accelerator,
                task_box_format="auto"):
        boxes.check_box_format(box_format)
        if task_box_format not in TASK_BOX_FORMATS:
            raise ValueError(f"task_box_format must be one of {TASK_BOX_FORMATS}, got {task_box_format!r}")
        self.task_box_format = task_box_format
        self.model = model
        self.processor = processor
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.box_format = box_format
        self.max_new_tokens = int(max_new_tokens)
        if max_pixels is not None or min_pixels is not None:
            # Own copy of the image processor, so a training loop's processor keeps its budget.
            processor = copy.copy(processor)
            processor.image_processor = copy.deepcopy(processor.image_processor)
            self.processor = processor
        processor.set_pixel_budget(min_pixels, max_pixels)
        if accelerator is not None:
            self.accelerator = accelerator
            if accelerator.num_processes > 1:
                self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -----------------------------------------------------------------------------------------------------------------
    # lmms API

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("finevit_vl only supports generation tasks (output_type: generate_until).")

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError("finevit_vl does not support multi-round generation tasks.")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Batches share generation kwargs (args[2]); within a group the longest prompts go first so memory problems
        # show early. The Collator gives the answers back in request order.
        args = [request.args for request in requests]
        collator = Collator(args, sort_fn=lambda a: -len(a[0]), group_fn=lambda a: a[2], grouping=True)
        answers = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="finevit_vl generating")
        for batch in collator.get_batched(n=self.batch_size):
            answers += self._generate(batch)
            progress.update(len(batch))
        progress.close()
        return collator.get_original(answers)

    def clean(self) -> None:
        # lmms.clean() deletes every nn.Module attribute; keep the model so the wrapper can be evaluated again.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -----------------------------------------------------------------------------------------------------------------
    # Generation

    def _chat(self, doc_to_messages, doc_id, task, split) -> tuple[list[dict], list]:
        """-> (HF chat messages with ``{"type": "image"}`` placeholders, the images in order)."""
        chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        images, videos, audios = chat.extract_media()
        if videos or audios:
            raise ValueError(f"finevit_vl takes images and text only; task {task!r} sends video or audio.")
        messages = chat.to_hf_messages()
        for message in messages:
            message["content"] = [{"type": "image"} if item["type"] == "image" else item for item in message["content"]]
        return messages, images

    def _generate(self, batch_args: list[tuple]) -> list[str]:
        chats = [self._chat(doc_to_messages, doc_id, task, split) for _, doc_to_messages, _, doc_id, task, split in batch_args]
        gen_kwargs = dict(batch_args[0][2])
        until = gen_kwargs.pop("until", None) or []
        until = [stop for stop in ([until] if isinstance(until, str) else until) if stop]
        answers = generate_answers(self.model, self.processor, chats, self.device, **self._generation_config(gen_kwargs, until))
        return [self._postprocess(answer, until, args[4]) for answer, args in zip(answers, batch_args)]

    def _generation_config(self, gen_kwargs: dict, until: list[str]) -> dict:
        temperature = float(gen_kwargs.get("temperature", 0.0))
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        config = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "do_sample": do_sample,
            "num_beams": int(gen_kwargs.get("num_beams", 1)),
            "pad_token_id": self.processor.tokenizer.pad_token_id,
        }
        if do_sample:
            config.update(temperature=temperature or 1.0, top_p=float(gen_kwargs.get("top_p", 1.0)))
        if until:
            # Stop early on the task's stop strings; the answer is cut at them afterwards anyway.
            config.update(stop_strings=until, tokenizer=self.processor.tokenizer)
        return config

    def _postprocess(self, answer: str, until: list[str], task: str | None = None) -> str:
        for stop in until:
            answer = answer.split(stop, 1)[0]
        answer = answer.strip()
        target = task_box_format(task) if self.task_box_format == "auto" else self.task_box_format
        if self.box_format != target:
            # Rewrite the model's boxes into the convention the task parses.
            answer = boxes.BOX_PATTERN.sub(
                lambda m: boxes.box_to_text(boxes.parse_box(m.group(0), self.box_format), 1, 1, target), answer
            )
        return answer


__all__ = ["BUILTIN_TASK_BOX_FORMATS", "FineViTVL", "task_box_format"]
