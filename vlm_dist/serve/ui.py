"""vlm-ui: a chat page where a person drags in several images, asks, and reads the streamed reply.

    vlm-ui --server http://127.0.0.1:8000/v1 [--api-key KEY] [--host 127.0.0.1 --port 7860]
    vlm-ui --model EXPORT [--host 127.0.0.1 --port 7860]

The page talks to `vlm-serve` through its OpenAI-compatible API with the official `openai`
client, exactly as any other client would: every image goes as a base64 `data:` URL in an
`image_url` content part, in the order it was dropped in, and each request carries the whole
conversation, images of earlier turns included. With `--model` there is no server to point at,
so one is started inside this process (the serve package's own app on a free local port) and the
page talks to it the same way: one code path. What the server refuses (too many images, a file
that is not an image, ...) is shown in the chat as the server's own message, not as a traceback.

Why Gradio rather than Streamlit: Gradio's multimodal chat (`gr.ChatInterface(multimodal=True)`)
already is the page asked for -- drag-and-drop of several files into the message box, a chat
history that keeps them, a reply streamed from a Python generator into one message, a stop
button that closes the stream. It is an event-driven ASGI app on FastAPI + uvicorn, the stack
`vlm-serve` runs on. Streamlit reruns the whole script on every interaction, so the history and
the uploaded files would have to be kept by hand in `session_state`, and its chat input took no
files until recently; nothing there would be simpler.
"""
from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from vlm_dist.errors import UserError, run_cli

ERROR_MARK = "⚠️ "
"""Starts the line of a chat message that reports an error; such a turn is left out of later requests."""
EMPTY_REPLY = "(the model returned an empty reply)"
"""Shown for a reply with no text; sent back as the empty reply it was."""

TITLE = "vlm_dist chat"


class UIError(UserError):
    """A bad vlm-ui command line, or a server it cannot use."""


# ---------------------------------------------------------------------------------------------
# Chat history (Gradio's message dicts) -> OpenAI messages

def image_part(path: str) -> dict:
    """An `image_url` content part holding the file's bytes as a base64 data: URL, or a
    `video_url` part (vLLM's name) for a video file (a video/* type by its name).

    The bytes are sent as they are; the server decodes them with the same code as the training
    cache, and a file it cannot decode (or a video for a model trained without) comes back as its
    error message.
    """
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    kind = "video_url" if mime.startswith("video/") else "image_url"
    return {"type": kind, kind: {"url": f"data:{mime};base64,{data}"}}


def _file_path(item) -> str | None:
    """The local path of a file in a Gradio message, whichever shape Gradio handed it in."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if item.get("type") == "file":
            return _file_path(item.get("file"))
        if "path" in item:
            return item["path"]
    return None


def _parts(content) -> list[dict]:
    """Gradio message content (a string, a file, or a list of them) -> OpenAI content parts."""
    if not isinstance(content, (list, tuple)):
        content = [content]
    parts: list[dict] = []
    for item in content:
        if isinstance(item, str):
            parts.append({"type": "text", "text": item})
        elif isinstance(item, dict) and item.get("type") == "text":
            parts.append({"type": "text", "text": item.get("text", "")})
        elif (path := _file_path(item)) is not None:
            parts.append(image_part(path))
    return parts


def _text(parts: list[dict]) -> str:
    return "".join(p["text"] for p in parts if p["type"] == "text")


def to_openai_messages(message: dict, history: list[dict], system: str = "") -> list[dict]:
    """The request for this turn: earlier turns (their images kept) + the new message.

    `message` is the MultimodalTextbox value ({"text", "files"}); `history` is Gradio's list of
    {"role", "content"}. Consecutive messages of one role are merged (Gradio may split a turn);
    a user turn answered by an error message is dropped with its answer, so one refused message
    does not make every later request fail the same way.
    """
    turns: list[dict] = []
    for msg in history:
        role = msg.get("role")
        if role not in ("user", "assistant"):
            continue
        parts = _parts(msg.get("content"))
        if role == "assistant":
            text = _text(parts)
            if text.startswith(ERROR_MARK) or f"\n\n{ERROR_MARK}" in text:
                while turns and turns[-1]["role"] == "user":
                    turns.pop()
                continue
            parts = [{"type": "text", "text": "" if text == EMPTY_REPLY else text}]
        if turns and turns[-1]["role"] == role:
            turns[-1]["parts"] += parts
        else:
            turns.append({"role": role, "parts": parts})
    # The new message: images first, in the order they were dropped in, then the question --
    # the order Gradio shows them in the chat.
    new = [image_part(p) for p in (_file_path(f) for f in message.get("files") or []) if p]
    if message.get("text"):
        new.append({"type": "text", "text": message["text"]})
    if turns and turns[-1]["role"] == "user":
        turns[-1]["parts"] += new
    else:
        turns.append({"role": "user", "parts": new})

    out = [{"role": "system", "content": system}] if system else []
    for t in turns:
        if t["role"] == "assistant":
            out.append({"role": "assistant", "content": _text(t["parts"])})
        else:
            out.append({"role": "user", "content": t["parts"]})
    return out


def error_text(err: Exception, base_url: str) -> str:
    """One line for the chat that says what went wrong, in the server's words where it gave some."""
    import openai

    if isinstance(err, openai.APIStatusError):
        body = err.body      # the client hands over the "error" object of OpenAI's error JSON
        msg = body.get("message") if isinstance(body, dict) else None
        return f"{ERROR_MARK}The server refused this message ({err.status_code}): {msg or err.message}"
    if isinstance(err, openai.APIConnectionError):
        return f"{ERROR_MARK}Cannot reach the server at {base_url}: {err.message}"
    if isinstance(err, OSError):
        return f"{ERROR_MARK}Cannot read an uploaded file: {err}"
    return f"{ERROR_MARK}The server reported an error: {err}"


# ---------------------------------------------------------------------------------------------
# Talking to vlm-serve

class Chat:
    """The chat function behind the page: one streamed /v1/chat/completions request per turn."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 600.0):
        import openai

        self.base_url = base_url
        # The openai client insists on a key; a server started without --api-key ignores it.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout,
                                    max_retries=0)
        try:
            models = [m.id for m in self.client.models.list()]
        except openai.AuthenticationError:
            raise UIError(f"--server {base_url}: the server refused the API key ("
                          f"{'none given' if not api_key else 'wrong key'}): give its --api-key "
                          "with --api-key or $VLM_API_KEY") from None
        except openai.APIStatusError as e:
            raise UIError(f"--server {base_url}: GET {base_url}/models answered {e.status_code}; "
                          "is this the .../v1 URL of a vlm-serve?") from None
        except openai.APIConnectionError:
            raise UIError(f"--server {base_url}: no OpenAI-compatible server answers there "
                          "(start one with vlm-serve --model EXPORT, or give its .../v1 URL)") from None
        if not models:
            raise UIError(f"--server {base_url}: the server lists no model under /models")
        self.model = models[0]

    def respond(self, message: dict, history: list[dict], system: str = "",
                temperature: float = 0.0, max_tokens: int = 256) -> Iterator[dict]:
        """Stream the reply: yields the message so far after every chunk, or one error message."""
        import openai

        text = ""
        try:
            messages = to_openai_messages(message, history, system)
            # `with` closes the HTTP stream when Gradio's stop button closes this generator,
            # so the server sees the client leave and frees its slot.
            with self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True,
                temperature=float(temperature), max_tokens=int(max_tokens),
            ) as stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                        yield reply(text)
        except (openai.APIError, OSError) as e:
            yield reply((text + "\n\n" if text else "") + error_text(e, self.base_url))
            return
        if not text:
            yield reply(EMPTY_REPLY)


def reply(text: str) -> dict:
    """An assistant message holding `text` exactly.

    A plain string would go through Gradio's `inspect.cleandoc`, which strips leading blanks
    and dedents lines, so the page would show (and send back next turn) another text than
    the model's; a text part is kept as it is.
    """
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def build_app(chat: Chat, temperature: float = 0.0, max_tokens: int = 256, system: str = ""):
    """The Gradio page: a multimodal chat box and, folded away, the generation settings."""
    import gradio as gr

    textbox = gr.MultimodalTextbox(
        file_types=["image", "video"], file_count="multiple", sources=["upload"],
        placeholder="Drop images (or a video) here, then ask about them",
    )
    settings = [
        gr.Textbox(value=system, label="System prompt"),
        gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature"),
        gr.Slider(1, 4096, value=max_tokens, step=1, label="Max new tokens"),
    ]
    return gr.ChatInterface(
        chat.respond, multimodal=True, textbox=textbox, additional_inputs=settings,
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        title=TITLE, description=f"Model `{chat.model}`, served at {chat.base_url}",
        analytics_enabled=False, fill_height=True,
    )


# ---------------------------------------------------------------------------------------------
# --model: vlm-serve inside this process

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """vlm-serve's own app for EXPORT on a free local port, in a daemon thread of this process."""

    def __init__(self, export: str, timeout: float = 600.0):
        import uvicorn

        from vlm_dist.serve.api import create_app

        if not Path(export).is_dir():
            raise UIError(f"--model {export}: no such export directory")
        host, port = "127.0.0.1", free_port()
        self.url = f"http://{host}:{port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(export), host=host, port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="vlm-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise UIError(f"--model {export}: the in-process vlm-serve did not start (see above)")
            if time.monotonic() > deadline:
                self.stop()
                raise UIError(f"--model {export}: the in-process vlm-serve did not start in {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Shut the server down (its app closes the model's worker) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vlm-ui", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="base URL of a running vlm-serve, e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--model", help="an export directory: start vlm-serve inside this process")
    p.add_argument("--api-key", default=os.environ.get("VLM_API_KEY"),
                   help="the server's --api-key (default: $VLM_API_KEY)")
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on")
    p.add_argument("--port", type=int, default=7860, help="port the page listens on")
    p.add_argument("--temperature", type=float, default=0.0, help="initial temperature (0: greedy)")
    p.add_argument("--max-tokens", type=int, default=256, help="initial cap on new tokens per reply")
    p.add_argument("--system", default="", help="initial system prompt")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parse_args(argv)
        if args.temperature < 0:
            raise UIError(f"--temperature {args.temperature}: must be >= 0")
        if args.max_tokens < 1:
            raise UIError(f"--max-tokens {args.max_tokens}: must be >= 1")
        local = None if args.server else LocalServer(args.model)
        try:
            base_url = args.server.rstrip("/") if args.server else local.url
            chat = Chat(base_url, args.api_key)
            app = build_app(chat, args.temperature, args.max_tokens, args.system)
            print(f"vlm-ui: talking to {base_url} (model {chat.model})", flush=True)
            try:
                app.launch(server_name=args.host, server_port=args.port, show_error=False,
                           inbrowser=False, share=False)
            except OSError as e:        # Gradio's word for a port that is taken or an unknown host
                raise UIError(f"--host {args.host} --port {args.port}: {e}") from None
        finally:
            if local is not None:
                local.stop()
        return 0

    return run_cli("vlm-ui", body)


if __name__ == "__main__":
    raise SystemExit(main())
