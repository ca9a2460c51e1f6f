"""Which providers serve a model the client asks for, in the order they are tried.

A public model name is either a route from configuration (`routes`: an
ordered list of provider:model targets, e.g. a fallback from one provider to
another) or, failing that, a model some provider lists itself (the first such
provider serves it). A target is skipped while its provider is disabled by
an operator or its circuit is open. The router also runs the tries of one
request: retries of a target, then the next target (`try_targets`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from llmsvc.config import Price, ProviderConfig, RetryPolicy
from llmsvc.errors import ProviderError, ProviderUnavailable, ServiceUnavailable, UnknownModel
from llmsvc.gateway.breaker import Breakers
from llmsvc.providers.base import Provider


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str


class Request(Protocol):
    """What the retry loop needs of the request it serves (`chat.Exchange`)."""

    model: str
    targets: list[Target]
    policy: RetryPolicy
    skipped: list[tuple[str, str]]  # provider, code: targets skipped, not called
    request_deadline: float  # loop time all attempts together must end by

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...  # the loop serving it, while it runs

    def replied(self) -> bool: ...

    async def attempt(self, target: Target) -> None: ...

    async def end_attempt(self, exc: ProviderError) -> None: ...


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

    def pinnable(self) -> dict[str, Target]:
        """Every target some public name routes to, by its `provider:model` name: what the
        console's replay may pin a request to (routes and allowlists not applied)."""
        return {f"{t.provider.name}:{t.model}": t for ts in self.routes.values() for t in ts}

    async def try_targets(self, request: Request) -> None:
        """Each target in turn; a transient failure before the first token is retried
        (backoff with jitter, Retry-After honoured), then the next target is tried. After
        the first token nothing is retried: the client already has part of this reply."""
        skipped: list[str] = []
        failed: ProviderError | None = None
        loop = request.loop
        request.request_deadline = loop.time() + request.policy.request_timeout
        for target in request.targets:
            for retry in range(request.policy.retries + 1):
                if loop.time() >= request.request_deadline:
                    skipped.append(
                        f"request_timeout_seconds ({request.policy.request_timeout:g} s) spent"
                    )
                    break
                why = self.unavailable(target)
                if why is not None:
                    request.skipped.append((target.provider.name, why[0]))
                    skipped.append(why[1])
                    break
                try:
                    await request.attempt(target)
                    return
                except ProviderError as exc:
                    if request.replied() or not exc.retryable:
                        raise
                    failed = exc
                    await request.end_attempt(exc)
                after = failed.retry_after if isinstance(failed, ProviderUnavailable) else None
                delay = request.policy.delay(retry, after)
                if delay is None or retry == request.policy.retries:
                    break
                if loop.time() + delay >= request.request_deadline:
                    break  # no time for this target's retry: perhaps the next target's first try
                await asyncio.sleep(delay)
        if failed is not None:
            raise failed  # every target failed: the client hears the last failure
        raise ServiceUnavailable(f"no provider can serve {request.model!r}: " + "; ".join(skipped))

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
