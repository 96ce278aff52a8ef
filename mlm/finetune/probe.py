"""The built-in probe: does pretraining make the encoder better for a downstream task?

`probe(model)` fine-tunes, with one budget (the `finetune` config), the encoder and a
same-shape twin with random weights on `builtin:stdlib-topics` (standard-library
docstrings labelled by their package, the package's name taken out of the text; a fixed
split by text hash) and reports both macro-F1s on the test split and their difference.
Both run in this process (`finetune.train.train_classifier`: the fine-tuning loop's own
steps, no Ray Train start-up), on a GPU when there is one.
"""

from __future__ import annotations

from typing import Any

from mlm.config import Config
from mlm.finetune.data import PROBE, probe_split


def random_twin(model):
    """The same architecture and shape, every weight drawn anew (the model's own init)."""
    import torch

    torch.manual_seed(0)
    return type(model)(model.config)


def probe(model_ref: str, cfg: Config, use_gpu="auto") -> dict[str, Any]:
    """macro-F1 and accuracy of the encoder and of its random-init twin after the same
    fine-tuning on the probe task; `gain` = pretrained - random-init macro-F1."""
    from mlm.compute import inference_device
    from mlm.finetune.train import train_classifier

    train, test = probe_split(f"{PROBE}:train"), probe_split(f"{PROBE}:test")
    device = inference_device(use_gpu)
    runs = {"pretrained": train_classifier(model_ref, train, test, cfg, device),
            "random_init": train_classifier(model_ref, train, test, cfg, device, init=random_twin)}
    out: dict[str, Any] = {"task": PROBE, "classes": len(set(train.labels)), "train_rows": len(train),
                           "test_rows": len(test), "epochs": cfg.finetune.epochs,
                           "learning_rate": cfg.finetune.learning_rate}
    for who, r in runs.items():
        m = r["metrics"]
        out[who] = {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"], "seconds": round(r["seconds"], 1)}
    out["gain"] = out["pretrained"]["macro_f1"] - out["random_init"]["macro_f1"]
    return out


def probe_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The probe as evaluation metrics (then version tags `eval.probe_*` and card rows)."""
    return {"probe_macro_f1": result["pretrained"]["macro_f1"], "probe_accuracy": result["pretrained"]["accuracy"],
            "probe_random_init_macro_f1": result["random_init"]["macro_f1"], "probe_gain": result["gain"]}
