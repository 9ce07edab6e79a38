"""GGUF -> tokens: the model graph, KV cache, generation and perplexity (torch backend on CPU)."""

from .generate import Sampler, SamplingParams, Session, Stats
from .model import Model, load_model
from .perplexity import PerplexityResult, perplexity

__all__ = ["Model", "load_model", "Session", "Sampler", "SamplingParams", "Stats", "perplexity", "PerplexityResult"]
