"""An ExportedProgram (or a TorchScript module converted to one) as an nn.Module whose Conv, Linear
and BatchNorm calls are real torch modules again.

Pruning, BatchNorm folding and quantization find their layers by module type; an exported graph
only holds functional aten calls on lifted tensors. Each aten.conv1d/2d/3d/convolution, aten.linear
and eval-mode batch norm whose weight is a parameter becomes a call to an nn.Conv*/nn.Linear/
nn.BatchNorm* that holds the very same tensors, registered under the name of the module that owned
them (`features.0`), so reports use the user's layer names. Everything else is copied as is.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from sqexport.contracts.errors import ModelLoadError

__all__ = ["module_from_program", "AddTensors", "ConcatTensors", "clashing_names"]


class AddTensors(nn.Module):
    """`a + b` of two computed tensors, as a module: quantization can place a point on the sum
    (toolchain.quantization.activation_sites), as torch's FloatFunctional lets a model do."""

    def forward(self, a, b):
        return a + b


class ConcatTensors(nn.Module):
    """torch.cat(xs, dim) as a module (see AddTensors)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, *xs):
        return torch.cat(xs, self.dim)

aten = torch.ops.aten
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
          aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default}
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}  # by spatial dims
_NORM_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by input rank
_LINEAR = {aten.linear.default}
_NATIVE_BN = aten._native_batch_norm_legit_no_training.default
_BATCH_NORMS = {aten.batch_norm.default, _NATIVE_BN}
# activations that become modules again (nn.SiLU, ...), so quantization can place its points by
# module (toolchain.quantization.activation_sites); the in-place variants as in-place modules
_ACTIVATIONS = {getattr(aten, op).default: (cls, op.endswith("_"))
                for op, cls in (("silu", nn.SiLU), ("silu_", nn.SiLU), ("sigmoid", nn.Sigmoid),
                                ("hardsigmoid", nn.Hardsigmoid),
                                ("hardsigmoid_", nn.Hardsigmoid), ("hardswish", nn.Hardswish),
                                ("hardswish_", nn.Hardswish)) if hasattr(aten, op)}
# tensor factories whose aten schema is the torch function's (size first, then dtype/layout/device
# keywords): called as torch.<name> on a dynamic size
_SIZED_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "rand", "randn"}
_TENSOR_INPUTS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
# runtime checks the export recorded on sizes: they compute nothing, and the ONNX exporter cannot
# take them (aten::_assert_scalar on a traced size tensor)
_ASSERTIONS = {getattr(aten, n).default for n in ("_assert_scalar", "sym_constrain_range_for_size",
                                                   "sym_constrain_range", "_assert_tensor_metadata")
               if hasattr(aten, n)}


def _arguments(node: fx.Node) -> dict:
    """The call's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _tuple(value, dims: int) -> tuple | str:
    if isinstance(value, str):
        return value
    value = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return tuple(value * dims if len(value) == 1 else value)


class _Builder:
    """Walks the program's graph once, building the new graph and the modules it calls."""

    def __init__(self, ep: ExportedProgram):
        self.tensors = {**ep.state_dict, **ep.constants}
        self.specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.claimed: set[str] = set()  # module paths in use

    def target_of(self, node) -> str | None:
        """The state-dict name of a lifted tensor argument, else None."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        spec = self.specs.get(node.name)
        return spec.target if spec is not None and spec.kind in _TENSOR_INPUTS else None

    def weight_of(self, node, layer: fx.Node, ranks: tuple[int, ...]) -> str | None:
        """The state-dict name of `layer`'s weight argument: a lifted tensor's own, or for a weight
        computed from the program's tensors alone (weight standardization: NF-ResNet, BiT; weight
        norm) the name of the tensor it is computed from, now holding the computed value. Computed
        only when nothing but `layer` reads the computation and its tensors."""
        name = self.target_of(node)
        if name is not None or not isinstance(node, fx.Node):
            return name
        chain: list[fx.Node] = []
        leaves: list[fx.Node] = []
        if not self._parameter_only(node, chain, leaves) or not leaves:
            return None
        inside = set(chain) | {layer}
        if any(u not in inside for n in (*chain, *leaves) for u in n.users):
            return None
        with torch.no_grad():
            value = self._evaluate(node, {})
        if not isinstance(value, torch.Tensor) or value.ndim not in ranks or not value.is_floating_point():
            return None
        targets = [self.target_of(p) for p in leaves]
        root = next((t for t in targets if self.tensors[t].shape == value.shape), targets[0])
        for t in targets:
            self.tensors.pop(t, None)  # read by nothing else: the layer holds the computed weight
        self.tensors[root] = value.detach().contiguous()
        return root

    def _parameter_only(self, node: fx.Node, chain: list, leaves: list) -> bool:
        if node.op == "placeholder":
            if self.target_of(node) is None:
                return False  # the user's input
            if node not in leaves:
                leaves.append(node)
            return True
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                or node.target._schema.is_mutable or "rand" in node.target._schema.name:
            return False
        if node not in chain:
            chain.append(node)
        return all(self._parameter_only(n, chain, leaves) for n in node.all_input_nodes)

    def _evaluate(self, node: fx.Node, memo: dict) -> torch.Tensor:
        if node not in memo:
            if node.op == "placeholder":
                memo[node] = self.tensors[self.target_of(node)]
            else:
                args = fx.map_arg(node.args, lambda n: self._evaluate(n, memo))
                kwargs = fx.map_arg(node.kwargs, lambda n: self._evaluate(n, memo))
                memo[node] = node.target(*args, **kwargs)
        return memo[node]

    def _module_path(self, targets: list[str], kind: str) -> str:
        """The owning module's name when the op owns it alone, else a fresh name beside it."""
        owner = targets[0].rpartition(".")[0]
        leaves = {t.rpartition(".")[2] for t in targets}
        others = [t for t in self.tensors if t.rpartition(".")[0] == owner and t not in targets]
        own_names = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
        if owner and owner not in self.claimed and leaves <= own_names and not others \
                and all(t.rpartition(".")[0] == owner for t in targets):
            return owner
        if owner in self.claimed:  # a module called again (CoaT's shared positional conv): beside it,
            # not inside the module installed there
            parent, _, leaf = owner.rpartition(".")
            prefix = f"{parent + '.' if parent else ''}{leaf}_"
        else:
            prefix = f"{owner + '.' if owner else ''}"
        i = 0
        while f"{prefix}{kind}{i}" in self.claimed:
            i += 1
        return f"{prefix}{kind}{i}"

    def _install(self, path: str, module: nn.Module, targets: list[str]) -> fx.Node:
        parent = self.root
        *parents, leaf = path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(leaf, module)
        self.claimed.add(path)
        return self.graph.call_module(path)

    def conv(self, node: fx.Node) -> fx.Node | None:
        a = _arguments(node)
        b_name = self.target_of(a["bias"])
        if a.get("transposed") or (a["bias"] is not None and b_name is None):
            return None
        w_name = self.weight_of(a["weight"], node, (3, 4, 5))
        weight = self.tensors.get(w_name) if w_name else None
        if weight is None or weight.ndim - 2 not in _CONV_CLASSES:
            return None
        dims = weight.ndim - 2
        cls = _CONV_CLASSES[dims]
        groups = int(a["groups"])
        conv = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                   stride=_tuple(a["stride"], dims), padding=_tuple(a["padding"], dims),
                   dilation=_tuple(a["dilation"], dims), groups=groups, bias=b_name is not None)
        return self._wrap(conv, node, a["input"], {"weight": w_name, **({"bias": b_name} if b_name else {})}, "conv")

    def linear(self, node: fx.Node) -> fx.Node | None:
        a = _arguments(node)
        b_name = self.target_of(a["bias"])
        if a["bias"] is not None and b_name is None:
            return None
        w_name = self.weight_of(a["weight"], node, (2,))
        weight = self.tensors.get(w_name) if w_name else None
        if weight is None or weight.ndim != 2:
            return None
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=b_name is not None)
        return self._wrap(lin, node, a["input"], {"weight": w_name, **({"bias": b_name} if b_name else {})}, "linear")

    def addmm(self, node: fx.Node) -> fx.Node | None:
        """Core ATen's Linear: addmm(bias, x, permute(weight, [1, 0])) (or t(weight))."""
        bias, x, wt = node.args[:3]
        if node.kwargs or not isinstance(wt, fx.Node) or wt.target not in (aten.permute.default, aten.t.default) \
                or (wt.target == aten.permute.default and list(wt.args[1]) != [1, 0]):
            return None
        w_name, b_name = self.target_of(wt.args[0]), self.target_of(bias)
        weight = self.tensors.get(w_name) if w_name else None
        if weight is None or b_name is None or weight.ndim != 2 or self.tensors[b_name].ndim != 1:
            return None
        lin = nn.Linear(weight.shape[1], weight.shape[0])
        return self._wrap(lin, node, x, {"weight": w_name, "bias": b_name}, "linear")

    def batch_norm(self, node: fx.Node) -> fx.Node | None:
        a = _arguments(node)
        names = [self.target_of(a[k]) for k in ("weight", "bias", "running_mean", "running_var")]
        rank = getattr(a["input"].meta.get("val"), "ndim", None)
        if None in names or a.get("training") or rank not in _NORM_CLASSES:
            return None
        bn = _NORM_CLASSES[rank](
            self.tensors[names[0]].shape[0], eps=float(a["eps"]), momentum=float(a["momentum"]))
        slots = dict(zip(("weight", "bias", "running_mean", "running_var"), names))
        counter = names[2].rpartition(".")[0] + ".num_batches_tracked"
        if counter.lstrip(".") in self.tensors:
            slots["num_batches_tracked"] = counter.lstrip(".")
        return self._wrap(bn, node, a["input"], slots, "bn")

    def _wrap(self, module: nn.Module, node: fx.Node, x: fx.Node, slots: dict[str, str], kind: str) -> fx.Node:
        """Call `module` instead of `node`; it holds the program's own tensors (slot -> target)."""
        for slot, target in slots.items():
            value = self.tensors[target]
            if slot in module._parameters:
                module._parameters[slot] = value if isinstance(value, nn.Parameter) else \
                    nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[slot] = value
        targets = list(slots.values())
        call = self._install(self._module_path(targets, kind), module.eval(), targets)
        call.args = (self.env[x],)
        call.meta = dict(node.meta)
        return call

    def activation(self, node: fx.Node) -> fx.Node | None:
        """An activation call as its module, named after the module that called it (its own
        module, `bn1.act`, when the model used one)."""
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        cls, inplace = _ACTIVATIONS[node.target]
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        owner = str(stack[-1][0]) if stack else ""
        path, i = owner, 0
        while not path or path in self.claimed or _lookup(self.root, path) is not None \
                or any(t == path or t.startswith(path + ".") for t in self.tensors):
            path = f"{owner + '.' if owner else ''}act{i}"
            i += 1
        call = self._install(path, cls(inplace=True) if inplace else cls(), [])
        call.args = (self.env[node.args[0]],)
        call.meta = dict(node.meta)
        return call

    def _computed(self, arg) -> bool:
        return isinstance(arg, fx.Node) and self.env.get(arg) is not None and self.target_of(arg) is None \
            and isinstance(arg.meta.get("val"), torch.Tensor)

    def add(self, node: fx.Node) -> fx.Node | None:
        """`a + b`; an in-place `a += b` too when nothing else reads `a` (no one sees it change)."""
        if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1 or not all(map(self._computed, node.args)):
            return None
        if node.target == aten.add_.Tensor and len(node.args[0].users) != 1:
            return None
        return self._call(node, AddTensors(), "add", [self.env[a] for a in node.args])

    def cat(self, node: fx.Node) -> fx.Node | None:
        xs = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if node.kwargs.keys() - {"dim"} or not isinstance(xs, (list, tuple)) or not all(map(self._computed, xs)):
            return None
        return self._call(node, ConcatTensors(int(dim)), "cat", [self.env[a] for a in xs])

    def _call(self, node: fx.Node, module: nn.Module, kind: str, args: list) -> fx.Node:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        owner = str(stack[-1][0]) if stack else ""
        i = 0
        while True:
            path = f"{owner + '.' if owner else ''}{kind}{i}"
            if path not in self.claimed and _lookup(self.root, path) is None \
                    and not any(t == path or t.startswith(path + ".") for t in self.tensors):
                break
            i += 1
        call = self._install(path, module, [])
        call.args = tuple(args)
        call.meta = dict(node.meta)
        return call

    def copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, lambda n: self.env[n])


def _set_tensor(root: nn.Module, target: str, value: torch.Tensor, parameter: bool) -> None:
    *parents, leaf = target.split(".")
    mod = root
    for name in parents:
        if not hasattr(mod, name):
            mod.add_module(name, nn.Module())
        mod = getattr(mod, name)
    if parameter:
        mod.register_parameter(leaf, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
    else:
        mod.register_buffer(leaf, value)


def _lookup(root: nn.Module, target: str):
    obj = root
    for name in target.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _user_outputs(ep: ExportedProgram, node: fx.Node) -> list:
    outs = list(node.args[0])
    kinds = [s.kind for s in ep.graph_signature.output_specs]
    if any(k not in (OutputKind.USER_OUTPUT, OutputKind.BUFFER_MUTATION) for k in kinds):
        raise ModelLoadError("the exported program has outputs other than plain tensors (training "
                             "graph?); export the model in eval mode")
    return [o for o, k in zip(outs, kinds) if k == OutputKind.USER_OUTPUT]


# higher-order ops torch.export wraps a region in: `with torch.autocast(..., enabled=False)` (EfficientViT's
# attention), `with torch.no_grad()`. In an FP32 inference graph they compute what their body does.
_REGION_WRAPPERS = ("WrapWithAutocast", "WrapWithSetGradEnabled")


def _inline_wrapped_regions(ep: ExportedProgram) -> None:
    """Replace each region wrapper by the nodes of its body, in place, so the rebuild sees plain aten
    calls (a region's Conv is found like any other). A region that changes precision (autocast to
    bfloat16) then runs in FP32: the rebuilt model's outputs differ, and the caller keeps the model."""
    graph = ep.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or type(node.target).__name__ not in _REGION_WRAPPERS:
            continue
        body_at = next(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr")
        body = getattr(ep.graph_module, node.args[body_at].target)
        inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            outs = graph.graph_copy(body.graph, dict(zip(inputs, node.args[body_at + 1:])))
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise ModelLoadError("the exported program reads a wrapped region's outputs other than by index")
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        attr = node.args[body_at]
        graph.erase_node(node)
        if not attr.users:
            graph.erase_node(attr)


def module_from_program(ep: ExportedProgram) -> fx.GraphModule:
    """A GraphModule computing `ep` (user inputs -> user outputs) with real Conv/Linear/BN modules."""
    _inline_wrapped_regions(ep)
    b = _Builder(ep)
    native_bn: set[fx.Node] = set()
    sizes: set[fx.Node] = set()  # nodes computing a (possibly dynamic) size
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = b.specs[node.name]
            if spec.kind == InputKind.USER_INPUT:
                b.env[node] = b.graph.placeholder(node.name)
                b.env[node].meta = dict(node.meta)
            elif spec.kind in _TENSOR_INPUTS:
                b.env[node] = None  # resolved to get_attr after the modules are placed
            else:
                raise ModelLoadError(f"the exported program takes a {spec.kind.name.lower()} input, "
                                     "which sqexport cannot rebuild")
        elif node.op == "call_function":
            new = None
            if node.target in _ASSERTIONS:
                continue
            if node.target in _CONVS:
                new = b.conv(node)
            elif node.target in _LINEAR:
                new = b.linear(node)
            elif node.target == aten.addmm.default:
                new = b.addmm(node)
            elif node.target in _ACTIVATIONS:
                new = b.activation(node)
            elif node.target in (aten.add.Tensor, aten.add_.Tensor):
                new = b.add(node)
            elif node.target == aten.cat.default:
                new = b.cat(node)
            elif node.target in _BATCH_NORMS:
                new = b.batch_norm(node)
                if new is not None and node.target == _NATIVE_BN:
                    native_bn.add(node)
            elif node.target is operator.getitem and node.args[0] in native_bn:
                if node.args[1] != 0 and node.users:
                    raise ModelLoadError("the exported program uses batch-norm statistics as outputs")
                if node.args[1] != 0:  # unused saved statistics
                    continue
                new = b.env[node.args[0]]
            elif node.target == aten.sym_size.int:
                # x.size(d), not a traced constant: keeps the batch dimension dynamic in ONNX export
                new = b.graph.call_method("size", (b.env[node.args[0]], node.args[1]))
                sizes.add(node)
            elif _uses(node, sizes):
                new = _size_consumer(b, node, sizes)
            b.env[node] = new if new is not None else _copy_with_attrs(b, node)
        elif node.op == "output":
            outs = [b.env[o] if isinstance(o, fx.Node) else o for o in _user_outputs(ep, node)]
            b.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        else:
            raise ModelLoadError(f"the exported program has an unsupported '{node.op}' node")
    for target, value in b.tensors.items():
        if _lookup(b.root, target) is None:  # not already a module's weight under this very name
            spec = next((s for s in b.specs.values() if s.target == target), None)
            _set_tensor(b.root, target, value, spec is not None and spec.kind == InputKind.PARAMETER)
    for node in reversed(list(b.graph.nodes)):  # first: a computed weight's chain reads tensors no longer kept
        if node.op in ("call_function", "call_method", "get_attr") and not node.users and not node.is_impure():
            b.graph.erase_node(node)
    _free_reserved_names(b.root, b.graph)
    gm = fx.GraphModule(b.root, b.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval()


def _graph_module_attributes() -> frozenset[str]:
    probe = fx.GraphModule(nn.Module(), fx.Graph())
    return frozenset(dir(type(probe))) | frozenset(vars(probe))


GRAPH_MODULE_ATTRIBUTES = _graph_module_attributes()


def clashing_names(module: nn.Module) -> list[str]:
    """Top-level modules and tensors of `module` named like an attribute of fx.GraphModule (`meta`,
    `graph`, `code`: a metadata branch, a GNN's graph module): a GraphModule cannot hold them
    under those names (TypeError: cannot assign 'dict' as child module 'meta')."""
    names = [n for n, _ in module.named_children()] + [n for n, _ in module.named_parameters(recurse=False)] \
        + [n for n, _ in module.named_buffers(recurse=False)]  # public API: a TorchScript module too
    return sorted(set(names) & GRAPH_MODULE_ATTRIBUTES)


def _free_reserved_names(root: nn.Module, graph: fx.Graph) -> None:
    """Each of clashing_names(root) moves to `<name>_`, and the report names it so."""
    clashing = set(clashing_names(root))
    for store in (root._modules, root._parameters, root._buffers):
        for name in [n for n in store if n in clashing]:
            new = name + "_"
            while hasattr(root, new) or new in GRAPH_MODULE_ATTRIBUTES:
                new += "_"
            renamed = {(new if k == name else k): v for k, v in store.items()}
            store.clear()
            store.update(renamed)
            for node in graph.nodes:
                if node.op in ("call_module", "get_attr") and (node.target == name or node.target.startswith(name + ".")):
                    node.target = new + node.target[len(name):]


def _uses(node: fx.Node, nodes: set[fx.Node]) -> bool:
    return any(a in nodes for a in node.all_input_nodes)


def _size_consumer(b: _Builder, node: fx.Node, sizes: set[fx.Node]) -> fx.Node | None:
    """Arithmetic on sizes stays as is (and is a size too); an aten op taking a size becomes the
    tensor method (`x.view(n, -1)`) or the torch function (`torch.zeros(n, h, w)`), which
    torch.jit.trace records with the size symbolic, where a direct aten call would freeze the traced
    value into the ONNX graph."""
    if not isinstance(node.target, torch._ops.OpOverload):
        sizes.add(node)
        return None
    name = node.target._schema.name.split("::")[-1]
    if not hasattr(torch.Tensor, name) and name not in _SIZED_FACTORIES:
        return None
    _read_lifted(b, node)
    args = fx.map_arg(node.args, lambda n: b.env[n])
    kwargs = fx.map_arg(node.kwargs, lambda n: b.env[n])
    if hasattr(torch.Tensor, name):
        new = b.graph.call_method(name, args, kwargs)
    else:  # torch.zeros((n, h, w)) (EdgeNeXt's positional encoding)
        new = b.graph.call_function(getattr(torch, name), args, kwargs)
    new.meta = dict(node.meta)
    return new


def _read_lifted(b: _Builder, node: fx.Node) -> None:
    """Lifted tensor arguments of `node` (parameters, buffers: a ViT's class token) become get_attr
    reads of the tensors' own names."""
    for arg in node.all_input_nodes:
        if b.env.get(arg) is None and arg.op == "placeholder":
            b.env[arg] = b.graph.get_attr(b.target_of(arg))


def _copy_with_attrs(b: _Builder, node: fx.Node) -> fx.Node:
    """Copy a node, its lifted tensor arguments read by name (_read_lifted)."""
    _read_lifted(b, node)
    if node.target == aten.lift_fresh_copy.default:
        # a constant made in forward (`torch.tensor(...)`: Hugging Face models) is copied by an op
        # the ONNX exporter does not know; torch.clone is the same copy, exported as Identity
        new = b.graph.call_function(torch.clone, (b.env[node.args[0]],))
        new.meta = dict(node.meta)
        return new
    return b.copy(node)
