"""The in-memory model registry: model groups, wildcards (``openai/*``), aliases and
deployment ids, built from ``model_list`` entries. Immutable; a reload builds a new one with
the next generation number and swaps it in whole."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


from .config import ConfigError, ModelSpec, Secret, derive_id, is_secret_name, public_url, ssl_verify_value
from .errors import InvalidRequestError
from .providers import KNOWN_ELSEWHERE, PROVIDERS, split_model
from .providers.base import CONTROL_CHARS, Deployment, ProviderDefaults, path_problem

log = logging.getLogger(__name__)

# litellm_params that are request defaults (the client's own value wins).
DEFAULT_REQUEST_PARAMS = ("temperature", "max_tokens", "max_completion_tokens", "top_p", "frequency_penalty",
                          "presence_penalty", "stop", "seed", "response_format", "reasoning_effort", "user",
                          "drop_params")
NEEDS_API_BASE = ("hosted_vllm", "openai_like", "azure")
# A requested model name becomes a response header, a log field and (through a wildcard) part
# of a provider's URL: longer than any real model id, it is refused rather than carried around.
MAX_MODEL_NAME = 256


def check_model_name(model: str) -> str:
    """``model`` as a client sent it, if it is fit to resolve: not too long, no control
    characters (they would split a header or a log line). A 400 on ``model`` otherwise; the
    message never repeats the name."""
    if len(model) > MAX_MODEL_NAME:
        raise InvalidRequestError(f"Invalid model name: longer than {MAX_MODEL_NAME} characters.", param="model")
    if CONTROL_CHARS.search(model):
        raise InvalidRequestError("Invalid model name: it contains control characters.", param="model")
    return model


def number(params: Mapping[str, Any], name: str, kind: type, where: str):
    value = params.get(name)
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.litellm_params.{name}: expected a number, got {value!r}") from None


def build_deployment(spec: ModelSpec, environ: Mapping[str, str], source: str = "yaml") -> Deployment:
    params = spec.litellm_params
    provider_name, model = split_model(str(params["model"]), params.get("custom_llm_provider"))
    provider = PROVIDERS.get(provider_name)
    defaults = provider.defaults(environ) if provider else ProviderDefaults()
    api_base = params.get("api_base") or defaults.api_base
    api_key = params.get("api_key") or defaults.api_key
    problem = None
    if provider is None:
        later = " (not supported yet)" if provider_name in KNOWN_ELSEWHERE else ""
        problem = f"Unsupported provider '{provider_name}'{later} for model '{params['model']}'"
    elif "api_base" in spec.unset:
        # never fall back to the provider's public address when the configured one is missing
        problem = (f"api_base is os.environ/{spec.unset['api_base']}, which is not set, for model "
                   f"'{params['model']}'")
    elif provider_name in NEEDS_API_BASE and not api_base:
        problem = f"Provider '{provider_name}' needs an api_base for model '{params['model']}'"
    info = dict(spec.model_info)
    info["id"] = str(info.get("id") or derive_id(spec))
    where = spec.where
    weight = number(params, "weight", float, where)
    return Deployment(
        id=info["id"], model_name=spec.model_name, provider=provider_name, model=model,
        api_base=api_base, api_key=Secret(str(api_key)) if api_key else None,
        api_version=params.get("api_version") or defaults.api_version,
        weight=1.0 if weight is None else weight,  # 0 is a real weight: tried last
        rpm=number(params, "rpm", int, where), tpm=number(params, "tpm", int, where),
        order=number(params, "order", int, where),
        timeout=number(params, "timeout", float, where),
        stream_timeout=number(params, "stream_timeout", float, where),
        mock_response=params.get("mock_response"),
        ssl_verify=None if params.get("ssl_verify") is None else ssl_verify_value(
            params["ssl_verify"], f"{where}.litellm_params.ssl_verify"),
        defaults={k: params[k] for k in DEFAULT_REQUEST_PARAMS if params.get(k) is not None},
        extra_headers={**defaults.headers, **(params.get("extra_headers") or {})},
        public_params={k: (public_url(v) if k == "api_base" and isinstance(v, str) else v)
                       for k, v in params.items() if not is_secret_name(k)},
        model_info=info, source=source, problem=problem)


@dataclass(frozen=True)
class Registry:
    generation: int
    deployments: tuple[Deployment, ...]
    groups: Mapping[str, tuple[Deployment, ...]]
    wildcards: tuple[tuple[str, tuple[Deployment, ...]], ...]
    aliases: Mapping[str, str]
    by_id: Mapping[str, Deployment]
    # LiteLLM also answers a request naming a deployment's litellm_params.model
    # ("openrouter/openai/gpt-3.5-turbo"), after the groups and aliases
    by_litellm_model: Mapping[str, tuple[Deployment, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, deployments: Iterable[Deployment], generation: int = 1,
              aliases: Mapping[str, Any] | None = None) -> "Registry":
        deployments = tuple(deployments)
        groups: dict[str, list[Deployment]] = {}
        for d in deployments:
            groups.setdefault(d.model_name, []).append(d)
        plain = {name: tuple(ds) for name, ds in groups.items() if "*" not in name}
        wild = tuple(sorted(((name, tuple(ds)) for name, ds in groups.items() if "*" in name),
                            key=lambda item: -len(item[0])))  # most specific pattern first
        alias_map = {}
        for alias, target in (aliases or {}).items():
            # LiteLLM allows {"alias": "group"} or {"alias": {"model": "group", "hidden": true}}
            alias_map[alias] = target.get("model") if isinstance(target, dict) else target
        return cls(generation=generation, deployments=deployments, groups=plain, wildcards=wild,
                   aliases=alias_map, by_id={d.id: d for d in deployments},
                   by_litellm_model=litellm_model_map(deployments))

    def resolve(self, model: str) -> tuple[Deployment, ...]:
        """The deployments serving ``model``; an unknown model is a 400 naming it (as LiteLLM).

        A name that a wildcard would carry into a provider's model id must not be able to steer
        a URL (``gemini/../../x?k=1#``, encoded or not): that is a 400 before any provider runs."""
        name = self.aliases.get(check_model_name(model), model)
        found = self.groups.get(name) or self.exact_deployments(name)
        if found:
            return found
        for pattern, deployments in self.wildcards:
            if fnmatch.fnmatchcase(name, pattern):
                problem = path_problem(name)
                if problem is not None:
                    raise InvalidRequestError(f"Invalid model name: {problem}.", param="model")
                return tuple(expand_wildcard(d, pattern, name) for d in deployments)
        raise InvalidRequestError(
            f"Invalid model name passed in model={model}. Call `/v1/models` to view available models for "
            "your key.", param="model")

    def exact_deployments(self, name: str) -> tuple[Deployment, ...]:
        """Not a group: a deployment's model id, or its ``litellm_params.model`` (LiteLLM's
        router takes both). Tried before wildcards: an exact name beats a pattern."""
        d = self.by_id.get(name)
        return (d,) if d is not None else self.by_litellm_model.get(name, ())

    def group_for_mode(self, mode: str) -> str | None:
        """The first configured model group with a deployment of ``model_info.mode`` ``mode``
        (what answers ``/v1/moderations`` when the request names no model)."""
        return next((name for name, ds in self.groups.items()
                     if any(d.model_info.get("mode") == mode for d in ds)), None)

    def model_names(self) -> list[str]:
        return list(self.groups) + [p for p, _ in self.wildcards] + list(self.aliases)

    def problems(self) -> list[str]:
        return [f"model_name '{d.model_name}': {d.problem}" for d in self.deployments if d.problem]


def litellm_model_map(deployments: Iterable[Deployment]) -> dict[str, tuple[Deployment, ...]]:
    out: dict[str, list[Deployment]] = {}
    for d in deployments:
        model = d.public_params.get("model")
        if isinstance(model, str) and "*" not in model and "*" not in d.model_name:
            out.setdefault(model, []).append(d)
    return {model: tuple(ds) for model, ds in out.items()}


def expand_wildcard(d: Deployment, pattern: str, name: str) -> Deployment:
    """``openai/*`` serving ``openai/gpt-4o``: the matched part replaces ``*`` in the model."""
    prefix = pattern.split("*", 1)[0]
    matched = name[len(prefix):] if name.startswith(prefix) else name
    return dataclasses.replace(d, model=d.model.replace("*", matched) if "*" in d.model else d.model)


def build_registry(specs: Iterable[ModelSpec], environ: Mapping[str, str], generation: int = 1,
                   aliases: Mapping[str, Any] | None = None) -> Registry:
    return Registry.build((build_deployment(s, environ) for s in specs), generation, aliases)
