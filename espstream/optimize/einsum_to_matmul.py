"""Rewrite an Einsum that is a (batched) matrix product as MatMul, with Transposes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from espstream.graph import attr


def parse_matmul_equation(equation: str) -> tuple[str, str, str] | None:
    """(a, b, out) letters of an explicit two-operand equation without ellipsis, or None."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or not all(t.isalpha() for t in terms) or not (out.isalpha() or not out):
        return None
    a, b = terms
    if any(len(set(t)) != len(t) for t in (a, b, out)):
        return None  # a repeated letter takes a diagonal
    return a, b, out


def matmul_plan(a: str, b: str, out: str) -> tuple[list[int], list[int], list[int]] | None:
    """Permutations (of a, of b, of the MatMul's result) that make `a,b->out` the MatMul
    [extra..., batch..., m, k] x [batch..., k, n] -> [extra..., batch..., m, n] (or the extra
    letters on b's side); None when it is not one."""
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or any(c not in a and c not in b for c in out):
        return None
    if any(c not in out and c not in contracted for c in a + b):
        return None  # a letter summed inside one operand
    k = contracted[0]
    batch = [c for c in out if c in a and c in b]
    ms = [c for c in out if c in a and c not in b]
    ns = [c for c in out if c in b and c not in a]
    if not ms or not ns or (len(ms) > 1 and len(ns) > 1):
        return None
    # extra letters of one operand lead it; MatMul broadcasts the other over them
    (*xa, m), (*xb, n) = ms, ns
    perm_a = [a.index(c) for c in xa + batch + [m, k]]
    perm_b = [b.index(c) for c in xb + batch + [k, n]]
    result = "".join(xa + xb + batch + [m, n])
    perm_out = [result.index(c) for c in out]
    return perm_a, perm_b, perm_out


def _transpose(graph: gs.Graph, x: gs.Tensor, perm: list[int], name: str) -> gs.Tensor:
    if perm == sorted(perm):
        return x
    y = gs.Variable(name, dtype=x.dtype)
    graph.nodes.append(gs.Node("Transpose", name, attrs={"perm": perm}, inputs=[x], outputs=[y]))
    return y


def einsum_to_matmul(graph: gs.Graph) -> bool:
    """Turn `Einsum(a, b)` into `Transpose? -> MatMul -> Transpose?` where it is a matmul.

    Rules:
    1. The equation is explicit (`->`), has two operands, no ellipsis and no letter twice in
       one term.
    2. Exactly one letter k is summed, and it appears in both operands; the other letters
       are in the output: batch letters (in both operands), letters only in the first and
       letters only in the second, at least one of each and more than one on one side at
       most. Of the one-side letters the last in the output's order is m (first operand) or
       n (second); the others are extra letters. Both operands' types are floats.
    3. The first operand is transposed to [extra..., batch..., m, k], the second to
       [extra..., batch..., k, n] (only one of them has extra letters; letters in the
       output's order; a Transpose that keeps the order is not written); a MatMul computes
       [extra..., batch..., m, n] (broadcasting the operand without the extra axes over them)
       and a Transpose puts the result in the output's order, writing the Einsum's output.
    4. Anything else (a vector operand, two summed letters, a trace) is left as it is.
    """
    changed = False
    for node in [n for n in graph.nodes if n.op == "Einsum" and len(n.inputs) == 2]:
        eq = attr(node, "equation", "")
        eq = eq.decode() if isinstance(eq, bytes) else str(eq)
        parsed = parse_matmul_equation(eq)
        plan = matmul_plan(*parsed) if parsed else None
        x, w = node.inputs
        if plan is None or any(t.dtype is None or not np.issubdtype(np.dtype(t.dtype), np.floating)
                               for t in (x, w)):
            continue
        perm_a, perm_b, perm_out = plan
        base = node.name or node.outputs[0].name
        out = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        xa = _transpose(graph, x, perm_a, f"{base}.lhs_t")
        wb = _transpose(graph, w, perm_b, f"{base}.rhs_t")
        if perm_out == sorted(perm_out):
            graph.nodes.append(gs.Node("MatMul", f"{base}.matmul", inputs=[xa, wb], outputs=[out]))
        else:
            mm = gs.Variable(f"{base}.product", dtype=out.dtype)
            graph.nodes.append(gs.Node("MatMul", f"{base}.matmul", inputs=[xa, wb], outputs=[mm]))
            graph.nodes.append(gs.Node("Transpose", f"{base}.out_t", attrs={"perm": perm_out},
                                       inputs=[mm], outputs=[out]))
        changed = True
    if changed:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return changed
