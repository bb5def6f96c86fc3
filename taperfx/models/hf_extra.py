"""The optional ``hf`` extra (``transformers``), imported only where a function needs it.

``taperfx.models`` and ``taperfx.hf`` import without ``transformers`` so that the
command line and the rest of taperfx keep working for users who never touch a
Hugging Face model.
"""

from __future__ import annotations

__all__ = ["transformers"]


def transformers():
    """The ``transformers`` module, or an ImportError that says how to install it."""
    try:
        import transformers as module
    except ImportError as exc:
        raise ImportError(
            "Hugging Face support needs the optional extra: pip install 'taperfx[hf]' (it provides transformers)"
        ) from exc
    return module
