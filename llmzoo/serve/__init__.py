"""Serving over OpenAI's API (``llmzoo serve``, docs/serving.md): :mod:`llmzoo.serve.engine`, the batching engine
(torch only), and :mod:`llmzoo.serve.app`, the HTTP API (FastAPI: the ``serve`` extra). Nothing is imported here,
so that ``import llmzoo.serve.engine`` needs no web stack."""
