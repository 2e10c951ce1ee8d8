"""Errors raised while looking up or loading a model."""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised by the `models` package."""


class UnknownModel(ModelError, KeyError):
    """No model of that name is registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"Unknown model {name!r}; known models: {', '.join(known)}.")

    # KeyError.__str__ would quote the whole message; keep it readable.
    def __str__(self) -> str:
        return str(self.args[0])


class WeightsNotFound(ModelError):
    """The weights of a model are neither in the models directory nor obtainable from the hub."""

    def __init__(self, model: str, message: str) -> None:
        self.model = model
        super().__init__(message)
