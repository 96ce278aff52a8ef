"""Typed configs, one frozen class per concern; presets and `--set` overrides.

Resolution order: class defaults <- preset YAML (differences only) <- `--set key=value`.
Unknown keys are errors. Defaults live here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A user mistake in configuration; the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    text_field: str = Field("text", description="Field/column holding the text in .jsonl and .parquet inputs.")
    seq_len: int = Field(128, ge=8, le=8192, description="Tokens per packed sequence, [CLS] and [SEP] included.")
    validation_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of documents (chosen by content hash) held out for validation."
    )
    rows_per_shard: int = Field(50_000, ge=1, description="Sequences per Parquet shard.")
    pack_batch_docs: int = Field(
        1024, ge=1, description="Documents per tokenize/pack batch; only the last sequence of a batch is padded."
    )
    min_doc_chars: int = Field(1, ge=1, description="Documents shorter than this (after cleaning) are dropped.")
    invalid_utf8: Literal["replace", "drop", "latin1"] = Field(
        "replace",
        description="Documents with invalid UTF-8: replace bad bytes with U+FFFD, drop them, or decode them as Latin-1.",
    )
    max_chunk_chars: int = Field(
        1_000_000, ge=1000, description="Longer documents are tokenized in chunks cut at whitespace (bounded memory)."
    )
    read_chunk_bytes: int = Field(
        4 << 20, ge=1 << 16, description="Uncompressed text inputs are cut into ranges of about this many bytes (units of work)."
    )
    dedup: bool = Field(False, description="Drop exact duplicate documents (after cleaning); the first occurrence is kept.")
    packing: Literal["pack", "pad"] = Field(
        "pack", description="pack: documents packed across sequences with [SEP]; pad: one document per sequence, padded, length-binned."
    )
    max_bad_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Fail when more than this share of input files, or of documents, is unusable."
    )


class TokenizerConfig(_Section):
    path: Optional[str] = Field(None, description="Load this tokenizer directory instead of training one.")
    kind: Literal["wordpiece", "bpe", "unigram"] = Field(
        "wordpiece", description="Tokenizer model trained on the corpus: BERT WordPiece, byte-level BPE or unigram."
    )
    vocab_size: int = Field(30_522, ge=64, description="Vocabulary size of a trained tokenizer, specials included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge/word piece.")
    lowercase: bool = Field(True, description="Lowercase and strip accents before tokenizing (BERT uncased).")
    sample_docs: int = Field(200_000, ge=1, description="Documents sampled from the corpus to train the tokenizer.")


class MaskingConfig(_Section):
    strategy: Literal["random", "whole_word", "span", "terms"] = Field(
        "random", description="Training masking: random tokens, whole words, SpanBERT spans, or user terms."
    )
    rate: float = Field(0.3, gt=0.0, lt=1.0, description="Share of non-special tokens selected for prediction "
                        "(30%, as MosaicBERT and ModernBERT; BERT's was 15%; evaluation stays at eval.rate).")
    mask_fraction: float = Field(0.8, ge=0.0, le=1.0, description="Of the selected: share replaced by [MASK].")
    random_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Of the selected: share replaced by a random token.")
    mode: Literal["static", "dynamic"] = Field(
        "dynamic", description="dynamic: unmasked ids stored, masked at load time, anew every epoch (RoBERTa); "
        "static: masks stored in the shards."
    )
    seed: int = Field(0, description="Seed of the training masking (static: in the shards; dynamic: at load time).")
    duplication: int = Field(1, ge=1, le=20, description="Static masking: k differently masked copies of each sequence.")
    span_geometric_p: float = Field(0.2, gt=0.0, le=1.0, description="span: p of the geometric span length (in words).")
    span_max_words: int = Field(10, ge=1, description="span: longest span, in words.")
    terms_file: Optional[str] = Field(None, description="terms: file with one term or phrase per line.")
    term_rate: float = Field(0.5, ge=0.0, le=1.0, description="terms: chance that each occurrence of a term is masked.")

    @model_validator(mode="after")
    def _fractions(self) -> "MaskingConfig":
        if self.mask_fraction + self.random_fraction > 1.0:
            raise ValueError("masking.mask_fraction + masking.random_fraction must be <= 1")
        if self.mode == "dynamic" and self.duplication > 1:
            raise ValueError("masking.duplication > 1 is static masking; with masking.mode=dynamic every epoch is a new mask")
        if self.strategy == "terms" and not self.terms_file:
            raise ValueError("masking.strategy=terms needs masking.terms_file")
        return self


class ModelConfig(_Section):
    architecture: Literal["bert", "modernbert"] = Field(
        "bert", description="Encoder family: BERT, or ModernBERT (RoPE, GeGLU, alternating local/global attention)."
    )
    hidden_size: int = Field(768, ge=8, description="Width of the encoder.")
    num_layers: int = Field(12, ge=1, description="Transformer layers.")
    num_heads: int = Field(12, ge=1, description="Attention heads; must divide hidden_size.")
    intermediate_size: int = Field(3072, ge=8, description="Width of the feed-forward block.")
    max_position_embeddings: int = Field(512, ge=8, description="Longest sequence the model accepts.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Hidden and attention dropout.")
    init_from: Optional[str] = Field(None, description="Warm-start from this HF model directory.")

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must divide model.hidden_size ({self.hidden_size})")
        return self


class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each; one GPU each with use_gpu).")
    use_gpu: bool = Field(False, description="Train on GPUs with NCCL; otherwise CPU with gloo.")
    engine: Literal["ray", "local"] = Field(
        "ray", description="Where training runs: ray: Ray Train workers (DDP, restarts); local: one worker in this "
        "process, no Ray (num_workers, cpus_per_worker, backend and max_failures unused; a rerun resumes)."
    )
    cpus_per_worker: Optional[float] = Field(
        None, gt=0, description="CPUs reserved per worker; default: 1, or an equal share when workers outnumber CPUs."
    )
    micro_batch_size: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        32, description="Sequences per worker per forward pass; auto: the largest power of two dividing the worker's "
        "share of global_batch_size whose step fits the device's memory (a probe at start; see memory_limit_gb)."
    )
    memory_limit_gb: Optional[float] = Field(
        None, gt=0, description="micro_batch_size=auto: memory a step may use (GiB); default 90% of the GPU's, "
        "on a CPU what the process holds plus half the free RAM."
    )
    global_batch_size: int = Field(
        64, ge=1, description="Sequences per optimizer step over all workers; sets gradient accumulation."
    )
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    learning_rate: float = Field(5e-4, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not on biases and LayerNorm); 0 as the HF Trainer.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.98, ge=0.0, lt=1.0, description="AdamW beta2 (BERT/RoBERTa pretraining: 0.98; HF Trainer default 0.999).")
    adam_epsilon: float = Field(1e-6, gt=0.0, description="AdamW epsilon (BERT/RoBERTa pretraining: 1e-6; HF Trainer default 1e-8).")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps before the schedule.")
    schedule: Literal["linear", "cosine", "wsd"] = Field(
        "linear", description="After warmup: linear or cosine decay to zero, or warmup-stable-decay."
    )
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: share of the steps spent decaying to zero.")
    shuffle_window: int = Field(
        16, ge=1, description="Row groups whose rows are shuffled together each epoch (a shuffle buffer of up to "
        "shuffle_window x 8192 rows per worker); 1: shuffle inside each row group only."
    )
    prefetch_batches: int = Field(4, ge=1, description="Micro-batches each worker prepares ahead in a background thread.")
    validate_every: int = Field(0, ge=0, description="Steps between validations on the fixed evaluation set; 0: none.")
    validate_batches: int = Field(20, ge=1, description="Validation batches per validation (eval.batch_size rows each).")
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many validations without a lower validation loss; 0: never."
    )
    compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="torch.compile the model and loss (one graph: fixed prediction slots); auto: on GPUs, "
        "off on CPUs (where compiling costs more than it saves on a short run)."
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"] = Field(
        "default", description="torch.compile mode; reduce-overhead and max-autotune add CUDA graphs."
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend; auto: NCCL with use_gpu, gloo on CPUs. gloo on GPUs lets "
        "several workers share one GPU (gpus_per_worker < 1), which NCCL refuses."
    )
    gpus_per_worker: float = Field(
        1.0, gt=0, le=8, description="GPUs reserved per worker with use_gpu; a fraction shares a GPU (backend gloo)."
    )
    grad_clip: float = Field(1.0, ge=0.0, description="Max global gradient norm; 0 disables clipping.")
    log_every: int = Field(10, ge=1, description="Steps between metric logs.")
    checkpoint_every: int = Field(200, ge=1, description="Steps between checkpoints (one is always written at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the newest).")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint; -1 is unlimited.")
    seed: int = Field(0, description="Seed of model init and data order.")

    @model_validator(mode="after")
    def _batches(self) -> "TrainConfig":
        if self.gpus_per_worker < 1 and self.backend == "nccl":
            raise ValueError("train.gpus_per_worker < 1 shares a GPU between workers, which NCCL refuses; "
                             "use train.backend=gloo")
        if self.micro_batch_size == "auto":
            if self.global_batch_size % self.num_workers:
                raise ValueError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                                 f"train.num_workers ({self.num_workers})")
            return self
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size * train.num_workers ({per_step})"
            )
        return self


class EvalConfig(_Section):
    rate: float = Field(0.15, gt=0.0, lt=1.0, description="Masking rate of the fixed evaluation set.")
    seed: int = Field(1234, description="Seed of the fixed evaluation masking (independent of training).")
    batch_size: int = Field(64, ge=1, description="Sequences per evaluation batch.")
    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="Score in the driver (local) or as Ray Data batch inference (ray); auto: ray from ray_min_rows."
    )
    ray_min_rows: int = Field(50_000, ge=1, description="auto engine: evaluation rows from which scoring runs on Ray.")
    use_gpu: Union[bool, Literal["auto"]] = Field(
        "auto", description="Score on GPUs (bf16): auto when this machine (local engine) or the Ray cluster (ray "
        "engine, one GPU per actor) has one."
    )


class RegistryConfig(_Section):
    experiment: str = Field("mlm-pretrain", description="MLflow experiment of the pipeline; when neither a preset "
                            "nor --set names one, $MLFLOW_EXPERIMENT_NAME if set.")
    model_name: str = Field("mlm", description="Registered model name.")
    metric: Literal["top1_accuracy", "top5_accuracy", "loss"] = Field(
        "top1_accuracy", description="Evaluation metric of the promotion gate (loss: lower is better)."
    )
    min_improvement: float = Field(0.0, ge=0.0, description="Margin by which a challenger must beat the champion.")
    probe: bool = Field(False, description="The evaluate stage also fine-tunes the model and a random-init twin on the "
                        "built-in probe task (mlm probe) and records both macro-F1s with the version.")
    license: str = Field(
        "unknown", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$",
        description="License of the registered model, written into its model card (a Hugging Face license "
        "identifier such as apache-2.0, cc-by-4.0 or other); it follows from the corpus's license, which mlm "
        "cannot know, so the default is unknown.",
    )


class FinetuneConfig(_Section):
    task: Literal["classification"] = Field("classification", description="Downstream task: sequence classification.")
    text_column: str = Field("text", description="Column of the labelled files holding the text.")
    label_column: str = Field("label", description="Column of the labelled files holding the label.")
    epochs: int = Field(3, ge=1, description="Passes over the training file.")
    learning_rate: float = Field(1e-4, gt=0.0, description="Peak learning rate of AdamW (linear warmup, then linear decay).")
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the steps spent warming up.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (not on biases and LayerNorm).")
    batch_size: int = Field(32, ge=1, description="Examples per optimizer step over all workers (train.num_workers "
                            "of them, an equal share each).")
    max_length: Optional[int] = Field(None, ge=8, description="Tokens per example (longer texts are cut); default the "
                                      "model's positions.")
    seed: int = Field(0, description="Seed of the classifier head's init, the data order and dropout.")
    log_every: int = Field(10, ge=1, description="Steps between metric logs.")
    model_name: Optional[str] = Field(None, description="Registered name of the fine-tuned model; default "
                                      "<base model name>-<task>.")
    min_improvement: float = Field(0.0, ge=0.0, description="Margin of macro-F1 by which a new version must beat the "
                                   "champion to take its alias.")


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", min_length=1, description="Address the HTTP proxy of `mlm serve` binds; anything "
                      "but loopback needs a token (serve.token or $MLM_SERVE_TOKEN).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of `mlm serve`.")
    token: Optional[SecretStr] = Field(
        None, description="Bearer token every endpoint but /healthz and /readyz requires; default $MLM_SERVE_TOKEN. "
        "Shown and logged as ********** only; required when serve.host is not loopback.")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Texts per model forward: Ray Serve's dynamic batching "
                                "groups the texts of concurrent requests up to this many.")
    batch_wait_s: float = Field(0.002, ge=0.0, le=1.0, description="How long a batch waits for more texts before it "
                                "runs with what it has (seconds).")
    replicas: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        1, description="Replicas of the model (one process each); auto: Ray Serve autoscales between min_replicas "
        "and max_replicas to keep target_ongoing_requests per replica.")
    min_replicas: int = Field(1, ge=1, description="replicas=auto: fewest replicas.")
    max_replicas: int = Field(4, ge=1, description="replicas=auto: most replicas.")
    target_ongoing_requests: float = Field(16.0, gt=0.0, description="replicas=auto: requests in flight per replica "
                                           "that autoscaling aims for.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica takes at once; more wait in the "
                                      "proxy's queue.")
    ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy", description="How HTTP reaches the replicas on a Ray instance `mlm serve` starts: haproxy (Ray "
        "Serve's high-throughput mode: HAProxy forwards to each replica's own HTTP server) or proxy (Serve's Python "
        "proxy actor). A cluster sets its own (deploy/kuberay/rayservice-serve.yaml).")
    cpus_per_replica: float = Field(1.0, gt=0.0, description="CPUs Ray reserves per replica; its torch threads are "
                                    "this many (at least one).")
    use_gpu: Union[bool, Literal["auto"]] = Field(
        "auto", description="One GPU per replica, weights in bf16: auto when the Ray cluster has GPUs.")
    poll_s: float = Field(5.0, ge=0.0, description="Seconds between checks of a served alias (models:/NAME@ALIAS): "
                          "when it moves, each replica loads the new version and switches to it between requests; "
                          "0: never.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body (bytes); larger: 413.")
    max_texts: int = Field(64, ge=1, description="Texts per request; more: 413.")
    max_text_tokens: int = Field(512, ge=8, description="Tokens per text, special tokens included; longer: 413. A "
                                 "text within this but past the model's positions is cut to them (as mlm predict).")

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, value: Any) -> Any:
        """A number from --set is still a token; a masked one (a logged config read back) is none."""
        if value is None or isinstance(value, SecretStr):
            return value
        text = str(value)
        return None if not text or set(text) == {"*"} else text

    @model_validator(mode="after")
    def _replicas(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.min_replicas ({self.min_replicas}) exceeds serve.max_replicas ({self.max_replicas})")
        return self


class PathsConfig(_Section):
    data: Optional[str] = Field(
        None, description="Where pipelines keep datasets (a folder or an object-store URI such as s3://bucket/data); "
        "default $MLM_HOME/data. Each dataset is a subfolder named by its inputs and data settings."
    )
    runs: Optional[str] = Field(
        None, description="Where pipelines keep runs (model, Ray Train checkpoints): a folder or a URI every node "
        "reaches on a cluster; default $MLM_HOME/runs. Each run is a timestamped subfolder."
    )


class Config(_Section):
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    masking: MaskingConfig = MaskingConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        if self.finetune.batch_size % self.train.num_workers:
            raise ValueError(f"finetune.batch_size ({self.finetune.batch_size}) must be a multiple of "
                             f"train.num_workers ({self.train.num_workers})")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_preset(preset: str) -> dict[str, Any]:
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}; choose one of {preset_names()} or a .yaml path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a mapping of sections")
    return data


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"bad override key {dotted!r}: use section.key, e.g. train.max_steps=100")
    tree.setdefault(parts[0], {})[parts[1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"bad override {item!r}: use key=value, e.g. train.max_steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _check_keys(tree: dict[str, Any]) -> None:
    sections = Config.model_fields
    for section, body in tree.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; allowed: {', '.join(sections)}")
        if not isinstance(body, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        allowed = sections[section].annotation.model_fields  # type: ignore[union-attr]
        for key in body:
            if key not in allowed:
                raise ConfigError(f"unknown config key '{section}.{key}'; allowed: {', '.join(allowed)}")


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    # section.key; a union adds its member's tag after it ("constrained-int", "bool"): not a key
    loc = ".".join(str(p) for p in first["loc"][:2])
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = f" (got {value!r})" if loc and not isinstance(value, dict) else ""
    return f"invalid config {loc or 'value'}: {msg}{shown}" if loc else f"invalid config: {msg}"


def build_config(tree: dict[str, Any]) -> Config:
    _check_keys(tree)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def load_config(preset: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (),
                base: Optional[dict[str, Any]] = None) -> Config:
    """defaults <- preset (or `base`, a config as a dict, e.g. a registered model's) <- overrides, validated."""
    import copy

    tree: dict[str, Any] = _read_preset(preset) if preset else copy.deepcopy(base or {})
    _check_keys(tree)
    for item in overrides:
        key, value = parse_override(item)
        _set(tree, key, value)
    _from_environment(tree)
    return build_config(tree)


def _from_environment(tree: dict[str, Any]) -> None:
    """Settings MLflow users set in the environment, where the config leaves them open:
    MLFLOW_EXPERIMENT_NAME -> registry.experiment."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    if name and "experiment" not in tree.get("registry", {}):
        tree.setdefault("registry", {})["experiment"] = name


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a resolved config (e.g. from a manifest or `train_loop_config`)."""
    return build_config(d)


def _type_name(annotation: Any) -> str:
    """A field's type as people read it: int, float, bool, str, one of [...], int | auto."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is Annotated:
        return _type_name(args[0])
    if args and origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + (
            " | null" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def describe_keys() -> list[dict[str, Any]]:
    """Every config key (`section.key`) with its type, default and description: what
    `mlm config keys` prints."""
    defaults = Config().to_dict()
    out = []
    for section, field in Config.model_fields.items():
        for key, f in field.annotation.model_fields.items():  # type: ignore[union-attr]
            out.append({"key": f"{section}.{key}", "type": _type_name(f.annotation),
                        "default": defaults[section][key], "description": f.description or ""})
    return out
