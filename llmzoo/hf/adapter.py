"""Family adapters: what llmzoo knows about one Hugging Face ``model_type``, and the registry that finds them.

An :class:`Adapter` subclass that names a ``model_type`` is registered when its module is imported (every
module of :mod:`llmzoo.hf` is, in the order of their file names). Lookups never switch on a family:
:func:`adapter_for_config` goes by ``model_type``, :func:`adapter_for_model` by the nearest class in the
model's MRO that an adapter claims (a subclass of ``Llama`` exports as ``llama``)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, ClassVar

import torch

from llmzoo.hf.weights import model_dtype
from llmzoo.models import CausalLM
from llmzoo.models.build import empty_model

if TYPE_CHECKING:
    from llmzoo.hf.rules import Rule

ADAPTERS: dict[str, Adapter] = {}  # by model_type, in the order they were defined


class Adapter:
    """One Hugging Face family. A subclass sets the class attributes and implements :meth:`kwargs` (config
    in), :meth:`config` (config out) and :meth:`rules` (the state dict, both ways); it may override any
    other method. Subclassing an adapter (``MistralAdapter(LlamaAdapter)``) inherits all of it."""

    model_type: ClassVar[str]  # config.json's "model_type"
    hf_class: ClassVar[str]  # its transformers class, written to "architectures"
    model_class: ClassVar[type[CausalLM]]  # the llmzoo class it builds
    defaults: ClassVar[dict] = {}  # transformers' defaults for the fields kwargs() reads
    nullable: ClassVar[frozenset[str]] = frozenset()  # fields whose null means something (others: null = default)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "model_type" in cls.__dict__:
            ADAPTERS[cls.model_type] = cls()

    # ------------------------------------------------------------------ config in
    def kwargs(self, config: dict) -> dict:
        """The llmzoo model's arguments for ``config`` (a config.json dict completed with :attr:`defaults`).
        Everything that changes the math is mapped, or refused with a one-line ``ValueError``."""
        raise NotImplementedError

    def from_config(self, config: dict) -> tuple[type[CausalLM], dict]:
        given = {key: value for key, value in config.items() if value is not None or key in self.nullable}
        return self.model_class, self.kwargs({**self.defaults, **given})

    # ------------------------------------------------------------------ config out
    def config(self, model: CausalLM) -> dict:
        """The family's config.json fields of ``model`` (floats as floats: transformers' configs are strictly
        typed); raises ``ValueError`` for what the transformers class cannot represent."""
        raise NotImplementedError

    def to_config(self, model: CausalLM, dtype: torch.dtype) -> dict:
        self.check_layers(model)
        hp = model.hparams
        return dict(architectures=[self.hf_class], model_type=self.model_type, vocab_size=hp.vocab_size,
                    tie_word_embeddings=bool(hp.tie_word_embeddings), dtype=str(dtype).removeprefix("torch."),
                    use_cache=True, **self.config(model))

    def check_layers(self, model: CausalLM) -> None:
        """A subclass (``class GeluLlama(Llama)`` with its own ``make_mlp``) exports as its family only where its
        layers and weights are the family's: else a ``ValueError`` naming the first layer that differs."""
        family = self.model_class
        if type(model) is family:
            return
        accepted = inspect.signature(family.__init__).parameters
        reference = empty_model(family, {k: v for k, v in model.hparams.items() if k in accepted})
        theirs = {name: type(module) for name, module in reference.named_modules()}
        for name, module in model.named_modules():
            if name not in theirs or not isinstance(module, theirs[name]):
                what = f"{name} is a {type(module).__name__} where {family.__name__} has a " \
                       f"{theirs[name].__name__}" if name in theirs else f"{name} is not a layer of {family.__name__}"
                raise ValueError(f"{type(model).__name__} cannot be exported as a Hugging Face {self.model_type} "
                                 f"model: its {what}, which transformers' {self.hf_class} cannot hold; export a model "
                                 f"whose layers are {family.__name__}'s, or add an adapter for it (docs/architecture.md)")
        shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
        for name, tensor in model.state_dict().items():
            if name in shapes and shapes[name] != tuple(tensor.shape):
                raise ValueError(f"{type(model).__name__} cannot be exported as a Hugging Face {self.model_type} "
                                 f"model: its {name} is {list(tensor.shape)} where {family.__name__}'s of the same "
                                 f"settings is {list(shapes[name])}; export a model whose layers are "
                                 f"{family.__name__}'s, or add an adapter for it (docs/architecture.md)")

    # ------------------------------------------------------------------ state dict
    def rules(self, model: CausalLM, hf_keys=()) -> list[Rule]:
        """One :class:`~llmzoo.hf.rules.Rule` per tensor of ``model``. ``hf_keys``: the names of a state dict
        being imported (empty on export), for families with more than one layout in use."""
        raise NotImplementedError


def adapter_for_config(config: dict) -> Adapter:
    """The adapter of a config.json's ``model_type`` (``auto_map`` and ``architectures`` are never read)."""
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type {model_type!r} is not supported: llmzoo imports {', '.join(ADAPTERS)}")
    return ADAPTERS[model_type]


def adapter_for_model(model: CausalLM | type[CausalLM]) -> Adapter:
    """The adapter of ``model``'s family: the nearest class in its MRO that an adapter builds."""
    by_class = {adapter.model_class: adapter for adapter in ADAPTERS.values()}
    cls = model if isinstance(model, type) else type(model)
    for ancestor in cls.__mro__:
        if ancestor in by_class:
            return by_class[ancestor]
    raise ValueError(f"{cls.__name__} has no Hugging Face twin: only "
                     f"{', '.join(a.model_class.__name__ for a in ADAPTERS.values())} (and their subclasses) map to "
                     f"transformers")


def hf_model_type(model: CausalLM) -> str:
    """The Hugging Face ``model_type`` of ``model``'s family."""
    return adapter_for_model(model).model_type


def config_from_hf(config: dict) -> tuple[type[CausalLM], dict]:
    """The llmzoo class and its arguments for a Hugging Face ``config.json`` dict.

    Fields that change the math are all mapped or refused with a ``ValueError``; ``auto_map`` (remote
    code) is ignored: ``model_type`` alone picks the architecture."""
    adapter = adapter_for_config(config)
    if config.get("quantization_config"):
        raise ValueError("quantized checkpoints (quantization_config) are not supported: "
                         "use the unquantized weights")
    return adapter.from_config(config)


def config_to_hf(model: CausalLM, dtype: torch.dtype | None = None) -> dict:
    """The Hugging Face ``config.json`` dict of ``model`` with weights in ``dtype`` (default: the model's).
    Raises ``ValueError`` for what transformers cannot represent."""
    return adapter_for_model(model).to_config(model, dtype or model_dtype(model))
