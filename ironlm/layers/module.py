"""Module: torch's nn.Module without the hook dispatch on every call."""
from torch import nn


class Module(nn.Module):
    """Calling the module calls forward and nothing else. nn.Module.__call__ looks for hooks first (~1 us a
    call), a decode step of a small model makes ~300 module calls, and ironlm registers no hooks."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def bind_submodules(model: nn.Module) -> None:
    """Give every module its children as plain instance attributes too (they stay registered in _modules).
    self.child then resolves without nn.Module.__getattr__, which a small model's decode step enters hundreds of
    times. Replacing a child with setattr (or set_submodule) drops the plain copy, so the two never disagree."""
    for module in model.modules():
        for name, child in module._modules.items():
            if child is not None:
                module.__dict__[name] = child
