"""What a replica serves: one model version (a registry alias or version, a folder or an
object-store URI), loaded once, and the batched computations on it: fill-mask (the
prediction head at the [MASK] positions only), mean-pooled embeddings, classification."""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

TASKS = ("fill-mask", "embed", "classify")


class ServeError(ValueError):
    """A user mistake in what to serve or how: an unknown model, a task the model does not
    answer, an open bind without a token."""


class RequestError(ValueError):
    """A request the server refuses: `status` is the HTTP status (4xx), the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Source:
    """What a model reference names right now. `uri` is what gets loaded: for a registry
    alias the version it points at (models:/NAME/VERSION), so a moving alias never serves
    a stale copy."""

    ref: str
    uri: str
    name: str
    version: str | None = None
    alias: str | None = None
    data_fingerprint: str | None = None

    @property
    def follows(self) -> bool:
        """A registry alias: the server checks where it points and follows it."""
        return self.alias is not None


def resolve_source(ref: str) -> Source:
    """The version a reference names now (a registry lookup for models:/)."""
    if not ref.startswith("models:/"):
        from mlm.evaluate import load_results

        try:
            results = None if ref.startswith("runs:/") else load_results(ref)
        except (OSError, ValueError):  # StorageError, a broken eval_results.json: no fingerprint to show
            results = None
        fingerprint = (results or {}).get("data_fingerprint")
        return Source(ref, ref, ref, data_fingerprint=str(fingerprint) if fingerprint else None)
    from mlflow.exceptions import MlflowException

    from mlm.registry import _client
    from mlm.runtime import redact_uri, tracking_uri

    name, at, rest = ref.removeprefix("models:/").partition("@")
    alias = rest if at else None
    if not at:
        name, _, rest = name.rpartition("/")
    if not name or not rest:
        raise ServeError(f"bad model URI {ref!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    client = _client()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, rest)
    except MlflowException:
        raise ServeError(f"unknown model {ref!r} in {redact_uri(tracking_uri())}") from None
    version = str(mv.version)
    return Source(ref, f"models:/{name}/{version}", name, version, alias, mv.tags.get("data_fingerprint"))


def model_kind(config) -> str:
    """`classifier` (a fine-tuned sequence classifier) or `masked-lm`."""
    return "classifier" if any(a.endswith("ForSequenceClassification") for a in config.architectures or []) \
        else "masked-lm"


def tasks_of(kind: str) -> tuple[str, ...]:
    return ("classify", "embed") if kind == "classifier" else ("fill-mask", "embed")


@dataclass(eq=False)
class Loaded:
    """One model version in memory. Requests read the server's current `Loaded` once and
    use it to the end, so each is answered by exactly one version, also during a switch."""

    source: Source
    net: Any
    tokenizer: Any
    kind: str
    max_len: int
    labels: list[str] = field(default_factory=list)
    loaded_at: float = field(default_factory=time.time)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tasks_of(self.kind)

    def encode(self, text: str, task: str, max_tokens: int) -> list[int]:
        """Token ids as the model reads them. More than `max_tokens` (the request limit) is
        a 413; a text past the model's positions is cut to them ([CLS] ... [SEP], as
        `truncation=True`), except that a [MASK] there is a 422: it would not be seen."""
        ids = self.tokenizer(text, verbose=False)["input_ids"]  # verbose: no "longer than" warning
        if len(ids) > max_tokens:
            raise RequestError(413, f"{len(ids)} tokens; at most {max_tokens} per text (serve.max_text_tokens)")
        if task == "fill-mask":
            mask = self.tokenizer.mask_token
            at = [i for i, t in enumerate(ids) if t == self.tokenizer.mask_token_id]
            if not at:
                raise RequestError(422, f"no {mask} in the text")
            if at[-1] >= self.max_len - 1:
                raise RequestError(422, f"a {mask} is token {at[-1] + 1}; the model reads at most {self.max_len} "
                                        f"(masks past token {self.max_len - 1} cannot be predicted)")
        return ids if len(ids) <= self.max_len else ids[: self.max_len - 1] + ids[-1:]

    def run(self, task: str, rows: list[list[int]], top_k: list[int]) -> list[Any]:
        """One forward over `rows` (token ids, padded here) -> one answer per row."""
        import torch

        ids, attention = self._pad(rows)
        with torch.inference_mode():
            if task == "fill-mask":
                return self._fill_mask(ids, attention, top_k)
            if task == "embed":
                return self._embed(ids, attention)
            return self._classify(ids, attention)

    def _pad(self, rows: list[list[int]]):
        import numpy as np
        import torch

        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], attention[i, : len(r)] = r, 1
        device = next(self.net.parameters()).device
        return torch.from_numpy(ids).to(device), torch.from_numpy(attention).to(device)

    def _fill_mask(self, ids, attention, top_k: list[int]) -> list[dict[str, Any]]:
        """Per row `{"masks": [[{token, score}, ...] per [MASK]]}`, top-k each: the vocabulary
        head runs on the mask positions only."""
        import torch

        from mlm.compute import prediction_head

        hidden = self.net.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        at = ids == self.tokenizer.mask_token_id
        probs = torch.softmax(prediction_head(self.net)(hidden[at]).float(), dim=-1)
        scores, tokens = (t.cpu().tolist() for t in probs.topk(min(max(top_k), probs.shape[-1]), dim=-1))
        names: dict[int, str] = {}
        out, j = [], 0
        for count, k in zip(at.sum(dim=1).tolist(), top_k):
            masks = []
            for row_s, row_t in zip(scores[j : j + count], tokens[j : j + count]):
                masks.append([{"token": names.setdefault(t, self.tokenizer.decode([t])), "score": round(s, 6)}
                              for t, s in zip(row_t[:k], row_s[:k])])
            out.append({"masks": masks})
            j += count
        return out

    def _embed(self, ids, attention) -> list[list[float]]:
        """The mean of the last hidden layer over each row's real tokens (as `mlm predict --task embed`)."""
        hidden = self.net.base_model(input_ids=ids, attention_mask=attention).last_hidden_state.float()
        weights = attention.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return [[round(x, 6) for x in row] for row in pooled.cpu().tolist()]

    def _classify(self, ids, attention) -> list[dict[str, Any]]:
        import torch

        logits = self.net(input_ids=ids, attention_mask=attention).logits.float()
        out = []
        for p in torch.softmax(logits, dim=-1).cpu().tolist():
            best = max(range(len(p)), key=p.__getitem__)
            out.append({"label": self.labels[best], "score": round(p[best], 6),
                        "scores": {n: round(x, 6) for n, x in zip(self.labels, p)}})
        return out


def load(source: Source, device: str = "cpu") -> Loaded:
    """Load `source` (fetched into this node's model cache first when remote), in bf16 on
    a GPU, and run one small batch so the first request pays no warm-up."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    from mlm.model import fit_tokenizer, resolve_model_dir

    path = resolve_model_dir(source.uri)
    config = AutoConfig.from_pretrained(path)
    kind = model_kind(config)
    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForMaskedLM
    net = auto.from_pretrained(path).eval()
    if torch.device(device).type == "cuda":
        net = net.to(device, dtype=torch.bfloat16)
    labels = [config.id2label[i] for i in range(config.num_labels)] if kind == "classifier" else []
    loaded = Loaded(source, net, fit_tokenizer(AutoTokenizer.from_pretrained(path), config), kind,
                    int(config.max_position_embeddings), labels)
    loaded.run("embed", [loaded.encode("warm up", "embed", loaded.max_len)], [1])
    return loaded


def run_items(items: list[tuple[Loaded, str, list[int], int]]) -> list[Any]:
    """A dynamic batch, possibly mixing tasks and (during a switch) versions: one forward
    per (version, task), answers in the items' order. A group that fails gives its items
    the exception (as a value: the other groups' requests still succeed)."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, (loaded, task, _, _) in enumerate(items):
        groups.setdefault((id(loaded), task), []).append(i)
    out: list[Any] = [None] * len(items)
    for (_, task), members in groups.items():
        loaded = items[members[0]][0]
        try:
            answers = loaded.run(task, [items[i][2] for i in members], [items[i][3] for i in members])
        except Exception as e:  # noqa: BLE001 - handed to the requests of this group
            answers = [e] * len(members)
        for i, answer in zip(members, answers):
            out[i] = answer
    return out


class ForwardThread:
    """A replica's one forward thread. Batches handed to it while it computes wait and
    then run together, up to `max_items` texts: after a long forward, the next one takes
    everything that arrived meanwhile, instead of the few texts that one batching window
    caught (which left the model computing small batches one after another)."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self.waiting: deque[tuple[list, Future]] = deque()
        self.ready = threading.Condition()
        threading.Thread(target=self._loop, name="mlm-forward", daemon=True).start()

    def submit(self, items: list) -> Future:
        """`items` as `run_items` takes them; the future gets their answers, in order."""
        future: Future = Future()
        with self.ready:
            self.waiting.append((items, future))
            self.ready.notify()
        return future

    def _take(self) -> list[tuple[list, Future]]:
        with self.ready:
            while not self.waiting:
                self.ready.wait()
            taken = [self.waiting.popleft()]
            size = len(taken[0][0])
            while self.waiting and size + len(self.waiting[0][0]) <= self.max_items:
                size += len(self.waiting[0][0])
                taken.append(self.waiting.popleft())
        return taken

    def _loop(self) -> None:
        while True:
            taken = self._take()
            try:
                answers = run_items([item for items, _ in taken for item in items])
            except Exception as e:  # noqa: BLE001 - run_items fails per group; this is a bug: fail these, go on
                for _, future in taken:
                    future.set_exception(e)
                continue
            at = 0
            for items, future in taken:
                future.set_result(answers[at : at + len(items)])
                at += len(items)
