"""Structural re-parameterization: parallel conv branches summed on one input become one conv.

RepVGG, MobileOne, ACNet and DBB-style blocks train as a sum of branches over the same input: a
k x k conv, a 1 x 1 conv (or 1 x k, k x 1), a BatchNorm on the input itself, the input itself.
After BatchNorm folding every branch is linear in that input, so their sum is one conv whose
kernel is the sum of the branch kernels, each zero-padded to the largest size around the same
centre (an identity branch is a 1 at the centre, a BatchNorm on the input a per-channel scale
there plus its shift in the bias). That is what these models deploy: one int8 conv per block
instead of several convs, a float BatchNormalization and float Adds, and one quantization point
where the sum had three.

Only exact merges are made: every branch reads the same tensor, no branch's output is read
elsewhere, convs share stride, groups and out channels with dilation 1, zero padding and odd
kernels, their padding puts the kernel centres on the same input pixel, and identity-like
branches need stride 1 and as many output as input channels.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

__all__ = ["merge_parallel_branches"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _is_add(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target in _ADD_FUNCTIONS or str(node.target) in ("aten.add.Tensor", "aten.add_.Tensor"):
            return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
        return False
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__ == "AddTensors" and len(node.args) == 2
    return False


def _leaves(gm: fx.GraphModule, node: fx.Node, root: bool = True) -> list[fx.Node] | None:
    """The terms of a sum tree rooted at `node`; inner sums must be read by their parent alone."""
    if _is_add(gm, node) and (root or len(node.users) == 1):
        out = []
        for arg in node.args:
            sub = _leaves(gm, arg, root=False)
            if sub is None:
                return None
            out += sub
        return out
    return [node]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_ok(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and _pair(conv.dilation) == (1, 1)
            and not isinstance(conv.padding, str) and all(k % 2 == 1 for k in _pair(conv.kernel_size)))


def _offset(conv: nn.Conv2d) -> tuple[int, int]:
    return tuple(k // 2 - p for k, p in zip(_pair(conv.kernel_size), _pair(conv.padding)))


def _branch(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> tuple[str, nn.Module | None] | None:
    """('conv', module) / ('bn', module) / ('identity', None) for a term reading `source`."""
    if node is source:
        return "identity", None
    if node.op != "call_module" or len(node.args) != 1 or node.args[0] is not source or node.kwargs:
        return None
    module = gm.get_submodule(node.target)
    if _conv_ok(module):
        return "conv", module
    if type(module) is nn.BatchNorm2d and module.track_running_stats and module.running_mean is not None:
        return "bn", module
    return None


def _merged(branches: list[tuple[str, nn.Module | None]]) -> nn.Conv2d | None:
    convs = [m for kind, m in branches if kind == "conv"]
    if not convs:
        return None
    first = convs[0]
    def shape(c: nn.Conv2d) -> tuple:
        return c.out_channels, c.in_channels, _pair(c.stride), c.groups, _offset(c)
    if any(shape(c) != shape(first) for c in convs):
        return None
    off = _offset(first)
    identity_like = len(convs) < len(branches)
    if identity_like and (_pair(first.stride) != (1, 1) or off != (0, 0) or first.in_channels != first.out_channels):
        return None
    kh = max(_pair(c.kernel_size)[0] for c in convs)
    kw = max(_pair(c.kernel_size)[1] for c in convs)
    padding = (kh // 2 - off[0], kw // 2 - off[1])
    merged = nn.Conv2d(first.in_channels, first.out_channels, (kh, kw), first.stride, padding, groups=first.groups,
                       bias=True)
    weight = torch.zeros_like(merged.weight, dtype=torch.float64)
    bias = torch.zeros(first.out_channels, dtype=torch.float64)
    per_group = first.in_channels // first.groups
    channels = torch.arange(first.out_channels)
    for kind, m in branches:
        if kind == "conv":
            h, w = _pair(m.kernel_size)
            top, left = (kh - h) // 2, (kw - w) // 2
            weight[:, :, top:top + h, left:left + w] += m.weight.detach().double()
            if m.bias is not None:
                bias += m.bias.detach().double()
            continue
        scale = torch.ones(first.out_channels, dtype=torch.float64)
        shift = torch.zeros(first.out_channels, dtype=torch.float64)
        if kind == "bn":
            scale = 1.0 / torch.sqrt(m.running_var.double() + m.eps)
            shift = -m.running_mean.double() * scale
            if m.affine:
                gamma, beta = m.weight.detach().double(), m.bias.detach().double()
                scale, shift = scale * gamma, shift * gamma + beta
        weight[channels, channels % per_group, kh // 2, kw // 2] += scale
        bias += shift
    with torch.no_grad():
        merged.weight.copy_(weight.to(merged.weight.dtype))
        merged.bias.copy_(bias.to(merged.bias.dtype))
    return merged.to(first.weight.device).eval()


def merge_parallel_branches(gm: nn.Module) -> tuple[nn.Module, int]:
    """Merge every sum of parallel conv / BatchNorm / identity branches over one input into one
    conv, in place on a torch.fx GraphModule (other models are returned as they are). Returns
    (model, number of sums merged)."""
    if not isinstance(gm, fx.GraphModule):
        return gm, 0
    count, erased = 0, set()
    for node in reversed(list(gm.graph.nodes)):  # outermost sums first: their inner sums go with them
        if node in erased or not _is_add(gm, node):
            continue
        terms = _leaves(gm, node)
        if not terms or len(terms) < 2:
            continue
        sources = {t.args[0] if t.op == "call_module" and t.args else t for t in terms}
        source = next(iter(sources)) if len(sources) == 1 else None
        if source is None or len({id(t) for t in terms}) != len(terms):
            continue
        branches = [_branch(gm, t, source) for t in terms]
        if None in branches or any(t is not source and len(t.users) != 1 for t in terms):
            continue
        merged = _merged(branches)
        if merged is None:
            continue
        anchor = max((t for t, (kind, _) in zip(terms, branches) if kind == "conv"),
                     key=lambda t: gm.get_submodule(t.target).weight.numel())
        _set_submodule(gm, anchor.target, merged)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(anchor.target, (source,))
        node.replace_all_uses_with(new)
        _erase_tree(gm.graph, node, erased)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return gm, count


def _set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _erase_tree(graph: fx.Graph, node: fx.Node, erased: set) -> None:
    """Erase `node` and, recursively, the nodes only it read (the merged branches and inner sums)."""
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    erased.add(node)
    for arg in inputs:
        if not arg.users and arg.op in ("call_module", "call_function"):
            _erase_tree(graph, arg, erased)
