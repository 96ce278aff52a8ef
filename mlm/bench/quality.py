"""`mlm bench quality`: masked-LM accuracy at equal tokens next to the Hugging Face
Trainer, on one fixed held-out set scored by one scorer.

Read `bench_quality` top to bottom:
1. `mlm prepare` the corpus (its tokenizer, its train/validation split by document hash);
2. the held-out set: the documents `prepare` put in validation, in two layouts (run_mlm's
   `group_texts`, and one document window per row: [CLS] text [SEP] [PAD]...), masked
   once by HF's `DataCollatorForLanguageModeling` at 15% with the evaluation seed;
3. ours: the training loop's own pieces in this process (`mlm.train.train_in_process`:
   data stream, schedule, optimizer, `train_step`), one worker;
4. HF: run_mlm's recipe: the same training documents tokenized and grouped as
   run_mlm.py does, `DataCollatorForLanguageModeling` (15%, 80/10/10), `Trainer` with its
   defaults (AdamW betas (0.9, 0.999), eps 1e-8, no weight decay, clipping at 1.0,
   linear decay), the same model (mlm.model.build_model, same seed), tokenizer, batch,
   learning rate, warmup and steps: equal tokens;
5. both scored by `score_rows` on the same rows; the ratios.
Wall times are training only (the data preparation of each side is not timed).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from mlm import shards
from mlm.bench.data import _group_texts, iter_documents
from mlm.config import Config

# Applied before the user's --set overrides (the model is the preset's: tiny by default,
# a 2-layer 128-wide BERT with a 4,096-token WordPiece). Issue 16's larger setting:
# --set tokenizer.vocab_size=8192 --set model.hidden_size=256 --set model.num_layers=4
# --set model.num_heads=4 --set model.intermediate_size=1024 --set model.dropout=0.1 --set train.learning_rate=0.001
DEFAULTS = (
    "data.seq_len=128", "data.validation_fraction=0.15",
    "train.num_workers=1", "train.use_gpu=false", "train.micro_batch_size=32", "train.global_batch_size=32",
    "train.validate_every=0",
)
WARMUP_SHARE = 0.06
LAYOUTS = ("grouped", "documents")


def bench_config(preset: str | None, overrides: tuple[str, ...] | list[str], steps: int) -> Config:
    from mlm.config import load_config

    warmup = f"train.warmup_steps={max(1, round(WARMUP_SHARE * steps))}"
    return load_config(preset, [*DEFAULTS, f"train.max_steps={steps}", warmup, *overrides])


# --------------------------------------------------------------------------- data


def split_documents(files: list[str], cfg: Config) -> dict[str, list[str]]:
    """The corpus' documents, cleaned and split by `mlm prepare`'s own rule (the hash of
    the cleaned text), in file order."""
    from mlm.corpus import clean_text, doc_hash, is_validation

    out: dict[str, list[str]] = {"train": [], "validation": []}
    for path in files:
        for raw in iter_documents(path, cfg.data.text_field):
            text = clean_text(raw)
            if len(text) >= cfg.data.min_doc_chars:
                out["validation" if is_validation(doc_hash(text), cfg.data.validation_fraction) else "train"].append(text)
    return out


def grouped_rows(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """run_mlm.py's layout: each text tokenized with [CLS]/[SEP], all concatenated, cut
    into seq_len blocks (the tail shorter than a block dropped)."""
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return _group_texts({"input_ids": encoded}, seq_len)["input_ids"]


def document_rows(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """One window of a document per row, as a user feeds a model: [CLS] up to
    seq_len - 2 tokens [SEP], padded; a long document gives several windows."""
    body, rows = seq_len - 2, []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        for i in range(0, len(ids), body):
            window = [tokenizer.cls_token_id, *ids[i : i + body], tokenizer.sep_token_id]
            rows.append(window + [tokenizer.pad_token_id] * (seq_len - len(window)))
    return rows


def heldout_set(tokenizer, texts: list[str], seq_len: int, rows: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per layout: the first `rows` rows, masked once by HF's collator at 15% (80/10/10)
    under `seed`: input_ids, attention_mask, labels tensors [n, seq_len]."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
    out = {}
    for layout, build in (("grouped", grouped_rows), ("documents", document_rows)):
        ids = build(tokenizer, texts, seq_len)[:rows]
        if not ids:
            raise shards.DatasetError("the held-out documents give no rows; raise data.validation_fraction")
        torch.manual_seed(seed)
        batch = collator([{"input_ids": r} for r in ids])
        out[layout] = {"input_ids": batch["input_ids"], "labels": batch["labels"],
                       "attention_mask": (torch.tensor(ids) != tokenizer.pad_token_id).long()}
    return out


def score_rows(model, rows: dict[str, Any], batch_size: int = 64) -> dict[str, float]:
    """The one scorer: mean cross-entropy and top-1 accuracy over the masked positions
    (`mlm.compute.masked_sums`, what evaluation sums too)."""
    import torch

    from mlm.compute import masked_sums

    model.eval()
    total = {"loss_sum": 0.0, "top1": 0, "top5": 0, "n": 0}
    with torch.inference_mode():
        for i in range(0, len(rows["input_ids"]), batch_size):
            part = {k: v[i : i + batch_size] for k, v in rows.items()}
            sums, _ = masked_sums(model, part["input_ids"], part["attention_mask"], part["labels"])
            total = {k: total[k] + sums[k] for k in total}
    n = max(1, total["n"])
    return {"loss": total["loss_sum"] / n, "top1_accuracy": total["top1"] / n, "top5_accuracy": total["top5"] / n,
            "masked_positions": total["n"], "rows": int(len(rows["input_ids"]))}


# --------------------------------------------------------------------------- the two contenders


def train_ours(data_dir: str, cfg: Config, tokenizer) -> tuple[Any, dict[str, float]]:
    from mlm.train import _loop_config, train_in_process

    manifest = shards.Manifest.read(data_dir)
    with tempfile.TemporaryDirectory(prefix="mlm-bench-quality-") as tmp:
        loop_config = _loop_config(data_dir, tmp, manifest, tokenizer, cfg, None)
        started = time.perf_counter()
        model, tokens = train_in_process(loop_config)
        seconds = time.perf_counter() - started
    return model, {"train_s": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}


def train_hf(texts: list[str], cfg: Config, tokenizer) -> tuple[Any, dict[str, float]]:
    """run_mlm.py's recipe on the training documents; HF's defaults where run_mlm keeps them."""
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from mlm.model import build_model

    tc, seq_len = cfg.train, cfg.data.seq_len
    rows = [{"input_ids": r} for r in grouped_rows(tokenizer, texts, seq_len)]
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
    with tempfile.TemporaryDirectory(prefix="mlm-bench-quality-hf-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=tc.global_batch_size, max_steps=tc.max_steps,
            learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, lr_scheduler_type="linear",
            logging_steps=10**9, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=True, seed=tc.seed,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    tokens = tc.max_steps * tc.global_batch_size * seq_len  # every grouped row is full
    return model, {"train_s": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}


# --------------------------------------------------------------------------- the benchmark


def bench_quality(inputs: list[str], cfg: Config, work: Path, heldout_rows: int = 512, skip_hf: bool = False,
                  echo=print) -> dict[str, Any]:
    from mlm.corpus import resolve_inputs
    from mlm.prepare import prepare
    from mlm.tokenizer import load_tokenizer

    files = [f.path for f in resolve_inputs(inputs, work)[0]]
    data_dir = str(Path(work) / "data")
    echo("bench quality: mlm prepare ...")
    manifest = prepare(inputs, data_dir, cfg, overwrite=True)
    tokenizer = load_tokenizer(Path(data_dir) / manifest.tokenizer.dir)
    docs = _checked_split(files, cfg, manifest)
    heldout = heldout_set(tokenizer, docs["validation"], cfg.data.seq_len, heldout_rows, cfg.eval.seed)
    results: dict[str, Any] = {}
    echo(f"bench quality: mlm, {cfg.train.max_steps} steps ...")
    model, results["mlm"] = train_ours(data_dir, cfg, tokenizer)
    results["mlm"]["heldout"] = {k: score_rows(model, rows) for k, rows in heldout.items()}
    if not skip_hf:
        echo(f"bench quality: HF Trainer, {cfg.train.max_steps} steps ...")
        model, results["hf_trainer"] = train_hf(docs["train"], cfg, tokenizer)
        results["hf_trainer"]["heldout"] = {k: score_rows(model, rows) for k, rows in heldout.items()}
    return _report(results, cfg, inputs, manifest, heldout)


def _checked_split(files: list[str], cfg: Config, manifest: shards.Manifest) -> dict[str, list[str]]:
    """The documents of each split; refuses to go on when they are not the ones
    `prepare` counted (then the two contenders would not learn from the same text)."""
    docs = split_documents(files, cfg)
    for split in ("train", "validation"):
        if len(docs[split]) != manifest.splits[split].documents:
            raise shards.DatasetError(f"{split}: {len(docs[split])} documents here, {manifest.splits[split].documents} "
                                      "in the prepared data (set data.dedup=false and use .txt/.jsonl inputs)")
    return docs


def _report(results: dict[str, Any], cfg: Config, inputs, manifest: shards.Manifest, heldout) -> dict[str, Any]:
    m, tc = cfg.model, cfg.train
    out = {
        "corpus": list(inputs),
        "train_documents": manifest.splits["train"].documents,
        "heldout_documents": manifest.splits["validation"].documents,
        "heldout_rows": {k: int(len(v["input_ids"])) for k, v in heldout.items()},
        "setting": f"{m.architecture} {m.num_layers}L/{m.hidden_size}H/{m.num_heads}A, vocab "
                   f"{manifest.tokenizer.vocab_size}, batch {tc.global_batch_size} x {cfg.data.seq_len}, lr "
                   f"{tc.learning_rate}, warmup {tc.warmup_steps}, {tc.max_steps} steps, seed {tc.seed}",
        "mlm_recipe": {"masking": manifest.masking["train"], "packing": manifest.packing,
                       "adam": [tc.adam_beta1, tc.adam_beta2, tc.adam_epsilon], "weight_decay": tc.weight_decay,
                       "grad_clip": tc.grad_clip, "schedule": tc.schedule},
        **results,
    }
    if "hf_trainer" in results:
        ours, hf = results["mlm"], results["hf_trainer"]
        out["ratios"] = {
            "tokens": ours["tokens"] / hf["tokens"],
            "tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"],
            **{f"top1_{k}": ours["heldout"][k]["top1_accuracy"] / max(hf["heldout"][k]["top1_accuracy"], 1e-12)
               for k in LAYOUTS},
        }
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [f"mlm bench quality: {r['setting']}",
             f"held-out: {r['heldout_documents']} documents ({r['train_documents']} for training), rows "
             + ", ".join(f"{k} {n}" for k, n in r["heldout_rows"].items()) + "; HF collator 15%, one scorer",
             f"  {'':<12}{'top-1 grouped':>14}{'loss':>8}{'top-1 docs':>12}{'loss':>8}{'train s':>9}{'tokens/s':>10}"]
    for who in ("mlm", "hf_trainer"):
        if who in r:
            x, h = r[who], r[who]["heldout"]
            lines.append(f"  {who:<12}{h['grouped']['top1_accuracy']:>14.4f}{h['grouped']['loss']:>8.3f}"
                         f"{h['documents']['top1_accuracy']:>12.4f}{h['documents']['loss']:>8.3f}"
                         f"{x['train_s']:>9.1f}{x['tokens_per_s']:>10,.0f}")
    if "ratios" in r:
        q = r["ratios"]
        lines.append(f"  mlm/HF: top-1 {q['top1_grouped']:.3f}x grouped, {q['top1_documents']:.3f}x documents; "
                     f"{q['tokens']:.3f}x tokens, {q['tokens_per_s']:.2f}x tokens/s")
    return "\n".join(lines)
