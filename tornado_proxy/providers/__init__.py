"""Provider adapters by LiteLLM prefix (``openrouter/openai/gpt-4o`` -> ``openrouter``)."""

from __future__ import annotations

from .anthropic import AnthropicProvider
from .base import Deployment, Provider
from .gemini import GeminiProvider
from .mock import MockProvider
from .ollama import OllamaChatProvider, OllamaProvider
from .openai import COMPATIBLE, AzureProvider, OpenAIProvider, OpenRouterProvider

PROVIDERS: dict[str, Provider] = {
    "openai": OpenAIProvider(),
    "openrouter": OpenRouterProvider(),
    "mock": MockProvider(),
    "azure": AzureProvider(),
    "gemini": GeminiProvider(),
    "ollama": OllamaProvider(),
    "ollama_chat": OllamaChatProvider(),
    "anthropic": AnthropicProvider(),
    **{name: cls() for name, cls in COMPATIBLE.items()},
}
# Prefixes LiteLLM knows that this gateway does not serve yet: a deployment using one is
# reported at start-up and answered with a 400, never fatal.
KNOWN_ELSEWHERE = ("azure_ai", "vertex_ai", "bedrock", "cohere", "huggingface", "replicate", "sagemaker",
                   "watsonx", "databricks", "cloudflare")


def split_model(model: str, custom_provider: str | None = None) -> tuple[str, str]:
    """``openrouter/openai/gpt-4o`` -> (``openrouter``, ``openai/gpt-4o``); no prefix -> openai.

    An unknown prefix stays the provider name, so the deployment is reported as unsupported."""
    if custom_provider:
        prefix = custom_provider + "/"
        return custom_provider, model[len(prefix):] if model.startswith(prefix) else model
    prefix, sep, rest = model.partition("/")
    return (prefix, rest) if sep else ("openai", model)


def provider_for(d: Deployment) -> Provider | None:
    return PROVIDERS.get(d.provider)
