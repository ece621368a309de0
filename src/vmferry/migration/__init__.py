"""The migration engine (sans-IO): stream codec, pre-copy policy, session machines."""
