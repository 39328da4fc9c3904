"""Using a trained dictionary with its model: which features fire on a text and what the
dictionary leaves unexplained there (``interp.observe``).

Runs without Ray: a dictionary folder (ours, or one SAELens wrote) and a Hugging Face causal LM.
May import ``trainer`` and ``activation_cache``; never ``cluster`` or ``ray``.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interp.observe import Observations, Observer, open_observer

__all__ = ["Observations", "Observer", "open_observer"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing interp.loading (as the training job does) loads no model code.
    if name in __all__:
        from interp import observe

        return getattr(observe, name)
    raise AttributeError(f"module 'interp' has no attribute {name!r}")
