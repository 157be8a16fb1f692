"""`finevit-vl web-demo MODEL_DIR`: try a FineViT-VL checkpoint in the browser (Gradio).

An image upload, a multi-turn chat (the image goes with the next question after each upload), generation settings and
answers streamed as they are generated. Boxes in an answer (`[x1, y1, x2, y2]` in the model's box convention, see
`finevit_vl.boxes`) are drawn on the image. Needs the `demo` extra: `pip install "finevit-vl[demo]"`.

The same app answers programmatically, e.g. with `gradio_client`:
`Client(url).predict("How many circles?", handle_file("x.png"), 64, 0.0, api_name="/chat")`.
"""

import argparse
import hashlib
import os
import sys
import threading

from PIL import Image, ImageDraw

from .boxes import BOX_FORMATS, BOX_PATTERN, normalized_to_pixels, parse_box
from .chat import DTYPE_CHOICES, Conversation, generation_kwargs, load_model, reply
from .cli import report_user_error


BOX_COLOR = (255, 0, 0)
MAX_NEW_TOKENS_LIMIT = 2048


def answer_boxes(answer: str, width: int, height: int, box_format: str = "int1000") -> list[list[float]]:
    """Every `[x1, y1, x2, y2]` in `answer`, in pixels of a `width x height` image."""
    boxes = (parse_box(match.group(0), box_format) for match in BOX_PATTERN.finditer(answer))
    return [normalized_to_pixels(box, width, height) for box in boxes if box is not None]


def draw_boxes(image: Image.Image, boxes: list[list[float]]) -> Image.Image:
    """A copy of `image` with `boxes` (pixels) outlined."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(image.size) / 150))
    for box in boxes:
        draw.rectangle([round(v) for v in box], outline=BOX_COLOR, width=line)
    return image


def _image_key(image: Image.Image) -> str:
    # Gradio hands a new PIL object each call: the same upload is recognised by its pixels.
    return hashlib.sha1(f"{image.size}{image.mode}".encode() + image.tobytes()).hexdigest()


class DemoSession:
    """One browser session: the conversation and which upload it has already seen."""

    def __init__(self) -> None:
        self.conversation = Conversation()
        self.image_key: str | None = None

    def reset(self) -> None:
        self.conversation.reset()
        self.image_key = None

    def display(self) -> list[dict]:
        """The conversation as Gradio chatbot messages (text only; a turn with an image is marked)."""
        shown = []
        for message in self.conversation.messages:
            text = "".join(item.get("text", "") for item in message["content"])
            if any(item["type"] == "image" for item in message["content"]):
                text = f"(image) {text}"
            shown.append({"role": message["role"], "content": text})
        return shown


def build_demo(model, processor, box_format: str = "int1000", default_max_new_tokens: int = 256,
               title: str = "FineViT-VL"):
    """The Gradio `Blocks` app for `model` / `processor` (not launched). Its `/chat` endpoint takes
    `(question, image, max_new_tokens, temperature)` and streams `(chat messages, image with boxes, "")`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from transformers import TextIteratorStreamer

    def respond(question, image, max_new_tokens, temperature, session: DemoSession):
        question = (question or "").strip()
        if not question:
            raise gr.Error("Type a question first.")
        conversation = session.conversation
        key = None if image is None else _image_key(image)
        if key is not None and key != session.image_key:
            conversation.attach(image.convert("RGB"))
            session.image_key = key
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def generate() -> None:
            try:
                result["answer"] = reply(model, processor, conversation, question, streamer=streamer,
                                         **generation_kwargs(int(max_new_tokens), float(temperature)))
            except Exception as error:  # noqa: BLE001 - shown in the browser; the conversation is unchanged (`reply`)
                result["error"] = error
                streamer.end()

        # What the chat shows while streaming, taken before the generation thread adds the question to the history.
        shown = [*session.display(), {"role": "user", "content": ("(image) " if conversation.pending else "") + question}]
        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        partial = ""
        for chunk in streamer:
            partial += chunk
            yield [*shown, {"role": "assistant", "content": partial}], gr.skip(), gr.skip(), session
        thread.join()
        if "error" in result:
            raise gr.Error(str(result["error"]))
        # The final text is the decoded answer itself (what the history keeps), not the streamed pieces.
        boxes_image = None
        last_image = conversation.last_image
        if last_image is not None:
            boxes = answer_boxes(result["answer"], *last_image.size, box_format=box_format)
            boxes_image = draw_boxes(last_image, boxes) if boxes else None
        yield session.display(), boxes_image, "", session

    def clear(session: DemoSession):
        session.reset()
        return [], None, "", session

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nUpload an image, ask about it; the conversation continues until **Clear**. "
                    f"A new upload goes with the next question. Boxes in answers are drawn on the image.")
        session = gr.State(DemoSession())
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="image", sources=["upload", "clipboard"])
                boxes_image = gr.Image(type="pil", label="Boxes in the answer", elem_id="boxes", interactive=False,
                                       format="png")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
                question = gr.Textbox(label="Question", placeholder="How many circles are there?", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_button = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=default_max_new_tokens, step=1,
                                               label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
        inputs = [question, image, max_new_tokens, temperature, session]
        outputs = [chatbot, boxes_image, question, session]
        # One generation at a time, whichever way it is started: every session shares the one model.
        send.click(respond, inputs, outputs, api_name="chat", concurrency_id="model", concurrency_limit=1)
        question.submit(respond, inputs, outputs, api_name=False, concurrency_id="model", concurrency_limit=1)
        clear_button.click(clear, [session], outputs, api_name="clear")
    return demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finevit-vl web-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="FineViT-VL checkpoint directory (`finevit-vl build` / `export` output)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: reachable from other machines)")
    parser.add_argument("--share", action="store_true",
                        help="also publish a temporary public gradio.live link (default: off, local only)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="initial most tokens per answer")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="pixel budget per image (default: the checkpoint's image processor setting)")
    parser.add_argument("--box-format", choices=BOX_FORMATS, default="int1000",
                        help="box convention the model answers in (the one it was trained with)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype (auto: as saved in the checkpoint)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('finevit-vl web-demo: error: Gradio is not installed; pip install "finevit-vl[demo]"', file=sys.stderr)
        return 2
    try:
        model, processor = load_model(args.model_dir, args.device, args.dtype, args.max_pixels)
    except (ValueError, OSError) as error:
        return report_user_error("web-demo", error)
    demo = build_demo(model, processor, args.box_format, args.max_new_tokens)
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
