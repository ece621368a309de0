"""The migration engine (sans-IO).  Importing the package registers the architectures
whose VM parts need the engine's pre-flight (``arch = "arm64"``)."""

from vmferry.migration import arm64_handler as _arm64_handler

__all__: list[str] = []
del _arm64_handler
