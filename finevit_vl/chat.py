"""`finevit-vl chat MODEL_DIR [--image PATH ...]`: talk to a FineViT-VL checkpoint in the terminal.

Multi-turn: the whole conversation (images where they were attached) goes through the model's chat template at each
turn. Answers stream token by token. Commands inside the chat: `/image PATH` attaches an image to the next question,
`/reset` starts a new conversation, `/quit` (or Ctrl-D) leaves. When stdin is not a terminal, each line is a question
and only the answers are printed, so `echo "How many circles?" | finevit-vl chat DIR --image x.png` prints one answer.
"""

import argparse
import os
import sys
from dataclasses import dataclass, field

from .cli import report_user_error


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
COMMANDS_HELP = "/image PATH  attach an image to the next question   /reset  new conversation   /quit  leave"


def load_model(model_dir: str, device: str | None = None, dtype: str = "auto", max_pixels: int | None = None):
    """`(model, processor)` of a FineViT-VL checkpoint directory, the model in eval mode on `device` (default: CUDA
    when available). Raises `ValueError` / `OSError` for a directory that is missing or holds no model."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory not found: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import finevit_vl  # noqa: F401  (registers the FineViT-VL auto classes)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.set_pixel_budget(None, max_pixels)
    return model.to(device).eval(), processor


def open_image(path: str):
    """The image at `path`, decoded by the processor's own decoder; `ValueError` naming the file when it is missing or
    not an image."""
    from .models.image_processing_finevit import to_rgb_image

    return to_rgb_image(path)


def generation_kwargs(max_new_tokens: int, temperature: float = 0.0) -> dict:
    """`generate()` settings: greedy at temperature 0, sampling above."""
    if temperature > 0:
        return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature}
    return {"max_new_tokens": max_new_tokens, "do_sample": False}


@dataclass
class Conversation:
    """A multi-turn chat in the form `generate_answers` takes: HF messages with `{"type": "image"}` placeholders and
    the images in order. Images attached with `attach` go into the next user turn."""

    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)
    pending: list = field(default_factory=list)

    def attach(self, image) -> None:
        self.pending.append(image)

    def reset(self) -> None:
        self.messages, self.images, self.pending = [], [], []

    def ask(self, question: str) -> tuple[list[dict], list]:
        """Add a user turn (pending images first, then the question); returns the chat to answer."""
        content = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": question}]
        self.messages.append({"role": "user", "content": content})
        self.images += self.pending
        self.pending = []
        return self.messages, self.images

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})

    @property
    def last_image(self):
        """The newest image of the conversation (pending ones included), or `None`."""
        return (self.images + self.pending)[-1] if self.images or self.pending else None


def reply(model, processor, conversation: Conversation, question: str, streamer=None, **generation) -> str:
    """Ask `question` in `conversation`, generate the answer (streamed to `streamer` when given) and keep it in the
    history. On failure the question is taken back, so the conversation stays as it was."""
    from .eval.generation import generate_answers

    before = len(conversation.messages), len(conversation.images)
    pending = list(conversation.pending)
    chat = conversation.ask(question)
    try:
        text = generate_answers(model, processor, [chat], streamer=streamer, **generation)[0]
    except BaseException:
        del conversation.messages[before[0]:], conversation.images[before[1]:]
        conversation.pending = pending
        raise
    conversation.answer(text)
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finevit-vl chat", description=__doc__.split("\n\n")[0],
                                     epilog="In the chat: " + COMMANDS_HELP)
    parser.add_argument("model_dir", help="FineViT-VL checkpoint directory (`finevit-vl build` / `export` output)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="image attached to the first question (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy, the default)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="pixel budget per image (default: the checkpoint's image processor setting)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype (auto: as saved in the checkpoint)")
    return parser


def _chat_loop(model, processor, conversation: Conversation, args, interactive: bool) -> int:
    from transformers import TextStreamer

    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generation = generation_kwargs(args.max_new_tokens, args.temperature)
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:  # Ctrl-D
                print()
                return 0
        else:
            line = sys.stdin.readline()
            if not line:
                return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            conversation.reset()
            if interactive:
                print("(new conversation: history and images cleared)")
            continue
        if line == "/help":
            print(COMMANDS_HELP)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip().strip("'\"")
            try:
                if not path:
                    raise ValueError("usage: /image PATH")
                conversation.attach(open_image(path))
            except ValueError as error:
                print(f"finevit-vl chat: error: {error}", file=sys.stderr)
                if not interactive:  # a script with a bad path fails like the command line does
                    return 2
                continue
            if interactive:
                print(f"(image attached to the next question: {path})")
            continue
        try:
            reply(model, processor, conversation, line, streamer=streamer, **generation)
        except ValueError as error:  # e.g. an image the processor refuses (aspect ratio): the question is taken back
            print(f"finevit-vl chat: error: {error}", file=sys.stderr)
            if not interactive:
                return 2
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(answer interrupted; the question was taken back)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    conversation = Conversation()
    try:
        for path in args.image:
            conversation.attach(open_image(path))
        model, processor = load_model(args.model_dir, args.device, args.dtype, args.max_pixels)
    except (ValueError, OSError) as error:  # a user's mistake (paths, not a model, not an image): one line, no traceback
        return report_user_error("chat", error)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        images = f", {len(args.image)} image(s) attached" if args.image else ""
        print(f"FineViT-VL chat with {args.model_dir}{images}. {COMMANDS_HELP}")
    try:
        return _chat_loop(model, processor, conversation, args, interactive)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
