"""Export a masked-LM model to ONNX and check it against PyTorch.

The export is a folder: `model.onnx` (+ `model.onnx.data` for weights over 1 GB), the
model's `config.json` and its tokenizer files, `parity.json`: the layout Optimum's
`ORTModelForMaskedLM.from_pretrained(folder)` loads, and what onnxruntime +
`AutoTokenizer`/`AutoConfig` need. The ONNX graph takes `input_ids` and
`attention_mask` (int64, [batch, sequence], both axes dynamic, sequence at most the
model's positions) and returns `logits` [batch, sequence, vocab]. The parity check runs
both on real sequences (the validation split of a dataset, or the model's own tokenizer
on sample text) and reports the largest absolute logit difference and how often the
top-1 token at the masked positions agrees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ATOL = 1e-3  # float32 on CPU: differences come from kernel order, far below this


class ExportError(ValueError):
    pass


def _wrapper(net):
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, mlm):
            super().__init__()
            self.mlm = mlm

        def forward(self, input_ids, attention_mask):
            return self.mlm(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits(net).eval()


def _parity_batches(data_dir: str | None, tokenizer, batch_size: int, max_batches: int):
    """(input_ids, attention_mask, labels) int64 arrays for the check."""
    from mlm import shards

    if data_dir:
        files = shards.checked_shards(data_dir, "validation")
        for batch in shards.read_batches(shards.plan_batches(files, batch_size)[:max_batches]):
            ids, labels = shards.column_2d(batch, "input_ids"), shards.column_2d(batch, "labels")
            n = np.asarray(batch.column("num_tokens"))
            mask = (np.arange(ids.shape[1])[None, :] < n[:, None]).astype(np.int64)
            yield ids.astype(np.int64), mask, labels.astype(np.int64)
        return
    texts = [f"the {tokenizer.mask_token} statement number {i} returns a value." for i in range(batch_size)]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    yield ids, enc["attention_mask"].astype(np.int64), np.where(ids == tokenizer.mask_token_id, 1, -100)


ONNX_FILE = "model.onnx"


def export_onnx(model: str, out: str | Path, data_dir: str | None = None, batch_size: int = 16,
                max_batches: int = 8, opset: int = 18) -> dict[str, Any]:
    """Write the folder `out` (a path or an object-store URI; new or empty, else
    ExportError): `model.onnx`, `config.json`, the tokenizer, `parity.json`. Built in a
    local temporary folder and committed only after the parity check, config.json last
    (`storage.put_dir`). Returns the parity report. Raises ExportError when the outputs
    disagree beyond ATOL. A model over EXTERNAL_DATA_BYTES keeps its weights in
    `model.onnx.data` beside it (ONNX files are limited to 2 GB)."""
    import tempfile

    from mlm import storage
    from mlm.model import load_model_dir

    if storage.is_file(out) or storage.list_names(out):
        raise ExportError(f"{storage.normalize(out)} exists and is not an empty folder: give a new folder for the export")
    net, tokenizer = load_model_dir(model)  # the tokenizer's model_max_length: the model's positions
    with tempfile.TemporaryDirectory(prefix="mlm-onnx-") as scratch:
        folder = Path(scratch) / "onnx"
        folder.mkdir()
        net.config.save_pretrained(folder)  # before the export switches attention to eager
        tokenizer.save_pretrained(folder)
        report = _export_checked(net, tokenizer, folder / ONNX_FILE, data_dir, (batch_size, max_batches), opset)
        report["onnx"] = storage.join(out, ONNX_FILE)
        (folder / "parity.json").write_text(json.dumps(report, indent=2))
        storage.put_dir(folder, out, marker="config.json", move=True)
    return report


EXTERNAL_DATA_BYTES = 1 << 30


def _export(wrapper, net, path: Path, opset: int) -> None:
    """torch.onnx's exporter (torch.export based), batch and sequence axes dynamic. The
    example batch has a padded row: an all-ones attention mask would let the trace drop
    the masking (transformers skips an all-ones mask)."""
    import torch
    from torch.export import Dim

    ids = torch.ones((2, 16), dtype=torch.int64)
    mask = ids.clone()
    mask[1, 10:] = 0
    batch, sequence = Dim("batch"), Dim("sequence", max=int(net.config.max_position_embeddings))
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    torch.onnx.export(
        wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
        opset_version=opset, external_data=weights > EXTERNAL_DATA_BYTES, verbose=False,
    )


def _export_checked(net, tokenizer, path: Path, data_dir, batches: tuple[int, int], opset: int) -> dict[str, Any]:
    """Export `net` to `path`, then the parity check; `batches`: (batch size, most batches)."""
    import onnxruntime as ort

    net.set_attn_implementation("eager")  # plain matmuls: portable ONNX ops
    wrapper = _wrapper(net)
    _export(wrapper, net, path, opset)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report = _parity(wrapper, session, _parity_batches(data_dir, tokenizer, *batches))
    report = {"onnx": None, "opset": opset, **report, "atol": ATOL, "data": str(data_dir) if data_dir else "sample text"}
    if report["max_abs_logit_diff"] > ATOL or report["top1_agreement"] != 1.0:
        raise ExportError(f"ONNX output differs from PyTorch: max |logit diff| {report['max_abs_logit_diff']:.2e} "
                          f"(atol {ATOL}), top-1 agreement {report['top1_agreement']:.4f}")
    return report


def _parity(wrapper, session, batches) -> dict[str, Any]:
    """Largest logit difference at real positions, top-1 agreement at masked ones."""
    import torch

    worst, agree, total, rows = 0.0, 0, 0, 0
    with torch.inference_mode():
        for ids, mask, labels in batches:
            expected = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
            got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
            real = mask.astype(bool)
            worst = max(worst, float(np.abs(expected[real] - got[real]).max()))
            at = labels != -100
            agree += int((expected[at].argmax(-1) == got[at].argmax(-1)).sum())
            total += int(at.sum())
            rows += len(ids)
    return {"rows": rows, "masked_positions": total, "max_abs_logit_diff": worst, "top1_agreement": agree / total if total else 1.0}
