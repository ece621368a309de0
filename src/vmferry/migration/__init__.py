"""The migration engine (sans-IO).  Importing the package registers the architectures
whose VM parts need the engine's pre-flight (``arch = "arm64"``)."""

from vmferry.migration import arm64_handler  # noqa: F401  (registers arch "arm64")
