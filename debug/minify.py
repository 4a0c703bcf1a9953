"""``kiln minify``: shrink a graph that a pipeline breaks to a small graph it still breaks.

A failure is a pass that raises (verifier errors included) or a pipeline result whose outputs
differ from the unoptimized graph's on seeded random inputs. Minifying is greedy delta
debugging over two reductions, repeated until neither shrinks the graph further:

* make one value the single graph output, dropping everything it does not need;
* cut the graph above a node: its outputs become graph inputs and its producers go.

A candidate is kept only when it fails the same way (same exception type in the same pass, or
again a mismatch). ``write_repro`` saves the result as IR text, an ``.npz`` of its constants and
a ``repro.py`` that replays the failure.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.backends.reference import run_graph
from kiln.debug.bisect import combined_budget, max_violation
from kiln.ir import DType, Graph, KilnError, print_graph
from kiln.passes import Instrument, Pass, PassManager, Verify, get_pass
from kiln.passes.dce import remove_dead

MISMATCH = "mismatch"


@dataclass(frozen=True)
class Failure:
    """How a pipeline fails on a graph: ``kind`` is ``"mismatch"`` or
    ``"<ExceptionType> in <pass>"``; ``message`` says the details."""

    kind: str
    message: str


def random_inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs for ``graph``: standard normal floats, 0/1 integers (valid indices for
    any embedding) and random booleans."""
    rng = np.random.default_rng(seed)
    arrays = []
    for name in graph.inputs:
        t = graph.type_of(name)
        if t.dtype.is_float:
            arrays.append(rng.standard_normal(t.shape).astype(t.dtype.numpy))
        elif t.dtype == DType.bool:
            arrays.append(rng.random(t.shape) < 0.5)
        else:
            arrays.append(rng.integers(0, 2, t.shape).astype(t.dtype.numpy))
    return arrays


class _CurrentPass(Instrument):
    """Remembers the name of the running pass so a crash can be attributed to it."""

    def __init__(self) -> None:
        self.name: str | None = None

    def before_pass(self, pass_: Pass, graph: Graph, index: int) -> None:
        """Note the pass about to run."""
        self.name = pass_.name


def check_failure(graph: Graph, passes: Sequence[Pass | str], seed: int = 0) -> Failure | None:
    """How ``passes`` fail on ``graph``, or None when they succeed and the result matches
    the unoptimized graph on ``random_inputs(graph, seed)`` within the pipeline's tolerance.

    Raises whatever running the unoptimized graph raises: such a graph shows no pass failure.
    """
    pass_list = [get_pass(p) if isinstance(p, str) else p for p in passes]
    inputs = random_inputs(graph, seed)
    expected = run_graph(graph, inputs)
    current = _CurrentPass()
    try:
        optimized = PassManager(pass_list, [Verify(), current]).run(graph)
        actual = run_graph(optimized, inputs)
    except Exception as e:  # any crash of a pass, or of running its result, is the failure
        where = current.name if current.name is not None else "the input graph"
        return Failure(f"{type(e).__name__} in {where}", f"{type(e).__name__}: {e}")
    diff, ok = max_violation(expected, actual, combined_budget(pass_list))
    if ok:
        return None
    return Failure(MISMATCH, f"outputs differ from the unoptimized graph by up to {diff:.3g}")


def with_output(graph: Graph, value: str) -> Graph:
    """``graph`` with ``value`` as its single output and everything it does not need gone."""
    out = graph.copy()
    out.outputs = [value]
    return _drop_unused_inputs(remove_dead(out))


def cut_above(graph: Graph, node_name: str) -> Graph:
    """``graph`` with the outputs of node ``node_name`` turned into graph inputs of the same
    type; the node and whatever only it needed are dropped."""
    out = graph.copy()
    node = next(n for n in graph.nodes if n.name == node_name)
    out.nodes = [n for n in graph.nodes if n is not node]
    out.inputs = graph.inputs + list(node.outputs)
    return _drop_unused_inputs(remove_dead(out))


def _drop_unused_inputs(graph: Graph) -> Graph:
    read = {i for n in graph.nodes for i in n.inputs} | set(graph.outputs)
    unused = [i for i in graph.inputs if i not in read]
    if unused:
        graph.inputs = [i for i in graph.inputs if i in read]
        for name in unused:
            del graph.types[name]
    return graph


Predicate = Callable[[Graph], bool]


def failure_predicate(graph: Graph, passes: Sequence[Pass | str], seed: int = 0
                      ) -> tuple[Predicate, Failure]:
    """The predicate "``passes`` fail on a candidate the way they fail on ``graph``" and that
    failure; KilnError when they do not fail on ``graph``."""
    original = check_failure(graph, passes, seed)
    if original is None:
        raise KilnError("the passes do not fail on this graph: it compiles and matches the "
                        "unoptimized graph", hint="nothing to minify")

    def still_fails(candidate: Graph) -> bool:
        try:
            failure = check_failure(candidate, passes, seed)
        except Exception:  # the candidate itself cannot run: not the failure we look for
            return False
        return failure is not None and failure.kind == original.kind

    return still_fails, original


def kernel_failure_predicate(graph: Graph, seed: int = 0, target=None
                             ) -> tuple[Predicate, str]:
    """The predicate "the llvm pipeline makes a wrong kernel at the same stage (or crashes
    the same way) on a candidate as on ``graph``" and that stage; KilnError when every kernel
    of ``graph`` matches the reference."""
    from kiln.debug.kernels import kernel_failure

    original = kernel_failure(graph, random_inputs(graph, seed), target)
    if original is None:
        raise KilnError("every kernel the llvm backend makes for this graph matches the "
                        "reference", hint="nothing to minify")

    def still_fails(candidate: Graph) -> bool:
        try:
            return kernel_failure(candidate, random_inputs(candidate, seed), target) == original
        except Exception:  # the candidate itself cannot run: not the failure we look for
            return False

    return still_fails, original


def minify(graph: Graph, passes: Sequence[Pass | str] = (), *,
           predicate: Predicate | None = None, seed: int = 0) -> Graph:
    """A small subgraph of ``graph`` on which ``predicate`` still holds.

    Without ``predicate``, the failure is how ``passes`` fail on ``graph`` (see
    ``check_failure``; inputs are ``random_inputs(candidate, seed)``); KilnError if they do
    not fail. The result has only graph inputs, constants and nodes of ``graph``.
    """
    if predicate is None:
        predicate, _ = failure_predicate(graph, passes, seed)
    elif not predicate(graph):
        raise KilnError("the predicate does not hold on the graph to minify")
    shrunk = True
    while shrunk:
        shrunk = False
        # Earliest value first: the first one that still fails leaves the smallest graph.
        for name in [o for n in graph.nodes for o in n.outputs]:
            if graph.outputs == [name]:
                break
            candidate = with_output(graph, name)
            if predicate(candidate):
                graph, shrunk = candidate, True
                break
        for name in [n.name for n in graph.nodes]:
            if len(graph.nodes) > 1 and any(n.name == name for n in graph.nodes):
                candidate = cut_above(graph, name)
                if candidate.nodes and predicate(candidate):
                    graph, shrunk = candidate, True
    return graph


def _pass_recipe(pass_: Pass) -> str:
    """Python source that rebuilds ``pass_`` in the repro script: by registered name for
    kiln's own passes, by loading the defining file for a pass defined elsewhere."""
    cls = type(pass_)
    if cls.__module__.startswith("kiln."):
        return f"get_pass({pass_.name!r})"
    return f"load_pass({inspect.getfile(cls)!r}, {cls.__qualname__!r})"


REPRO_TEMPLATE = '''\
"""Replays a kiln pass failure found by `kiln minify`: {failure}

Run it with `python repro.py`: it exits 1 while the failure is still there, 0 once it is fixed.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np

from kiln.debug.minify import check_failure
from kiln.ir import parse_graph
from kiln.passes import get_pass

SEED = {seed}
HERE = Path(__file__).resolve().parent


def load_pass(path, class_name):
    """A pass defined outside kiln: import its file and instantiate the class."""
    spec = importlib.util.spec_from_file_location("kiln_repro_passes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)()


def main():
    with np.load(HERE / "constants.npz", allow_pickle=False) as data:
        constants = {{name[2:]: data[name] for name in data.files}}
    graph = parse_graph((HERE / "minified.txt").read_text(), constants)
    passes = [{passes}]
    failure = check_failure(graph, passes, SEED)
    if failure is None:
        print("no failure: the passes run and match the unoptimized graph")
        return 0
    print(f"still fails ({{failure.kind}}): {{failure.message}}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
'''


def write_repro(graph: Graph, passes: Sequence[Pass | str], directory: str | Path,
                seed: int = 0) -> Path:
    """Write ``minified.txt``, ``constants.npz`` and ``repro.py`` for ``graph`` into
    ``directory`` (created if needed); returns the path of ``repro.py``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pass_list = [get_pass(p) if isinstance(p, str) else p for p in passes]
    failure = check_failure(graph, pass_list, seed)
    (directory / "minified.txt").write_text(print_graph(graph))
    # Keys get a prefix so no constant name can clash with np.savez's own parameter names.
    np.savez(directory / "constants.npz", **{f"c:{k}": v for k, v in graph.constants.items()})
    script = REPRO_TEMPLATE.format(
        failure=failure.message if failure else "none (the graph did not fail when written)",
        seed=seed, passes=", ".join(_pass_recipe(p) for p in pass_list))
    path = directory / "repro.py"
    path.write_text(script)
    return path


__all__ = ["Failure", "check_failure", "cut_above", "failure_predicate", "minify",
           "random_inputs", "with_output", "write_repro"]
