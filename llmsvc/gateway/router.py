"""Which provider serves a model the client asks for."""

from __future__ import annotations

from dataclasses import dataclass

from llmsvc.config import ProviderConfig
from llmsvc.errors import ServiceUnavailable, UnknownModel
from llmsvc.providers.base import Provider


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str


class Router:
    """Maps public model names to a provider; the first provider listing a model serves it."""

    def __init__(self, configs: list[ProviderConfig], providers: dict[str, Provider]) -> None:
        self.disabled: set[str] = set()  # providers an operator turned off (provider_status)
        self.routes: dict[str, Target] = {}
        for config in configs:
            for model in config.models:
                self.routes.setdefault(model, Target(providers[config.name], model))

    def route(self, model: str) -> Target:
        try:
            target = self.routes[model]
        except KeyError:
            raise UnknownModel(
                f"the model {model!r} is not served here; GET /v1/models lists the models",
                param="model",
            ) from None
        if target.provider.name in self.disabled:
            raise ServiceUnavailable(
                f"the model {model!r} is served by provider {target.provider.name!r}, "
                "which an operator has disabled"
            )
        return target

    def models(self) -> list[str]:
        return list(self.routes)
