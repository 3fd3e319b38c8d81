"""Serving a trained export: vlm-serve (an OpenAI-compatible API) and vlm-ui (a chat page over it).

    vlm-serve --model runs/sft/export --port 8000            # cli.py
    vlm-ui --server http://127.0.0.1:8000/v1                 # ui.py

In-process use (what vlm-ui --model and the tests do):

    from vlm_dist.serve.api import create_app, serve
    from vlm_dist.serve.engine import Engine, ServeConfig
    app = create_app("runs/sft/export", ServeConfig(api_key="k"))   # an ASGI app: uvicorn.Server(...)
    serve("runs/sft/export", host="127.0.0.1", port=8000)           # blocking, like the CLI
    engine = Engine.from_export("runs/sft/export"); app = create_app(engine)   # several apps, one model

Modules: api.py (the FastAPI app: request checks, OpenAI JSON, streaming), engine.py (the model
worker thread, bounded queue, greedy batching, prompt ids from content parts), media.py (image_url
-> bytes: data:, http(s), file://), errors.py (RequestError -> OpenAI's error JSON), cli.py.
"""
