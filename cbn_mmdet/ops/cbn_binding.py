"""Finding the conv that produces a CBN layer's input, without forking the modules that hold them.

CBN compensates its statistics in the weight of the conv that feeds it, and its closed-form statistic
gradients need that conv's input. mmcv/mmdet build the norm inside ``ConvModule``, ResNet blocks, stems
etc., often *before* the conv exists, so a CBN cannot learn its conv at construction time. Instead:

* ``bind_cbn_to_conv(norm, conv)`` binds explicitly (use it in your own modules);
* ``bind_cbn_convs(root)`` walks a model and binds every unbound CBN through the registered *conv
  finders* (a ``nn.Sequential`` whose previous child is a conv is built in here; ``cbn_mmdet.models``
  adds mmcv's ``ConvModule`` and mmdet's ``normK_name``/``convK`` block convention);
* so that ``norm_cfg=dict(type='CBN')`` works with no code change, every CBN that needs a conv is queued
  at construction and bound as soon as the structure identifies its conv: a global *module
  registration* hook retries the finders whenever the CBN is registered into a parent, or a module is
  registered into a parent holding a queued CBN. The layer's window buffers then get their final
  shapes while the model is being built, before any copy of it is taken (EMA, ``deepcopy``).
* as a fallback, a global forward pre-hook binds what is still queued the first time a module
  containing it runs (typically the detector's first forward), and gives every layer its qualified
  name for messages; the hooks remove themselves once nothing is left to do.

A layer whose conv cannot be identified records why; it raises that error, naming itself, at its first
training forward — it never silently falls back to plain BN.
"""
import weakref

import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_forward_pre_hook, register_module_module_registration_hook
from torch.nn.parallel import DistributedDataParallel

__all__ = ['CBNBindError', 'register_conv_finder', 'find_producing_conv', 'bind_cbn_to_conv',
           'bind_cbn_convs']


class CBNBindError(RuntimeError):
    """A CBN layer cannot be bound to the conv that produces its input."""


_CONV_FINDERS = []
_pending = weakref.WeakSet()     # CBN layers that need a conv and have none yet
_scanned = weakref.WeakSet()     # roots already searched (each is searched once)
_unnamed = weakref.WeakSet()     # bound at registration: named at the first forward of their model
_hook_handle = None
_registration_handle = None


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


def bind_cbn_to_conv(norm, conv, name=None, conv_name=None):
    """Bind a CBN layer to the conv that produces its input (checks shapes, hooks the conv input)."""
    norm.bind_conv(conv, name=name, conv_name=conv_name)
    _pending.discard(norm)
    if name is not None:
        _unnamed.discard(norm)
    return norm


def _conv_name(parent_name, parent, conv):
    for name, child in parent.named_children():
        if child is conv:
            return f'{parent_name}.{name}' if parent_name else name
    return type(conv).__name__


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
                bind_cbn_to_conv(child, conv, name=qualified, conv_name=_conv_name(parent_name, parent, conv))
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
    """Called by every CBN that needs a conv: bind it as soon as its parent identifies the conv."""
    global _hook_handle, _registration_handle
    _pending.add(norm)
    if _hook_handle is None:
        _hook_handle = register_module_forward_pre_hook(_bind_pending_pre_hook)
    if _registration_handle is None:
        _registration_handle = register_module_module_registration_hook(_bind_on_registration)


def _try_bind(parent, child_name, norm):
    """Bind ``norm`` if the finders already identify its conv; otherwise leave it queued, silently (the
    parent may not hold the conv yet; the first-forward fallback reports what is still unbound)."""
    try:
        conv = find_producing_conv(parent, child_name, norm)
        bind_cbn_to_conv(norm, conv, conv_name=_conv_name('', parent, conv))
    except CBNBindError:
        return
    _unnamed.add(norm)


# A CBN window is per rank (each rank's own statistics). torch DDP with broadcast_buffers=True would
# overwrite it with rank 0's before every forward, so the window buffers are excluded from DDP's buffer
# synchronisation; running statistics stay synchronised like BN's.
PER_RANK_BUFFERS = ('window_head', 'window')     # the packed window and its ring position


def per_rank_buffer_names(model):
    """Qualified names of the CBN window buffers under ``model`` (what DDP must not broadcast)."""
    return [f'{prefix}.{buf}' if prefix else buf for prefix, m in model.named_modules()
            if getattr(m, 'needs_conv', False) for buf in PER_RANK_BUFFERS]


def _keep_windows_per_rank(ddp, model):
    # DDP.__init__ has read its ignore list (``parameters_to_ignore``) but has not yet collected the
    # buffers it broadcasts when it assigns ``self.module``: extending the list here is enough.
    names = per_rank_buffer_names(model)
    if names:
        ddp.parameters_to_ignore.update(names)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, sorted(set(getattr(model, '_ddp_params_and_buffers_to_ignore', ())) | set(names)))


def _bind_on_registration(parent, name, module):
    if isinstance(parent, DistributedDataParallel) and name == 'module' and module is not None:
        _keep_windows_per_rank(parent, module)
        return None
    if not _pending or module is None or not any(child in _pending for child in (module, *parent._modules.values())):
        return None
    # torch runs this hook just before it stores the child; store it now (torch then stores the same
    # module again) so that the finders see the parent as it is about to be.
    parent._modules[name] = module
    for child_name, child in list(parent._modules.items()):
        if child in _pending:
            _try_bind(parent, child_name, child)
    return None


# Host-side bookkeeping on module sets (weak references): dynamo must not trace it — it cannot, once the
# sets hold a compiled module, and a model compiled before its first forward runs this hook inside the
# compiled region.
@torch.compiler.disable
def _bind_pending_pre_hook(module, args):
    global _hook_handle
    if not _pending and not _unnamed:
        if _hook_handle is not None:
            _hook_handle.remove()
            _hook_handle = None
        return
    if module in _pending or module in _scanned or module in _unnamed:
        return   # a CBN called on its own has no parent to search; its forward reports it
    if _unnamed:
        for qualified, child in module.named_modules():
            if child in _unnamed and qualified:
                child._layer_name = qualified
                _unnamed.discard(child)
    if any(child in _pending for child in module.modules()):
        bind_cbn_convs(module, strict=False)
    _scanned.add(module)
