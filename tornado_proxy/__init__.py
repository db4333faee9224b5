"""An OpenAI-compatible LLM gateway built on Tornado."""

__version__ = "0.1.0"
