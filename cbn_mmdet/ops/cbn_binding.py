"""Finding the conv that produces a CBN layer's input, without forking the modules that hold them.

CBN compensates its statistics in the weight of the conv that feeds it, and its closed-form statistic
gradients need that conv's input. mmcv/mmdet build the norm inside ``ConvModule``, ResNet blocks, stems
etc., often *before* the conv exists, so a CBN cannot learn its conv at construction time. Instead:

* ``bind_cbn_to_conv(norm, conv)`` binds explicitly (use it in your own modules);
* ``bind_cbn_convs(root)`` walks a model and binds every unbound CBN through the registered *conv
  finders* (a ``nn.Sequential`` whose previous child is a conv is built in here; ``cbn_mmdet.models``
  adds mmcv's ``ConvModule`` and mmdet's ``normK_name``/``convK`` block convention);
* so that ``norm_cfg=dict(type='CBN')`` works with no code change, every CBN that needs a conv is queued
  at construction and a global forward pre-hook binds the queue the first time a module containing it
  runs (typically the detector's first forward); the hook removes itself once the queue is empty.

A layer whose conv cannot be identified records why; it raises that error, naming itself, at its first
training forward — it never silently falls back to plain BN.
"""
import weakref

import torch.nn as nn
from torch.nn.modules.module import register_module_forward_pre_hook

__all__ = ['CBNBindError', 'register_conv_finder', 'find_producing_conv', 'bind_cbn_to_conv',
           'bind_cbn_convs']


class CBNBindError(RuntimeError):
    """A CBN layer cannot be bound to the conv that produces its input."""


_CONV_FINDERS = []
_pending = weakref.WeakSet()     # CBN layers that need a conv and have none yet
_scanned = weakref.WeakSet()     # roots already searched (each is searched once)
_hook_handle = None


def register_conv_finder(finder):
    """Add ``finder(parent, child_name, norm) -> conv | None``; it may raise ``CBNBindError``.

    Finders are tried in registration order; the first that returns a module wins. A finder returns
    ``None`` when it does not recognise ``parent``.
    """
    if finder not in _CONV_FINDERS:
        _CONV_FINDERS.append(finder)
    return finder


@register_conv_finder
def _previous_in_sequential(parent, child_name, norm):
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    index = names.index(child_name)
    previous = parent._modules[names[index - 1]] if index > 0 else None
    if isinstance(previous, nn.Conv2d):
        return previous
    raise CBNBindError(f'it sits in an nn.Sequential after {type(previous).__name__}, not after a conv')


def find_producing_conv(parent, child_name, norm):
    """The conv feeding ``parent.<child_name>`` (a CBN), or raise ``CBNBindError`` saying why not."""
    for finder in _CONV_FINDERS:
        conv = finder(parent, child_name, norm)
        if conv is not None:
            return conv
    raise CBNBindError(
        f'no rule identifies the conv feeding it inside {type(parent).__name__}; bind it with '
        f'cbn_mmdet.ops.bind_cbn_to_conv(norm, conv) or pass the conv weight to forward(x, weight)')


def bind_cbn_to_conv(norm, conv, name=None):
    """Bind a CBN layer to the conv that produces its input (checks shapes, hooks the conv input)."""
    norm.bind_conv(conv, name=name)
    _pending.discard(norm)
    return norm


def bind_cbn_convs(root, strict=True):
    """Bind every not-yet-bound CBN under ``root``; return ``{qualified_name: conv}`` of new bindings.

    With ``strict`` a layer that cannot be bound raises ``CBNBindError`` naming it; otherwise the
    reason is recorded on the layer and raised at its first training forward.
    """
    bound = {}
    for parent_name, parent in root.named_modules():
        for child_name, child in parent.named_children():
            if child not in _pending and not (strict and _needs_conv(child)):
                continue
            qualified = f'{parent_name}.{child_name}' if parent_name else child_name
            try:
                conv = find_producing_conv(parent, child_name, child)
                bind_cbn_to_conv(child, conv, name=qualified)
                bound[qualified] = conv
            except CBNBindError as err:
                message = f"CBN layer '{qualified}' cannot identify its conv: {err}"
                if strict:
                    raise CBNBindError(message) from None
                child.record_bind_error(message)
                _pending.discard(child)
    return bound


def _needs_conv(module):
    return getattr(module, 'needs_conv', False) and not module.is_bound


def queue_for_binding(norm):
    """Called by every CBN that needs a conv: bind it lazily at the first forward of its model."""
    global _hook_handle
    _pending.add(norm)
    if _hook_handle is None:
        _hook_handle = register_module_forward_pre_hook(_bind_pending_pre_hook)


def _bind_pending_pre_hook(module, args):
    global _hook_handle
    if not _pending:
        if _hook_handle is not None:
            _hook_handle.remove()
            _hook_handle = None
        return
    if module in _pending or module in _scanned:
        return   # a CBN called on its own has no parent to search; its forward reports it
    if any(child in _pending for child in module.modules()):
        bind_cbn_convs(module, strict=False)
    _scanned.add(module)
