"""The stable text form of a Graph: it prints and parses back.

    graph mlp(%x: f32[1,64]) -> (%out) {
      const %fc.weight: f32[10,64]
      const %two: f32[] = [2.0]
      %out: f32[1,10] = linear(%x, %fc.weight) {}  # model.py:12 x = self.fc(x)
      return %out
    }

Constants of up to ``INLINE_LIMIT`` elements print their values; larger ones print only their
type, and ``parse_graph`` takes their arrays from its ``constants`` argument.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import numpy as np

from kiln.ir.errors import KilnError, ParseError
from kiln.ir.graph import Graph, Node
from kiln.ir.sizes import SymDim, format_dim, parse_dim
from kiln.ir.types import DType, TensorType

INLINE_LIMIT = 16


def _json_default(value):
    if isinstance(value, SymDim):
        return {"size": format_dim(value)}
    raise TypeError(f"attribute value {value!r} cannot be printed")


def format_attr(value) -> str:
    """One attribute value: JSON, with tuples as lists and a size formula (kiln.ir.sizes) as
    ``{"size": "batch*seq"}``."""
    return json.dumps(value, separators=(", ", ": "), default=_json_default)


def _format_scalar(v, dtype: DType) -> str:
    if dtype == DType.bool:
        return "true" if v else "false"
    if dtype.is_float:
        # NumPy's str of a float32/float16 is the shortest text that reads back exactly.
        s = str(dtype.numpy.type(v))
        return {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}.get(s, s)
    return str(int(v))


def print_node(node: Node, types: Mapping[str, TensorType], *, sources: bool = True) -> str:
    """One node as text; ``sources=False`` leaves out its ``# file:line`` comment."""
    outs = ", ".join(f"%{o}: {types[o]}" for o in node.outputs)
    args = ", ".join(f"%{i}" for i in node.inputs)
    attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in node.attrs.items())
    line = f"{outs} = {node.op}({args}) {{{attrs}}}"
    if node.source and sources:
        line += "  # " + node.source.replace("\n", " ")
    return line


def print_graph(g: Graph, *, sources: bool = True) -> str:
    """The graph as text (see the module docstring).

    ``sources=False`` leaves out the nodes' source-line comments: the text then depends only
    on what the graph computes, not on where the model's code was written or run from (a
    hash of it, such as the compile cache's key, stays the same for the same model)."""
    ins = ", ".join(f"%{i}: {g.types[i]}" for i in g.inputs)
    outs = ", ".join(f"%{o}" for o in g.outputs)
    lines = [f"graph {g.name}({ins}) -> ({outs}) {{"]
    for name, (lo, hi) in g.sizes.items():
        lines.append(f"  size {name} in {lo}..{hi}")
    for name, arr in g.constants.items():
        t = g.types[name]
        line = f"  const %{name}: {t}"
        if arr.size <= INLINE_LIMIT:
            line += " = [" + ", ".join(_format_scalar(v, t.dtype) for v in arr.ravel()) + "]"
        lines.append(line)
    for n in g.nodes:
        lines.append("  " + print_node(n, g.types, sources=sources))
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- parsing ---------------------------------------------------------------------------------
_NAME = r"%([A-Za-z0-9_.]+)"
_TYPE = r"([a-z0-9]+)\[([A-Za-z0-9_,+*^ -]*)\]"
_SIZE = re.compile(r"^size\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\s+(\d{1,12})\.\.(\d{1,12})$")
_HEADER = re.compile(r"^graph\s+([A-Za-z0-9_.]+)\((.*)\)\s*->\s*\((.*)\)\s*\{$")
_TYPED = re.compile(_NAME + r":\s*" + _TYPE)
_CONST = re.compile(r"^const\s+" + _NAME + r":\s*" + _TYPE + r"(?:\s*=\s*\[(.*)\])?$")
_NODE = re.compile(r"^(.*?)\s*=\s*([A-Za-z_][A-Za-z0-9_]*)\((.*?)\)\s*\{")


def _parse_type(dtype: str, dims: str, line_no: int,
                sizes: Mapping[str, tuple[int, int]] | None = None) -> TensorType:
    try:
        return TensorType(tuple(int(d) if d.strip().isdigit() else parse_dim(d, sizes or {})
                                for d in dims.split(",") if d.strip()), DType(dtype))
    except (ValueError, KilnError) as e:
        msg = e.message if isinstance(e, KilnError) else str(e)
        raise ParseError(f"line {line_no}: bad type {dtype}[{dims}]: {msg}") from None


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets or strings."""
    parts, depth, cur, in_str, esc = [], 0, [], False, False
    for c in text:
        if in_str:
            cur.append(c)
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
            continue
        if c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _match_brace(text: str, start: int) -> int:
    """Index of the '}' closing the '{' at ``start``, skipping strings."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _parse_attrs(text: str, line_no: int, sizes: Mapping[str, tuple[int, int]]) -> dict:
    def size(obj: dict):
        if set(obj) == {"size"}:
            return parse_dim(obj["size"], sizes)
        return obj

    attrs = {}
    for part in _split_top(text):
        key, sep, val = part.partition("=")
        if not sep:
            raise ParseError(f"line {line_no}: attribute {part!r} has no '='")
        try:
            attrs[key.strip()] = json.loads(val, object_hook=size)
        except json.JSONDecodeError as e:
            raise ParseError(
                f"line {line_no}: bad value for attribute {key.strip()}: {e}") from None
        except KilnError as e:
            raise ParseError(f"line {line_no}: bad size in attribute {key.strip()}: "
                             f"{e.message}") from None
    return attrs


def parse_graph(text: str, constants: Mapping[str, np.ndarray] | None = None) -> Graph:
    """Parse the text form back into a Graph.

    Constants whose values are not inline are taken from ``constants`` (by name); a missing
    one is a ParseError.
    """
    constants = constants or {}
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(i, ln) for i, ln in lines if ln and not ln.startswith("//")]
    if not lines:
        raise ParseError("empty graph text")
    line_no, header = lines[0]
    m = _HEADER.match(header)
    if not m:
        raise ParseError(f"line {line_no}: expected 'graph NAME(%in: type, ...) -> (...) {{'")
    g = Graph(m.group(1))
    # The sizes come first: the header's types may use them.
    for size_line, ln in lines[1:]:
        if ln.startswith("size "):
            sm = _SIZE.match(ln)
            if not sm or sm.group(1) in g.sizes:
                raise ParseError(f"line {size_line}: bad size {ln!r}",
                                 hint="one line per size: 'size NAME in LO..HI'")
            lo, hi = int(sm.group(2)), int(sm.group(3))
            if not 1 <= lo <= hi:
                raise ParseError(f"line {size_line}: size {sm.group(1)} has bounds {lo}..{hi}")
            g.sizes[sm.group(1)] = (lo, hi)
    for part in _split_top(m.group(2)):
        tm = _TYPED.fullmatch(part)
        if not tm:
            raise ParseError(f"line {line_no}: bad graph input {part!r}")
        g.inputs.append(tm.group(1))
        g.types[tm.group(1)] = _parse_type(tm.group(2), tm.group(3), line_no, g.sizes)
    declared_outputs = [p.strip().lstrip("%") for p in _split_top(m.group(3))]
    returned = None
    for line_no, ln in lines[1:]:
        if ln == "}":
            break
        if ln.startswith("return"):
            returned = [p.strip().lstrip("%") for p in _split_top(ln[len("return"):])]
            continue
        if ln.startswith("const "):
            _parse_const(g, ln, line_no, constants)
            continue
        if ln.startswith("size "):
            continue
        g.nodes.append(_parse_node(g, ln, line_no))
    else:
        raise ParseError("graph text has no closing '}'")
    if returned is None:
        raise ParseError("graph text has no 'return' line")
    if returned != declared_outputs:
        raise ParseError(f"return {returned} does not match the header's outputs "
                         f"{declared_outputs}")
    g.outputs = returned
    return g


def _parse_const(g: Graph, ln: str, line_no: int, constants: Mapping[str, np.ndarray]) -> None:
    cm = _CONST.match(ln)
    if not cm:
        raise ParseError(f"line {line_no}: bad constant {ln!r}")
    name = cm.group(1)
    t = _parse_type(cm.group(2), cm.group(3), line_no)
    if cm.group(4) is not None:
        try:
            values = json.loads("[" + cm.group(4) + "]")
            arr = np.array(values, dtype=t.dtype.numpy).reshape(t.shape)
        except (json.JSONDecodeError, ValueError) as e:
            raise ParseError(f"line {line_no}: bad values for constant %{name}: {e}") from None
    elif name in constants:
        arr = np.asarray(constants[name])
        if TensorType.of(arr) != t:
            raise ParseError(f"line {line_no}: constant %{name} is {TensorType.of(arr)}, "
                             f"text says {t}")
    else:
        raise ParseError(f"line {line_no}: no values for constant %{name}",
                         hint="pass the weights as parse_graph(text, constants=...)")
    arr = np.array(arr, order="C", copy=True)
    arr.setflags(write=False)
    g.constants[name] = arr
    g.types[name] = t


def _parse_node(g: Graph, ln: str, line_no: int) -> Node:
    m = _NODE.match(ln)
    if not m:
        raise ParseError(f"line {line_no}: expected '%out: type = op(%in, ...) {{attrs}}'")
    outs = []
    for part in _split_top(m.group(1)):
        tm = _TYPED.fullmatch(part)
        if not tm:
            raise ParseError(f"line {line_no}: bad output {part!r}")
        outs.append(tm.group(1))
        g.types[tm.group(1)] = _parse_type(tm.group(2), tm.group(3), line_no, g.sizes)
    ins = []
    for part in _split_top(m.group(3)):
        if not re.fullmatch(_NAME, part):
            raise ParseError(f"line {line_no}: bad operand {part!r}")
        ins.append(part[1:])
    brace = m.end() - 1
    close = _match_brace(ln, brace)
    if close < 0:
        raise ParseError(f"line {line_no}: unclosed attribute braces")
    attrs = _parse_attrs(ln[brace + 1:close], line_no, g.sizes)
    rest = ln[close + 1:].strip()
    source = None
    if rest:
        if not rest.startswith("#"):
            raise ParseError(f"line {line_no}: unexpected text after attributes: {rest!r}")
        source = rest[1:].strip()
    return Node(m.group(2), tuple(ins), tuple(outs), attrs, source)
