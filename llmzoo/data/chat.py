"""Chat templates and instruction records: what supervised fine-tuning (SFT) renders and where its loss goes.

A chat template is a Jinja2 template rendered the way Hugging Face renders ``chat_template`` (a sandboxed
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``generation`` tag, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII; the variables ``messages``, ``add_generation_prompt`` and the
tokenizer's special tokens, ``bos_token``, ``eos_token``, ...). Built in: ``chatml``, ``llama3`` and
``alpaca``; a Hugging Face directory's own template is read from its ``tokenizer_config.json`` or
``chat_template.jinja``.

The assistant turns of a conversation are found as character spans of its rendering: from the ``{% generation %}``
blocks when the template has them (as Hugging Face's ``return_assistant_tokens_mask``), else by rendering each
beginning of the conversation: the span of assistant message ``i`` runs from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])`` (its text and the
end-of-turn marker that closes it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import cached_property
from pathlib import Path

ROLES = ("system", "user", "assistant")

TEMPLATES = {  # the assistant's turns in {% generation %} blocks: one rendering finds them (Hugging Face's marker)
    # ChatML (Qwen, many others): <|im_start|>role, a newline, the content, <|im_end|>, a newline
    "chatml": ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
               "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}{% else %}"
               "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Llama 3: a header per message, <|eot_id|> after each
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
               "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
               "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    # Alpaca-style, for tokenizers with no chat tokens: the tokenizer's end-of-sequence token ends a response
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
               "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
               "{% else %}{{ '### Response:\\n' }}{% generation %}{{ message['content'] + eos_token + '\\n\\n' }}"
               "{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}"
               "{% endif %}"),
}
DEFAULT_TEMPLATE = "chatml"  # for a tokenizer source that has no template of its own


class ChatTemplate:
    """A compiled chat template with the special tokens it is rendered with (``bos_token``, ``eos_token``, ...).

    ``render(messages, add_generation_prompt)`` is the text; ``assistant_spans(messages)`` the text and the
    character spans of its assistant turns; ``end_of_turn`` the text that closes an assistant turn (where
    generation stops)."""

    def __init__(self, source: str, name: str = "template", **special_tokens: str | None):
        self.source, self.name = source, name
        self.special_tokens = {role: token for role, token in special_tokens.items() if token is not None}
        try:
            self.template = _environment().from_string(source)
        except Exception as error:  # jinja2.TemplateSyntaxError and the like
            raise ValueError(f"chat template {name} does not compile ({one_line(error)}): fix it or use a built-in "
                             f"one ({', '.join(TEMPLATES)})") from None
        self.has_generation_blocks = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The text of ``messages`` (``[{"role", "content"}, ...]``)."""
        return self._render(messages, add_generation_prompt)[0]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        blocks, spans = [], []
        try:
            with _tracking(self.template.environment, blocks, spans):
                for block in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    tools=None, documents=None, **self.special_tokens):
                    blocks.append(block)
        except Exception as error:  # what the template raises (raise_exception), an undefined variable, ...
            raise ValueError(f"chat template {self.name} fails to render ({one_line(error)}): fix the template or "
                             f"the messages") from None
        return "".join(blocks), spans

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The text of ``messages`` and the ``(start, end)`` character spans of their assistant turns."""
        if self.has_generation_blocks:
            return self._render(messages, False)
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, turn = self.render(messages[:i], True), self.render(messages[:i + 1])
            if not (turn.startswith(prompt) and text.startswith(turn)):
                raise ValueError(f"chat template {self.name} does not render the beginning of a conversation as the "
                                 f"beginning of its text (at message {i + 1}), so its assistant turns cannot be found: "
                                 f"mark them with {{% generation %}} ... {{% endgeneration %}}")
            spans.append((len(prompt), len(turn)))
        return text, spans

    @cached_property
    def end_of_turn(self) -> str:
        """What the template writes after an assistant's text (``<|im_end|>``, ``<|eot_id|>``, the eos token),
        found by rendering one: generation stops there."""
        marker = "\ue000"  # a private-use character no template writes
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        end = text[text.index(marker) + 1:].strip() if marker in text else ""
        if not end:
            end = self.special_tokens.get("eos_token", "")
        return end


def without_generation_blocks(source: str) -> str:
    """``source`` without its ``{% generation %}`` / ``{% endgeneration %}`` tags (the same text, found by rendering
    each beginning of a conversation instead)."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", source)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ====================================================================== the sandbox, as Hugging Face builds it
class _GenerationTracker:
    """The ``{% generation %}`` tag: records the character span of what its block renders, while tracking."""

    @staticmethod
    def extension():
        from jinja2 import nodes
        from jinja2.ext import Extension

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_support"), [], [], body).set_lineno(lineno)

            def _support(self, caller):
                text = caller()
                tracking = getattr(self.environment, "tracking", None)
                if tracking is not None:
                    blocks, spans = tracking
                    start = len("".join(blocks))
                    spans.append((start, start + len(text)))
                return text

        return Generation


@contextmanager
def _tracking(environment, blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
    environment.tracking = (blocks, spans)
    try:
        yield
    finally:
        environment.tracking = None


_ENVIRONMENT = None


def _environment():
    """Hugging Face's chat-template environment (transformers' ``_compile_jinja_template``), built once."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class Namespace(jinja2.utils.Namespace):  # no underscore attributes: no way to CPython's internals
            def __init__(*args, **kwargs):
                self, args = args[0], args[1:]
                attributes = dict(*args, **kwargs)
                for name in attributes:
                    Namespace._check(name)
                jinja2.utils.Namespace.__init__(self, attributes)

            def __setitem__(self, name, value):
                Namespace._check(name)
                jinja2.utils.Namespace.__setitem__(self, name, value)

            @staticmethod
            def _check(name):
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[_GenerationTracker.extension(), loopcontrols])
        environment.tracking = None
        environment.filters["tojson"] = tojson
        environment.globals.update(raise_exception=raise_exception, namespace=Namespace,
                                   strftime_now=lambda format: datetime.now().strftime(format))
        _ENVIRONMENT = environment
    return _ENVIRONMENT


# ====================================================================== finding a template
def template_source(spec: str | None, tokenizer_source: str | Path | None = None,
                    checkpoint: dict | None = None) -> tuple[str, str]:
    """``(name, Jinja source)`` of a chat template: ``spec`` is a built-in name (``chatml``, ``llama3``,
    ``alpaca``) or a template file; None: the template of ``tokenizer_source`` (inside a checkpoint of a
    fine-tuning run, or a Hugging Face directory's ``chat_template.jinja`` / ``tokenizer_config.json``
    ``chat_template``), else ``chatml``. ``checkpoint``: the contents of ``tokenizer_source`` if already read."""
    if spec is not None:
        if spec in TEMPLATES:
            return spec, TEMPLATES[spec]
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"chat template {spec!r} is neither a built-in one ({', '.join(TEMPLATES)}) nor "
                                    f"a file: give one of those or the path of a .jinja file")
        return str(path), path.read_text(encoding="utf-8")
    found = stored_template(tokenizer_source, checkpoint) if tokenizer_source is not None else None
    return found or (DEFAULT_TEMPLATE, TEMPLATES[DEFAULT_TEMPLATE])


def stored_template(source: str | Path, checkpoint: dict | None = None) -> tuple[str, str] | None:
    """The chat template kept with a model: in a checkpoint of a fine-tuning run (its datamodule's state), in or
    beside a Hugging Face tokenizer (``chat_template.jinja``, ``tokenizer_config.json``'s ``chat_template``)."""
    from llmzoo.checkpoints import read_checkpoint

    path = Path(source)
    if checkpoint is None and path.is_file() and path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path, weights=False)
    for value in (checkpoint or {}).values():
        if isinstance(value, dict) and isinstance(value.get(CHECKPOINT_KEY), str):
            return value.get("chat_template_name", str(path)), value[CHECKPOINT_KEY]
    directory = path if path.is_dir() else path.parent if path.suffix == ".json" else None  # a tokenizer's directory
    if directory is None:
        return None
    if (directory / "chat_template.jinja").is_file():
        return str(directory / "chat_template.jinja"), (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return str(config), template
    return None


CHECKPOINT_KEY = "chat_template"  # where a fine-tuning run's datamodule state keeps its template


# ====================================================================== records
FORMATS = {  # name -> (keys that identify it, optional keys)
    "messages": (("messages",), ()),
    "prompt/response": (("prompt", "response"), ("system",)),
    "prompt/completion": (("prompt", "completion"), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
}


def detect_format(record: object, where: str) -> str:
    """The format of a file, from its first record."""
    if isinstance(record, dict):
        for name, (keys, _) in FORMATS.items():
            if all(key in record for key in keys):
                return name
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: not a record of a known format (got {keys}): use {{\"messages\": [{{\"role\", "
                     f"\"content\"}}, ...]}}, {{\"prompt\", \"response\"}}, {{\"prompt\", \"completion\"}} or "
                     f"{{\"instruction\", \"input\", \"output\"}}")


def to_messages(record: object, format: str, where: str) -> list[dict]:
    """The conversation of a record of ``format`` (``[{"role", "content"}, ...]``), checked: known roles, text
    contents, at least one assistant turn."""
    keys, optional = FORMATS[format]
    if not isinstance(record, dict) or not all(key in record for key in keys):
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: a {format} record needs the keys {list(keys)}, got {got}: every record of a file "
                         f"must be in the format of its first")
    if format == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    else:
        prompt = record["instruction" if format == "alpaca" else "prompt"]
        if format == "alpaca" and record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}" if isinstance(prompt, str) else prompt
        answer = record[keys[1]]
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    check_messages(messages, where)
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing to learn from: add one or "
                         f"drop the record")
    return messages


def check_messages(messages: list[dict], where: str) -> None:
    """A one-line ``ValueError`` naming ``where`` unless every message has a known role and a text content."""
    for number, message in enumerate(messages, 1):
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {number} has the unknown role {message['role']!r}: use one of "
                             f"{', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {number} ({message['role']}) has no text content: give \"content\" "
                             f"as a string")


def read_records(path: str | Path) -> list[list[dict]]:
    """The conversations of a ``.jsonl`` (one record a line) or ``.json`` (a list of records) file; the format is
    detected from the first record. A malformed record is a ``ValueError`` naming its line (record)."""
    numbered = numbered_records(path)
    format = detect_format(numbered[0][1], numbered[0][0])
    return [to_messages(record, format, where) for where, record in numbered]


def numbered_records(path: str | Path) -> list[tuple[str, object]]:
    """The records of a ``.jsonl`` or ``.json`` file, each with where it stands (``"data.jsonl line 3"``); a file
    that is missing, not JSON or empty is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {path} not found: give a .jsonl or .json file of records")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json file must hold a list of records; use .jsonl for one record a line")
        numbered = [(f"{path} record {i}", record) for i, record in enumerate(records, 1)]
    elif path.suffix == ".jsonl":
        numbered = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{path} line {i}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {i}: not valid JSON ({error.msg}, column {error.colno})") from None
    else:
        raise ValueError(f"{path}: instruction data must be .jsonl or .json, got {path.suffix or 'no extension'}")
    if not numbered:
        raise ValueError(f"{path} holds no records: give at least one")
    return numbered
