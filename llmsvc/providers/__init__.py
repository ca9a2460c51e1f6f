"""Provider adapters: one module per kind, all speaking `base.Provider`."""

from llmsvc.config import ProviderConfig
from llmsvc.providers.anthropic import AnthropicProvider
from llmsvc.providers.base import Provider
from llmsvc.providers.mock import MockProvider
from llmsvc.providers.openai import OpenAIProvider


def build_provider(config: ProviderConfig) -> Provider:
    kinds: dict[str, type[MockProvider] | type[OpenAIProvider] | type[AnthropicProvider]] = {
        "mock": MockProvider,
        "openai": OpenAIProvider,
        "anthropic": AnthropicProvider,
    }
    return kinds[config.kind](config)
