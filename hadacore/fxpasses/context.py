"""What the passes share: the graph, the real tensors behind its parameters, the options,
and the structures the analysis passes find (linear sites, attention blocks, block graph).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

import hadacore.ops  # noqa: F401  (registers the hadacore::* ops the passes read and build)
from hadacore.options import CompileOptions

__all__ = [
    "LinearSite", "AttentionBlock", "PassContext", "is_call", "op_arguments", "call_op", "set_op_arguments",
    "LINEAR_TARGETS", "SDPA_TARGETS", "MATMUL_TARGETS",
]

LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
SILU_TARGETS = (F.silu, torch.ops.aten.silu.default, torch.nn.functional.silu)
MUL_TARGETS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)
MATMUL_TARGETS = (torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.matmul.default)


def is_call(node: Any, targets: tuple, method: Optional[str] = None) -> bool:
    """``node`` calls one of ``targets`` (call_function) or the method ``method``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        # Dynamo graphs call op packets (torch.ops.hadacore.hadamard), passes emit overloads.
        packet = getattr(node.target, "overloadpacket", None)
        if node.target in targets or (packet is not None and packet in targets):
            return True
    return method is not None and node.op == "call_method" and node.target == method


def _overload(target: Any) -> torch._ops.OpOverload:
    return target.default if isinstance(target, torch._ops.OpOverloadPacket) else target


def op_arguments(node: fx.Node) -> dict[str, Any]:
    """A ``torch.ops`` call's arguments by schema name, defaults filled in: how passes read
    ``hadacore::*`` nodes, whichever mix of positional and keyword arguments built them."""
    schema = _overload(node.target)._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            raise ValueError(f"{node.format_node()}: no value for {schema.name}'s argument {arg.name!r}")
    return out


def _positional(op: Any, arguments: dict[str, Any]) -> tuple:
    schema = _overload(op)._schema
    names = [a.name for a in schema.arguments]
    unknown = sorted(set(arguments) - set(names))
    if unknown:
        raise TypeError(f"{schema.name} has no argument(s) {unknown}; it takes {names}")
    return tuple(arguments[a.name] if a.name in arguments else a.default_value for a in schema.arguments)


def call_op(graph: fx.Graph, op: Any, **arguments: Any) -> fx.Node:
    """A call of ``op`` (its default overload) with ``arguments`` by name: how passes build
    ``hadacore::*`` nodes (positional in schema order, so Inductor sees one canonical form)."""
    return graph.call_function(_overload(op), _positional(op, arguments))


def set_op_arguments(node: fx.Node, **updates: Any) -> None:
    """Change some of a ``torch.ops`` call's arguments by name (the node keeps its users)."""
    arguments = op_arguments(node)
    arguments.update(updates)
    node.target = _overload(node.target)
    node.args, node.kwargs = _positional(node.target, arguments), {}


def skip_dtype_casts(node: Any) -> Any:
    """Follow ``t.to(dtype)`` / ``t.float()`` style casts back to their source."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("to", "float", "half", "bfloat16"):
        node = node.args[0]
    return node


@dataclasses.dataclass
class LinearSite:
    """One linear layer the graph computes: ``node`` is the ``linear(x, w, b)`` call.

    ``kind`` is "float" (a parameter/buffer weight) or "gptq" (the QuantLinear pattern
    ``[hadamard ->] gptq_dequantize -> linear``). Real tensors are compile-time snapshots.
    """

    node: fx.Node
    name: str
    kind: str
    x: fx.Node
    weight: Optional[torch.Tensor] = None  # float weight [N, K]
    bias_arg: Any = None  # the linear's bias argument, as found in the graph
    gptq: Optional[dict[str, torch.Tensor]] = None
    gptq_nodes: Optional[dict[str, fx.Node]] = None  # nodes holding the GPTQ tensors
    group_size: int = 0
    bits: int = 4
    hadamard: Optional[fx.Node] = None  # an online Hadamard feeding x
    gather: Optional[torch.Tensor] = None  # a runtime column permutation x[..., perm] still needed
    fused_into: Optional[str] = None
    rewritten: bool = False

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0]) if self.weight is not None else int(self.gptq["scales"].shape[1])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1]) if self.weight is not None else int(self.gptq["qweight"].shape[0] * 32 // self.bits)


@dataclasses.dataclass
class AttentionBlock:
    """An attention core (SDPA, or matmul-softmax-matmul) and the projections around it."""

    node: fx.Node  # the SDPA call, or the softmax of the explicit form
    form: str  # "sdpa" | "matmul_softmax"
    q: fx.Node  # the tensors entering attention (after RoPE / GQA repeat)
    k: fx.Node
    v: fx.Node
    head_dim: int
    q_proj: Optional[str] = None
    k_proj: Optional[str] = None
    v_proj: Optional[str] = None
    o_proj: Optional[str] = None
    k_is_transposed: bool = False  # matmul form: the k entering is already k^T
    name: str = ""


class PassContext:
    """State shared by the passes of one backend call."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, options: CompileOptions):
        self.gm = gm
        self.graph = gm.graph
        self.options = options
        self.example_inputs = example_inputs
        self.values: dict[fx.Node, torch.Tensor] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs):
            if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
                self.values[node] = value
        self.sites: list[LinearSite] = []
        # A graph traced with grad enabled and an input requiring grad gets an autograd
        # (joint) graph from AOTAutograd; hadacore::w4a16_gemm has no backward formula.
        self.needs_grad = torch.is_grad_enabled() and any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs
        )
        self.attention: list[AttentionBlock] = []
        self.block_graph = None  # networkx.DiGraph, built by the block_graph pass
        self.mlps: list = []  # block_graph.MLPBlock: (gate, up, down) triples
        self.r3: dict[str, tuple[fx.Node, fx.Node]] = {}  # attention name -> (hadamard(q), hadamard(k))
        self._n_constants = 0

    # ------------------------------------------------------------------ tensors
    def constant(self, node: Any) -> Optional[torch.Tensor]:
        """The real tensor behind a parameter/buffer node (placeholder or get_attr), else None."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, torch.Tensor) else None
        if node.op == "placeholder" and node in self.values and self.is_param_or_buffer(node):
            return self.values[node]
        return None

    def is_param_or_buffer(self, node: fx.Node) -> bool:
        """A placeholder Dynamo lifted from a module's parameters/buffers (not an activation)."""
        if node.op == "get_attr":
            return True
        value = self.values.get(node)
        if isinstance(value, torch.nn.Parameter):
            return True
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is None:  # Dynamo drops "grapharg" once the backend returns; its names remain
            return "_parameters_" in node.name or "_buffers_" in node.name
        name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))
        return "_parameters" in name or "_buffers" in name

    def add_constant(self, stem: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
        """Register ``tensor`` as a buffer of the GraphModule and read it with a get_attr node.

        AOTAutograd lifts buffers to graph inputs (so Inductor's cache keys on their
        metadata, not their values) and, for a Dynamo graph, expects a source for each:
        a ``ConstantSource`` naming the buffer (no guard is ever built on it)."""
        name = f"_hadacore_{stem}_{self._n_constants}".replace(".", "_")
        self._n_constants += 1
        self.gm.register_buffer(name, tensor.detach().contiguous())
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:
            from torch._dynamo.source import ConstantSource

            sources[name] = ConstantSource(name)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        node.meta["example_value"] = tensor
        return node

    def site(self, name: str) -> LinearSite:
        return next(s for s in self.sites if s.name == name)

    def site_of_output(self, node: Any) -> Optional[LinearSite]:
        """The linear site whose output ``node`` is (through dtype casts)."""
        node = skip_dtype_casts(node)
        for s in self.sites:
            if s.node is node:
                return s
        return None


def example_value(node: Any) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node):
        v = node.meta.get("example_value", node.meta.get("val"))
        return v if isinstance(v, torch.Tensor) else None
    return None


def node_name(node: fx.Node) -> str:
    """A readable layer name from a parameter placeholder, e.g. 'model.layers.0.mlp.down_proj.weight'."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is not None:
        name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))
        parts = re.findall(r"\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)", name)
        words = [a or b for a, b in parts]
        words = [w for w in words if w not in ("_modules", "_parameters", "_buffers", "__self__", "self", "fn", "L")]
        if words:
            return ".".join(words)
    if node.op == "placeholder" and ("_parameters_" in node.name or "_buffers_" in node.name):
        # Dynamo's placeholder names, e.g. l_self_modules_mlp_modules_down_proj_parameters_weight_
        name = re.sub(r"^l_(self_|fn_)?", "", node.name).rstrip("_")
        return re.sub(r"_(modules|parameters|buffers)_", ".", "_" + name).lstrip(".")
    return str(node.target if node.op == "get_attr" else node.name)
