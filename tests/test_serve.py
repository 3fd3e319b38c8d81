"""vlm-serve end to end: the real server (uvicorn in a thread) driven by the official openai client."""
from __future__ import annotations

import base64
import io
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from vlm_dist.serve.api import create_app
from vlm_dist.serve.engine import Engine, PartsPromptEncoder, ServeConfig

KEY = "test-key"
MODEL = "tiny-vlm"


def start(app):
    """uvicorn serving `app` on a free port in a daemon thread; (server, base URL)."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, real_photos):
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    for i, p in enumerate(real_photos[:3]):
        shutil.copy(p, allowed / f"photo{i}.jpg")
    (root / "secret.jpg").write_bytes(Path(real_photos[0]).read_bytes())
    os.symlink(root / "secret.jpg", allowed / "escape.jpg")          # a link out of the allowed dir
    return allowed


@pytest.fixture(scope="module")
def served(tiny_export, media_dir):
    config = ServeConfig(served_model_name=MODEL, api_key=KEY, limit_mm_per_prompt=3,
                         allowed_local_media_path=str(media_dir), max_image_pixels=1_000_000,
                         max_image_bytes=1 << 20, max_model_len=512, max_queue=32)
    engine = Engine.from_export(tiny_export, config, device="cpu")
    server, thread, url = start(create_app(engine))
    yield url, engine
    server.should_exit = True
    thread.join(10)
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def generator(tiny_export):
    from vlm_dist.inference.export import load_export
    from vlm_dist.inference.generate import Generator

    vlm, tokenizer, tower, cfg = load_export(tiny_export, device="cpu")
    return Generator(vlm, tokenizer, cfg, tower)


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def reference(generator, turns, paths, max_tokens):
    """What vlm-generate's Generator answers for the same prompt: (text, finish)."""
    from vlm_dist.inference.generate import GenerationSettings

    images = [generator.tower.decode(Path(p).read_bytes(), name=p) for p in paths]
    ids = generator.generate_ids(turns, generator.encode_images(images),
                                 GenerationSettings(max_new_tokens=max_tokens))
    return generator.tokenizer.decode(ids, skip_special_tokens=True)


def chat_both(client, messages, **kw):
    """The plain reply and the streamed reply (joined chunks) of one request."""
    plain = client.chat.completions.create(model=MODEL, messages=messages, **kw)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return plain, streamed, finish, chunks[-1].usage


def test_models_health_and_key(served, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(served[0] + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(served[0] + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and set(r.json()["error"]) >= {"message", "type", "code"}


def test_two_images_plain_equals_stream_equals_generator(client, generator, real_photos):
    photos = real_photos[:2]
    messages = [{"role": "system", "content": "You compare photos."},
                {"role": "user", "content": [text_part("First: "), image_part(data_url(Path(photos[0]).read_bytes())),
                                             text_part("\nSecond: "), image_part(data_url(Path(photos[1]).read_bytes())),
                                             text_part("\nWhich one shows a person?")]}]
    plain, streamed, finish, usage = chat_both(client, messages, temperature=0, max_tokens=12)
    text = plain.choices[0].message.content
    assert text and streamed == text
    assert finish == [plain.choices[0].finish_reason] == ["length"]
    assert plain.usage.completion_tokens == 12 and usage.completion_tokens == 12
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    turns = [{"role": "system", "content": "You compare photos."},
             {"role": "user", "content": "First: <image>\nSecond: <image>\nWhich one shows a person?"}]
    assert text == reference(generator, turns, photos, 12)
    ids, _ = generator.encoder.encode_prompt(turns)
    assert plain.usage.prompt_tokens == len(ids)


def test_three_images_multi_turn_file_urls(client, generator, media_dir):
    files = [media_dir / f"photo{i}.jpg" for i in range(3)]
    messages = [{"role": "user", "content": [image_part(files[0].as_uri()), text_part("What is this?")]},
                {"role": "assistant", "content": "A photo."},
                {"role": "user", "content": [image_part(data_url(files[1].read_bytes())),
                                             image_part(files[2].as_uri()), text_part("And these two?")]}]
    plain, streamed, _, _ = chat_both(client, messages, temperature=0, max_tokens=10, seed=3)
    text = plain.choices[0].message.content
    assert streamed == text
    turns = [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A photo."},
             {"role": "user", "content": "<image><image>And these two?"}]
    assert text == reference(generator, turns, files, 10)


def test_typed_placeholders_stay_text(client, generator, real_photos):
    typed = "Is <image> or <|image_pad|> here?"
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": typed}],
                                           temperature=0, max_tokens=2)
    encoder = PartsPromptEncoder(generator.tokenizer, generator.cfg.template, generator.cfg.num_media_tokens)
    ids, counts = encoder.encode_prompt([{"role": "user", "content": [typed]}])
    pad = generator.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert counts["image"] == 0 and pad not in ids and plain.usage.prompt_tokens == len(ids)
    # with one real image the typed marker is still text: exactly one image block
    one = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=2,
        messages=[{"role": "user", "content": [image_part(data_url(Path(real_photos[0]).read_bytes())),
                                               text_part(typed)]}])
    assert one.usage.prompt_tokens == len(ids) + generator.cfg.num_media_tokens + 2


def _png(width: int, height: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def bad_requests(photo: bytes, media_dir: Path) -> dict:
    """name -> (request overrides, expected status)."""
    one = lambda url: [{"role": "user", "content": [image_part(url), text_part("hi")]}]   # noqa: E731
    return {
        "too_many_images": ({"messages": [{"role": "user", "content": [image_part(data_url(photo))] * 4}]}, 400),
        "undecodable_image": ({"messages": one(data_url(b"this is not an image at all"))}, 400),
        "truncated_image": ({"messages": one(data_url(photo[: len(photo) // 3]))}, 400),
        "too_many_pixels": ({"messages": one(data_url(_png(1200, 1000), "image/png"))}, 413),
        "too_many_bytes": ({"messages": one(data_url(os.urandom((1 << 20) + 10)))}, 413),
        "malformed_base64": ({"messages": one("data:image/jpeg;base64,@@not*base64@@")}, 400),
        "unknown_model": ({"model": "gpt-4o"}, 404),
        "outside_allowed_dir": ({"messages": one((media_dir.parent / "secret.jpg").as_uri())}, 400),
        "symlink_out_of_allowed_dir": ({"messages": one((media_dir / "escape.jpg").as_uri())}, 400),
        "dotdot_path": ({"messages": one(f"file://{media_dir}/../secret.jpg")}, 400),
        "unsupported_scheme": ({"messages": one("ftp://example.com/a.jpg")}, 400),
        "unreachable_http": ({"messages": one("http://127.0.0.1:9/a.jpg")}, 400),
        "prompt_too_long": ({"messages": [{"role": "user", "content": "word " * 600}]}, 400),
        "max_tokens_past_limit": ({"max_tokens": 600}, 400),
        "n_2": ({"n": 2}, 400),
        "last_turn_assistant": ({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}, 400),
        "image_in_assistant_turn": ({"messages": [{"role": "assistant", "content": [image_part(data_url(photo))]},
                                                  {"role": "user", "content": "hi"}]}, 400),
        "bad_temperature": ({"temperature": -1}, 400),
        "invalid_url": ({"messages": one("http://[::1/a.jpg")}, 400),
        "invalid_idna_host": ({"messages": one("http://xn--/a.jpg")}, 400),
        "nul_in_local_path": ({"messages": one(f"file://{media_dir}/a%00b.jpg")}, 400),
        "stop_too_long": ({"stop": "x" * 10_000}, 400),
        "role_not_a_string": ({"messages": [{"role": ["user"], "content": "hi"}]}, 400),
        "text_far_over_the_context": ({"messages": [{"role": "user", "content": "a" * 200_000}]}, 400),
    }


@pytest.mark.parametrize("name", list(bad_requests(b"", Path("/x"))))
def test_bad_input_is_a_4xx_with_openai_error(name, served, client, media_dir, real_photos):
    overrides, status = bad_requests(Path(real_photos[0]).read_bytes(), media_dir)[name]
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **overrides}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.status_code == status, e.value.body
    error = e.value.response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    assert httpx.get(served[0] + "/health").json()["status"] == "ok"


def test_malformed_or_huge_body(served):
    r = httpx.post(served[0] + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(served[0] + "/v1/chat/completions", content=b"[" + b" " * (16 << 20) + b"]",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(served[0] + "/v1/chat/completions", json=[1, 2], headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(served[0] + "/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


def test_a_vanishing_temperature_is_greedy(client):
    messages = [{"role": "user", "content": "Say something."}]
    greedy = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    tiny = client.chat.completions.create(model=MODEL, messages=messages, temperature=1e-300, max_tokens=6)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_stop_string(client, generator):
    messages = [{"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2
    plain, streamed, finish, _ = chat_both(client, messages, temperature=0, max_tokens=12, stop=[stop])
    assert plain.choices[0].message.content == streamed == text[:text.find(stop)]
    assert finish == ["stop"] and plain.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    a, b = (client.chat.completions.create(model=MODEL, messages=messages, temperature=0.9, top_p=0.9,
                                           seed=7, max_tokens=8).choices[0].message.content for _ in range(2))
    assert a == b


def test_sixteen_concurrent_requests(served, client, real_photos):
    photo = data_url(Path(real_photos[0]).read_bytes())

    def ask(i):
        content = [text_part(f"Question {i}: what is this?")] + ([image_part(photo)] if i % 2 else [])
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                           temperature=0, max_tokens=8)
        return r.choices[0].message.content, r.choices[0].finish_reason

    before = httpx.get(served[0] + "/health").json()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert all(text and finish == "length" for text, finish in answers)
    after = httpx.get(served[0] + "/health").json()
    assert after["completed"] - before["completed"] == 16 and after["active"] == 0
    assert after["largest_batch"] > 1          # greedy requests waiting together were batched
    alone = [ask(i) for i in range(4)]         # one at a time: batch of one
    assert alone == answers[:4]


def test_busy_503_and_disconnect_frees_slot(tiny_export):
    engine = Engine.from_export(tiny_export, ServeConfig(served_model_name=MODEL, max_queue=1, max_batch=1),
                                device="cpu")
    server, thread, url = start(create_app(engine))
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Go on and on."}]
    try:
        stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                temperature=0, max_tokens=400)
        chunks = iter(stream)
        next(chunks), next(chunks)                  # generating now: the one slot is taken
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
        assert e.value.response.json()["error"]["code"] == "server_busy"
        stream.close()                              # the client leaves mid-stream
        deadline = time.monotonic() + 20
        while httpx.get(url + "/health").json()["active"]:
            assert time.monotonic() < deadline, "the disconnected stream kept its slot"
            time.sleep(0.05)
        health = httpx.get(url + "/health").json()
        assert health["tokens_generated"] < 400     # its generation stopped early
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason == "length"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()


@pytest.fixture(scope="module")
def web(tmp_path_factory, real_photos):
    """A local http server with a photo and a file over the server's byte cap; its base URL."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path_factory.mktemp("web")
    shutil.copy(real_photos[0], root / "photo.jpg")
    (root / "big.jpg").write_bytes(os.urandom((1 << 20) + 100))

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/zipped.jpg":       # a compressed body: refused, whatever it inflates to
                import gzip
                body = gzip.compress(b"\0" * (4 << 20))
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_image_urls(client, web, real_photos):
    def ask(url):
        return client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=4,
            messages=[{"role": "user", "content": [image_part(url), text_part("What is this?")]}])

    fetched = ask(f"{web}/photo.jpg").choices[0].message.content
    assert fetched == ask(data_url(Path(real_photos[0]).read_bytes())).choices[0].message.content
    for path, status in (("big.jpg", 413), ("missing.jpg", 400), ("zipped.jpg", 400)):
        with pytest.raises(openai.APIStatusError) as e:
            ask(f"{web}/{path}")
        assert e.value.status_code == status and e.value.response.json()["error"]["message"]


def test_cli_flags_and_user_errors(tmp_path, capsys):
    from vlm_dist.serve.cli import main, parse_args

    limits = [parse_args(["--model", "m", "--limit-mm-per-prompt", v]).limit_mm_per_prompt
              for v in ("3", "image=3", '{"image": 3}')]
    assert limits == [3, 3, 3]
    assert main(["--model", str(tmp_path / "none")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--allowed-local-media-path", str(tmp_path / "nope")]) == 2
    assert "--allowed-local-media-path" in capsys.readouterr().err
