"""Model listing, health and metrics handlers. They read gateway state; none calls a provider."""

from __future__ import annotations

import os

from . import __version__
from .errors import NotFoundError
from .handlers import BaseHandler

MODEL_CREATED = 1677610602  # the fixed `created` LiteLLM reports for configured models


def model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "openai"}


class ModelsHandler(BaseHandler):
    def get(self) -> None:
        names = self.gw.registry.model_names()
        self.write_json({"data": [model_object(n) for n in names], "object": "list"})


class ModelHandler(BaseHandler):
    def get(self, model_id: str) -> None:
        registry = self.gw.registry
        if model_id not in registry.model_names():
            raise NotFoundError(f"The model '{model_id}' does not exist", param="model")
        self.write_json(model_object(model_id))


class ModelInfoHandler(BaseHandler):
    def get(self) -> None:
        wanted = self.get_query_argument("litellm_model_id", None)
        data = [{
            "model_name": d.model_name,
            "litellm_params": dict(d.public_params),
            "model_info": {**d.model_info, "db_model": d.source == "db"},
        } for d in self.gw.registry.deployments if wanted is None or d.id == wanted]
        self.write_json({"data": data})


class LivelinessHandler(BaseHandler):
    def get(self) -> None:
        self.write_json("I'm alive!")


class ReadinessHandler(BaseHandler):
    def get(self) -> None:
        self.write_json({
            "status": "healthy",
            "db": "Not connected",
            "cache": None,
            "litellm_version": __version__,
            "config_generation": self.gw.registry.generation,
            "models": len(self.gw.registry.deployments),
            "worker_pid": os.getpid(),
        })


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gw.metrics.render())


HANDLERS = {
    "models": ModelsHandler,
    "model": ModelHandler,
    "model_info": ModelInfoHandler,
    "liveliness": LivelinessHandler,
    "readiness": ReadinessHandler,
    "metrics": MetricsHandler,
}
