"""One module per ``taperfx`` command: ``add_arguments(parser)`` and ``run(args) -> int``.

``taperfx.cli`` imports a module only when its command runs, so a module here
imports torch, onnx or matplotlib inside ``run``, never at the top. The library
functions they call live in the packages of their stage (``taperfx.train``,
``taperfx.passes``, ``taperfx.export``, ...); these modules only glue them to flags.
"""
