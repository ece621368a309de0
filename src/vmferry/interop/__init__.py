"""Other VMMs' artefacts, read into vmferry's models (sans-IO).

:mod:`vmferry.interop.qemu` reads QEMU's migration stream ("QEVM", version 3).
"""
