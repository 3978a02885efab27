"""kvxferd: a KV-cache transfer daemon for prefill/decode disaggregated LLM serving.

Importing the package is cheap on purpose: torch, CuPy, NIXL, zmq and YAML are
imported by the modules that need them, when they need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
