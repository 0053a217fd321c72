"""Vocabulary trimming of an INT8 ONNX graph (`quantize --trim-vocab`; docs/architecture.md, "Quantization").

The word-embedding table is about half of all-MiniLM-L6-v2's weights (30,522 rows, most never seen by a task).
Trimming keeps the rows of the token ids that occur in the tune run's *training* data (plus the tokenizer's
special tokens) and puts a small id map in front of the embedding Gather: a token id outside the kept set maps
to [UNK]'s row. The tokenizer and the graph inputs are unchanged. Eval text is never used to choose the rows,
so the eval accuracy after trimming includes the cost of tokens the training data never had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from instatune_cli import data as D
from instatune_cli.errors import InstatuneError

MAP_NAME = "instatune_vocab_map"


def training_token_ids(tune: Any, tokenizer: Any) -> tuple[list[int], str]:
    """Sorted token ids of the tune run's training texts at its max length, plus special tokens; and where from."""
    o = tune.options
    if not o.get("data") and not o.get("task"):
        raise InstatuneError(f"tune run {tune.path} records no training data; --trim-vocab needs it")
    try:
        td = D.load_task_data(o.get("task"), o.get("data"), o.get("eval_data"), o.get("text_column"),
                              o.get("text_pair_column"), o.get("label_column"), o.get("limit_train"))
    except InstatuneError as e:
        raise InstatuneError(f"--trim-vocab reads the tune run's training data, which failed: {e}") from None
    enc = D.tokenize(tokenizer, td.train, int(tune.model.get("max_length", 128)))
    ids: set[int] = set(int(i) for i in tokenizer.all_special_ids)
    for row in enc.input_ids:
        ids.update(int(i) for i in row)
    return sorted(ids), str(td.source.get("train", o.get("data") or o.get("task")))


def trim_vocabulary(onnx_path: str | Path, gather_node: str, keep: list[int], unk_id: int) -> dict[str, Any]:
    """Rewrite `onnx_path` in place: the table feeding `gather_node` keeps rows `keep`, ids go through a map."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(onnx_path))
    g = m.graph
    node = next((n for n in g.node if n.name == gather_node), None)
    if node is None:
        raise InstatuneError(f"no node {gather_node} in {onnx_path}; cannot trim the vocabulary")
    table_name = _table_initializer(g, node.input[0])
    # an INT4 table (GatherBlockQuantized) has one scale per block of each row: its rows are trimmed alike
    row_tensors = [table_name, node.input[2]] if node.op_type == "GatherBlockQuantized" else [table_name]
    init = next(i for i in g.initializer if i.name == table_name)
    table = numpy_helper.to_array(init)
    vocab = table.shape[0]
    if unk_id not in keep:
        keep = sorted({*keep, unk_id})
    mapping = np.full(vocab, keep.index(unk_id), dtype=np.int64)
    mapping[np.asarray(keep)] = np.arange(len(keep))
    for name in row_tensors:
        t = next(i for i in g.initializer if i.name == name)
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[np.asarray(keep)], name))
    ids_in = node.input[1]
    g.initializer.append(numpy_helper.from_array(mapping.astype(np.int32), MAP_NAME))
    remapped = MAP_NAME + "_ids"
    g.node.insert(list(g.node).index(node), helper.make_node("Gather", [MAP_NAME, ids_in], [remapped],
                                                             name=MAP_NAME + "_gather", axis=0))
    node.input[1] = remapped
    onnx.save(m, str(onnx_path))
    return {"kept": len(keep), "of": int(vocab), "unk_id": int(unk_id), "table": table_name,
            "map_bytes": int(mapping.astype(np.int32).nbytes)}


def _table_initializer(graph: Any, name: str) -> str:
    """The initializer behind a Gather's data input: itself, or the 8-bit table its DequantizeLinear reads."""
    inits = {i.name for i in graph.initializer}
    if name in inits:
        return name
    dq = next((n for n in graph.node if name in n.output and n.op_type == "DequantizeLinear"), None)
    if dq is not None and dq.input[0] in inits:
        for s in dq.input[1:]:  # a per-row scale would have to be trimmed too; ours is per tensor
            sc = next((i for i in graph.initializer if i.name == s), None)
            if sc is not None and len(sc.dims) > 0 and sc.dims[0] > 1:
                raise InstatuneError("the embedding table is quantized per row; cannot trim it")
        return dq.input[0]
    raise InstatuneError(f"cannot find the embedding table behind {name}")
