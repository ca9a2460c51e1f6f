"""Which providers serve a model the client asks for, in the order they are tried.

A public model name is either a route from configuration (`routes`: an
ordered list of provider:model targets, e.g. a fallback from one provider to
another) or, failing that, a model some provider lists itself (the first such
provider serves it). A target is skipped while its provider is disabled by
an operator or its circuit is open.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmsvc.config import Price, ProviderConfig
from llmsvc.errors import UnknownModel
from llmsvc.gateway.breaker import Breakers
from llmsvc.providers.base import Provider


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str


class Router:
    def __init__(
        self,
        configs: list[ProviderConfig],
        providers: dict[str, Provider],
        breakers: Breakers,
        routes: dict[str, list[str]] | None = None,
        prices: dict[str, Price] | None = None,
    ) -> None:
        self.disabled: set[str] = set()  # providers an operator turned off (provider_status)
        self.prices = prices or {}
        self.breakers = breakers
        self.routes: dict[str, list[Target]] = {}
        for public, targets in (routes or {}).items():
            self.routes[public] = [
                Target(providers[name], model)
                for name, _, model in (target.partition(":") for target in targets)
            ]
        for config in configs:
            for model in config.models:
                self.routes.setdefault(model, [Target(providers[config.name], model)])

    def targets(self, model: str) -> list[Target]:
        try:
            return self.routes[model]
        except KeyError:
            raise UnknownModel(
                f"the model {model!r} is not served here; GET /v1/models lists the models",
                param="model",
            ) from None

    def unavailable(self, target: Target) -> tuple[str, str] | None:
        """Why `target` cannot be called now, as (error code, words), or None (claiming a
        half-open circuit's probe)."""
        name = target.provider.name
        if name in self.disabled:
            return "provider_disabled", f"provider {name!r} is disabled by an operator"
        if not self.breakers.allows(name):
            wait = self.breakers.retry_in(name)
            return (
                "circuit_open",
                f"provider {name!r} has its circuit open (failing; next try in {wait:.0f} s)",
            )
        return None

    def cost(
        self, provider: str, model: str, prompt: int | None, completion: int | None
    ) -> float | None:
        """What an attempt cost by the price table ("provider:model", else "model"), or None."""
        price = self.prices.get(f"{provider}:{model}") or self.prices.get(model)
        if price is None or prompt is None or completion is None:
            return None
        return (prompt * price.input_per_million + completion * price.output_per_million) / 1e6

    def models(self) -> list[str]:
        return list(self.routes)
