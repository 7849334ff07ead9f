"""Graph rewrite: store a tied embedding matrix once.

Tracing a model whose LM head shares the embedding leaves two initializers: E (vocab, hidden) for the embedding
Gather and its transpose E^T (hidden, vocab) for the LM head MatMul (the exporter folds the transpose). For
smollm2-135m that is 113 MB twice. The rewrite keeps only E^T, which the MatMul reads at full speed every token,
and makes the embedding a Gather along axis 1 of E^T followed by a Transpose of the (small) activations.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def share_tied_embedding(model: onnx.ModelProto) -> bool:
    """Rewrite `model` in place; True when a duplicated embedding was found and removed."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and n.input[1] == "input_ids"), None)
    head = next((n for n in graph.node if n.op_type == "MatMul" and n.output[0] == "logits"
                 and n.input[1] in inits), None)
    if gather is None or head is None:
        return False
    embedding = numpy_helper.to_array(inits[gather.input[0]])  # (vocab, hidden)
    head_weight = numpy_helper.to_array(inits[head.input[1]])  # (hidden, vocab)
    if embedding.shape[::-1] != head_weight.shape or not np.array_equal(embedding.T, head_weight):
        return False
    columns = gather.output[0] + "/columns"
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(index, helper.make_node("Gather", [head.input[1], "input_ids"], [columns], axis=1,
                                              name=(gather.name or "/embed_tokens/Gather") + "_tied"))
    graph.node.insert(index + 1, helper.make_node("Transpose", [columns], [gather.output[0]], perm=[1, 2, 0],
                                                  name=(gather.name or "/embed_tokens/Gather") + "_tied/Transpose"))
    if not any(gather.input[0] in n.input for n in graph.node):
        graph.initializer.remove(inits[gather.input[0]])
    return True
