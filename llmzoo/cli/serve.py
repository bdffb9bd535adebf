"""``llmzoo serve``: an OpenAI-compatible HTTP server for a checkpoint or a Hugging Face directory (see
docs/serving.md). The batching engine is :mod:`llmzoo.serve.engine`, the HTTP API :mod:`llmzoo.serve.app`; this
loads the model as ``llmzoo chat`` does and wires the options. Needs no data or Trainer, so
:func:`~llmzoo.cli.main` runs it before LightningCLI starts; FastAPI and uvicorn (the ``serve`` extra) are imported
only here, when the command runs."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

from jsonargparse import ArgumentParser

from llmzoo.cli.chat import chat_prompt, end_of_turn_ids, load_chat_model, run_template
from llmzoo.quantize import check_options
from llmzoo.quantize import quantize as quantize_model

EXTRA = "llmzoo serve needs FastAPI and uvicorn: pip install 'llmzoo[serve]'"


def serve(ckpt_path: str, host: str = "127.0.0.1", port: int = 8000, quantize: str | None = None,
          group_size: int = 32, compile: bool = False, max_batch_size: int = 8, max_tokens: int | None = None,
          api_key: str | None = None, model_name: str | None = None, template: str | None = None,
          device: str | None = None, max_request_bytes: int = 1 << 20) -> None:
    """Serve a model over OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models, /health) until Ctrl-C.

    Args:
        ckpt_path: a Lightning checkpoint (its run's tokenizer and chat template) or a Hugging Face directory.
        host: the address to listen on; the default answers this machine only (0.0.0.0: every interface).
        port: the TCP port.
        quantize: int8 or int4 weight-only quantization of the model before serving.
        group_size: input columns per scale and zero of int4 (32, 64, 128 or 256).
        compile: decode with a compiled static-shape step (torch.compile; see docs/inference.md).
        max_batch_size: requests decoded together at most (one row each; n > 1 takes n rows).
        max_tokens: the most tokens a request may ask for (default: the model's context).
        api_key: a key every /v1 request must send as 'Authorization: Bearer KEY' (default: the LLMZOO_API_KEY
            environment variable; none: no key asked).
        model_name: the name /v1/models lists (default: the checkpoint's file or directory name).
        template: the chat template of /v1/chat/completions: chatml, llama3, alpaca or a .jinja file (default: the
            checkpoint's or Hugging Face directory's own, else chatml).
        device: where the model runs (default: cuda if available, else cpu).
        max_request_bytes: the largest request body accepted.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError:
        raise ValueError(EXTRA) from None
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    listener = bind(host, port)  # before the model loads: a port in use fails at once
    app = build_app(ckpt_path, quantize=quantize, group_size=group_size, compile=compile,
                    max_batch_size=max_batch_size, max_tokens=max_tokens,
                    api_key=api_key or os.environ.get("LLMZOO_API_KEY") or None, model_name=model_name,
                    template=template, device=device, max_request_bytes=max_request_bytes)
    print(f"llmzoo: serving {app.state.model_name} on http://{host}:{listener.getsockname()[1]}/v1 (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down (it raises the signal again afterwards)
        pass
    finally:
        app.state.engine.close()
    print("llmzoo: server stopped", file=sys.stderr, flush=True)


def build_app(ckpt_path: str, quantize: str | None = None, group_size: int = 32, compile: bool = False,
              max_batch_size: int = 8, max_tokens: int | None = None, api_key: str | None = None,
              model_name: str | None = None, template: str | None = None, device: str | None = None,
              max_request_bytes: int = 1 << 20):
    """The app of :func:`serve` (its engine started, at ``app.state.engine``), every option checked first."""
    import torch

    from llmzoo.serve.app import ChatFormat, create_app
    from llmzoo.serve.engine import Engine

    if quantize is not None:
        check_options(quantize, group_size)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    model, tokenizer, checkpoint = load_chat_model(ckpt_path)
    chat_template = run_template(ckpt_path, tokenizer, checkpoint, template)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    if quantize is not None:
        quantize_model(model, quantize, group_size)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    engine = Engine(model, tokenizer.decode, pad, max_batch_size=max_batch_size, compile=compile).start()
    name = model_name or Path(ckpt_path).name
    chat = ChatFormat(lambda messages: chat_prompt(chat_template, tokenizer, messages),
                      set(end_of_turn_ids(chat_template, tokenizer)), chat_template.end_of_turn)
    app = create_app(engine, tokenizer, name, chat, api_key=api_key, max_tokens=max_tokens,
                     max_request_bytes=max_request_bytes)
    app.state.model_name = name
    return app


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run an app of :func:`build_app` with uvicorn in a daemon thread of this process (tests, benchmarks, a
    notebook): ``(base URL, stop)``, ``stop()`` shutting the server and its engine down."""
    import uvicorn

    listener = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        app.state.engine.close()

    return f"http://{host}:{listener.getsockname()[1]}", stop


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a one-line error."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0 .. 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}): is another server using the "
                      f"port? Choose another with --port") from None
    return listener


HELP = "Serve a model over OpenAI's API (completions, chat, streaming, batched requests); needs llmzoo[serve]"


def serve_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="llmzoo serve", description=HELP, exit_on_error=False)
    parser.add_function_arguments(serve, as_group=False)
    return parser


def run_serve(args: list[str]) -> None:
    """``llmzoo serve ARGS``; a bad option raises ``ArgumentError``."""
    config = serve_parser().parse_args(args)
    serve(**{key: value for key, value in config.items() if key != "config"})
