"""Tokenizers: byte-level BPE or characters, trained with Hugging Face ``tokenizers``, saved as ``tokenizer.json``.

Every tokenizer llmzoo trains has the special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` with ids 0, 1, 2
(the character-level one adds ``<|unk|>``, id 3, for characters it never saw). A Hugging Face tokenizer
loaded from a model directory keeps its own special tokens (named in its ``tokenizer_config.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmzoo.checkpoints import is_sharded_checkpoint, read_checkpoint

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token")
CHECKPOINT_KEY = "tokenizer.json"  # where the datamodule's state keeps the tokenizer inside a checkpoint


class Tokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (attribute ``tokenizer``) and the names of its special tokens.

    ``encode`` never makes special tokens: text is text, even text that spells ``"<|eos|>"`` (so a document
    cannot inject a control token, and ``decode(encode(text)) == text`` for any text); documents are
    separated by ``eos_token_id`` when the data is packed. ``bos_token`` and ``pad_token`` may be None for a
    loaded tokenizer that has none; ``eos_token`` is required.
    """

    def __init__(self, tokenizer: HFTokenizer, bos_token: str | None = BOS, eos_token: str = EOS,
                 pad_token: str | None = PAD):
        tokenizer.encode_special_tokens = True  # special-token strings in the text are encoded as plain text
        self.tokenizer, self.bos_token, self.eos_token, self.pad_token = tokenizer, bos_token, eos_token, pad_token
        missing = [token for token in (bos_token, eos_token, pad_token)
                   if token is not None and tokenizer.token_to_id(token) is None]
        if missing or eos_token is None:
            raise ValueError(f"the tokenizer lacks the special tokens {missing or ['eos']}: name its own in a "
                             f"tokenizer_config.json beside tokenizer.json, or let llmzoo train one "
                             f"(--data.tokenizer bpe)")

    # ----------------------------------------------------------------- building
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
        """Byte-level BPE (GPT-2's pre-tokenizer): any Unicode text round-trips, nothing is unknown."""
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def train_chars(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per character seen in ``texts`` (ids after the special tokens, most frequent first).

        A character absent from ``texts`` encodes to ``<|unk|>`` (id 3), which decodes to nothing
        (or to ``"<|unk|>"`` with ``skip_special_tokens=False``): for tiny experiments on a known alphabet."""
        tokenizer = HFTokenizer(models.WordLevel(unk_token=UNK))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=2**31 - 1, min_frequency=0, show_progress=False,
                                            special_tokens=[*SPECIAL_TOKENS, UNK])
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json``: one llmzoo wrote, or a Hugging Face one whose special tokens are named
        in the ``tokenizer_config.json`` beside it."""
        path = Path(path)
        try:
            return cls.from_str(path.read_text(encoding="utf-8"), **special_tokens_beside(path))
        except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError of tokenizer_config.json too
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def from_str(cls, json_str: str, **special_tokens: str | None) -> Tokenizer:
        """From the JSON of a ``tokenizer.json``; ``special_tokens``: ``bos_token`` etc. if not llmzoo's."""
        try:
            tokenizer = HFTokenizer.from_str(json_str)
        except Exception as error:  # tokenizers raises a bare Exception
            raise ValueError(f"not a valid tokenizer.json ({error}): pass the tokenizer.json the model was trained "
                             f"with, or --data.tokenizer bpe to train a new one") from None
        return cls(tokenizer, **special_tokens)

    # ----------------------------------------------------------------- use
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel on the Rust side)."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.tokenizer.token_to_id(self.pad_token)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """``{"bos_token": ..., "eos_token": ..., "pad_token": ...}``."""
        return {role: getattr(self, role) for role in SPECIAL_ROLES}

    def to_str(self) -> str:
        """The ``tokenizer.json`` text."""
        return self.tokenizer.to_str()

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the tokenizer: ``{"tokenizer.json": <its text>, "special_tokens": {...}}``."""
        return {CHECKPOINT_KEY: self.to_str(), "special_tokens": self.special_tokens}

    @classmethod
    def from_state_dict(cls, state: dict) -> Tokenizer:
        """The tokenizer of a :meth:`state_dict`."""
        return cls.from_str(state[CHECKPOINT_KEY], **state.get("special_tokens", {}))

    def save(self, path: str | Path) -> Path:
        """Write a standard ``tokenizer.json`` atomically (``path`` may be a directory) and, when the special
        tokens are not llmzoo's, a ``tokenizer_config.json`` naming them beside it. Returns the file."""
        from llmzoo.files import write_atomic

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        write_atomic(path, self.to_str().encode("utf-8"))
        if self.special_tokens != dict(zip(SPECIAL_ROLES, SPECIAL_TOKENS)):
            write_atomic(path.parent / "tokenizer_config.json", json.dumps(self.special_tokens, indent=2).encode())
        return path

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Tokenizer) and self.special_tokens == other.special_tokens
                and json.loads(self.to_str()) == json.loads(other.to_str()))

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.tokenizer.model).__name__}, vocab_size={self.vocab_size})"


def special_tokens_beside(path: Path) -> dict[str, str | None]:
    """The special-token names in the ``tokenizer_config.json`` beside ``path`` (none: llmzoo's own)."""
    config_path = path.parent / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    names = {role: config.get(role) for role in SPECIAL_ROLES}
    return {role: name["content"] if isinstance(name, dict) else name for role, name in names.items()}


def load_tokenizer_for_checkpoint(path: str | Path, checkpoint: dict | None = None) -> Tokenizer:
    """The tokenizer a checkpoint was trained with.

    ``path`` is a Lightning ``.ckpt`` written by ``llmzoo fit`` (the datamodule keeps the tokenizer's
    :meth:`~Tokenizer.state_dict` in the checkpoint; a sharded one in its ``meta.pt``) or by ``llmzoo convert
    --from_hf``, or any file or directory with a ``tokenizer.json`` beside or inside it (a Hugging Face
    model directory, a checkpoint directory of a run). ``checkpoint``: the contents of the checkpoint at
    ``path`` when they are already read (:func:`~llmzoo.checkpoints.read_checkpoint`), so that it is not read
    again."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist: pass the tokenizer.json or checkpoint the model was "
                                f"trained with, or --data.tokenizer bpe (or char) to train one")
    if checkpoint is not None or is_sharded_checkpoint(path) or (path.is_file() and path.suffix == ".ckpt"):
        for value in (checkpoint if checkpoint is not None else read_checkpoint(path, weights=False)).values():
            if isinstance(value, dict) and isinstance(value.get(CHECKPOINT_KEY), str):
                return Tokenizer.from_state_dict(value)
    for candidate in (path, path / "tokenizer.json", path.parent / "tokenizer.json"):
        if candidate.is_file() and candidate.suffix == ".json":
            return Tokenizer.from_file(candidate)
    raise FileNotFoundError(f"no tokenizer found for {path}: neither inside the checkpoint nor a tokenizer.json "
                            f"beside it; pass the tokenizer.json the model was trained with")
