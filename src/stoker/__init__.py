"""stoker: train transformer models from a laptop CPU to a multi-node GPU cluster."""

__version__ = "0.1.0"

__all__ = ["build_model", "load_model", "load_tokenizer", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import stoker` (and the CLI's --help) does not import torch.
    if name in ("build_model", "load_model", "load_tokenizer"):
        from stoker import api

        return getattr(api, name)
    raise AttributeError(name)
