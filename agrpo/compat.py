"""Running model code written for transformers 4 on transformers 5.

Hub repositories such as LLaDA's ship their own model classes, written against transformers 4,
and transformers 5 breaks two of their habits:

* a model `__init__` that never calls `self.post_init()`: transformers 5 sets the attributes
  `from_pretrained` reads (`all_tied_weights_keys`, ...) there, so loading fails with
  `AttributeError: ... has no attribute 'all_tied_weights_keys'`;
* a forward reading `config.use_cache` from a config class that never set it: transformers 4's
  base config defined `use_cache`, transformers 5's does not (`AttributeError: 'XConfig' object
  has no attribute 'use_cache'`).

Both fixes leave code that already behaves untouched.
"""

from __future__ import annotations

import functools

from torch import nn

_PATCHED = "_agrpo_runs_post_init"


def ensure_use_cache(config) -> None:
    """Give a config without `use_cache` the value False: denoising never keeps a key/value cache."""
    if not hasattr(config, "use_cache"):
        config.use_cache = False


def ensure_post_init(model_class: type[nn.Module]) -> type[nn.Module]:
    """Make `model_class(...)` run `post_init()` when its own `__init__` did not.

    The class is changed in place (transformers hands the same dynamically imported class to
    `from_pretrained`); subclasses are left alone, since post_init must run after the last
    `__init__`, and they are patched themselves when loaded.
    """
    if model_class.__dict__.get(_PATCHED) or not hasattr(model_class, "post_init"):
        return model_class
    original = model_class.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is model_class and not hasattr(self, "all_tied_weights_keys"):
            self.post_init()

    model_class.__init__ = __init__
    setattr(model_class, _PATCHED, True)
    return model_class


def prepare_remote_code(auto_class, source: str, *, config, trust_remote_code: bool = False, **_) -> None:
    """Before `auto_class.from_pretrained(source, config=config, ...)`: fix the config and the
    class it will build when they come from the model's own code. Takes from_pretrained's kwargs."""
    if not trust_remote_code:
        return
    import importlib

    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    # modules transformers copied since the last import are found even after an earlier hub import
    # failed in this process (the path finders cache directory listings)
    importlib.invalidate_caches()
    ensure_use_cache(config)
    class_ref = (getattr(config, "auto_map", None) or {}).get(auto_class.__name__)
    if class_ref:
        ensure_post_init(get_class_from_dynamic_module(class_ref, source))
