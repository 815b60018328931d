"""Module: torch's nn.Module without the hook dispatch on every call."""
from torch import nn


class Module(nn.Module):
    """Calling the module calls forward and nothing else. nn.Module.__call__ looks for hooks first (~1 us a
    call), a decode step of a small model makes ~300 module calls, and ironlm registers no hooks."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)
