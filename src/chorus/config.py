"""Typed configs for every command: dataclasses loaded from YAML, then ``key=value`` overrides.

Validated on load; errors name the key, the bad value and what was expected (OLMo-core style).
Only commands read configs (the table of commands is `chorus.commands.COMMANDS`); components take plain
keyword arguments.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from chorus.errors import ChorusError


def opt(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, positional: bool = False,
        **kw: Any) -> Any:
    """A config field with CLI help text (and optional allowed values; ``positional``: an argument, not a flag)."""
    meta = {"help": help, "choices": choices, "positional": positional}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


REQUIRED = dataclasses.MISSING


# ---------------------------------------------------------------------------------------------- shared fields
def storage_options_field() -> Any:
    """The fsspec options every command that opens a store takes."""
    return opt({}, "fsspec options for the store URL (e.g. endpoint_url for S3)")


def max_rows_field() -> Any:
    """The held-out sample that calibrate and blend fit on."""
    return opt(None, "fit on at most this many rows, stratified by domain (default: ~1 M positions)")


# ---------------------------------------------------------------------------------------------- commands
@dataclass
class PrepareConfig:
    dataset: str = opt(REQUIRED, "local file (.txt .json .jsonl .parquet .csv), a directory of them, or a datasets hub name")
    tokenizer: str = opt(REQUIRED, "tokenizer directory or hub id (AutoTokenizer)")
    out: str = opt(REQUIRED, "output store: a path or fsspec URL (s3://, gs://, memory://, file://)")
    seq_len: int = opt(512, "tokens per packed row")
    text_field: str = opt("text", "column that holds the text")
    domain_field: Optional[str] = opt(None, "column naming each document's domain (default: one domain per input file)")
    split: str = opt("train", "dataset split to read")
    valid_fraction: float = opt(0.05, "share of documents held out for validation (chosen by a hash of the text)")
    max_docs: Optional[int] = opt(None, "read at most this many documents")
    rows_per_shard: Optional[int] = opt(None, "rows per shard, the unit of work (default: ~256k tokens per shard)")
    batch_size: int = opt(1000, "documents per tokenizer call")
    overwrite: bool = opt(False, "replace an existing store made from other inputs")
    storage_options: dict = storage_options_field()


@dataclass
class CacheConfig:
    store: str = opt(REQUIRED, "store made by `chorus prepare`")
    teacher: str = opt(REQUIRED, "teacher model: local directory or hub id (AutoModelForCausalLM)")
    name: Optional[str] = opt(None, "name of the cache inside the store (default: derived from the model)")
    top_k: int = opt(64, "log-probs kept per position (normalized over the full vocabulary)")
    samples: int = opt(0, "tokens drawn with replacement per position (0: none)")
    batch_size: int = opt(8, "rows per forward pass")
    dtype: str = opt("auto", "teacher compute dtype (auto: bf16 on GPU, fp32 on CPU)", choices=("auto", "bf16", "fp16", "fp32"))
    device: str = opt("auto", "device for the teacher", choices=("auto", "cpu", "cuda"))
    device_map: Optional[str] = opt(None, "place a teacher larger than one device across every visible one: auto "
                                          "(accelerate's big-model placement; pip install accelerate); one process "
                                          "per node")
    value_codec: str = opt("fp16", "how top-k log-probs are stored: fp16 (lossless delta-coded) or q8 (8-bit, lossy)",
                           choices=("fp16", "q8"))
    shard: Optional[str] = opt(None, "i/n: this worker fills shards i, i+n, ... (torchrun sets it from RANK/WORLD_SIZE)")
    seed: int = opt(0, "seed for sampled targets (per row, so reruns draw the same)")
    branches: int = opt(0, "a teacher of another tokenizer: the unplaced teacher tokens per position (most probable "
                           "first) it is asked, with one more token each in the same pass (tree attention), where their "
                           "text stops; that share is placed instead of left in the bucket. Each costs about one "
                           "teacher position")
    revision: Optional[str] = opt(None, "model revision (hub) to load")
    tokenizer: Optional[str] = opt(None, "the teacher's tokenizer, checked against the store's (default: the model's own)")
    trust_remote_code: bool = opt(False, "allow the model's own code to run")
    compile: Optional[bool] = opt(None, "compile the per-position target math with torch.compile (default: on a GPU, "
                                        "where it fuses the statistics into one pass over the logits; on a CPU it "
                                        "runs the GPU's logit path compiled, faster math, needs a C++ compiler; "
                                        "a failed compile falls back with a warning; compile=false turns it off)")
    overwrite: bool = opt(False, "replace a cache of this name made with other settings; with the same settings, "
                                 "rewrite this worker's shards whose bytes do not match their commit record")
    storage_options: dict = storage_options_field()


@dataclass
class TrainConfig:
    store: str = opt(REQUIRED, "store with the corpus (and cached teachers)")
    student: str = opt(REQUIRED, "student: model directory, hub id, or a model-config YAML trained from scratch")
    out: str = opt(REQUIRED, "run directory: checkpoints, logs, final model")
    teachers: list = opt([], "cached teachers to distill from, comma-separated (none: plain CE training)")
    steps: int = opt(1000, "optimizer steps")
    batch_size: int = opt(8, "rows per micro-batch (per rank)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(3e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = opt(50, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    clip: float = opt(1.0, "gradient-norm clipping (0: off)")
    seed: int = opt(0, "seed for init, shuffling and dropout")
    loss: str = opt("forward_kl", "divergence", choices=("forward_kl", "reverse_kl", "jsd", "skew_kl"))
    target: str = opt("topk_tail", "sparse target", choices=("topk_tail", "topk_renorm", "samples"))
    kd_weight: float = opt(1.0, "weight of the KD term; 1 - kd_weight goes to hard-label CE")
    temperature: float = opt(1.0, "softening temperature (probability domain, T^2 scaled)")
    softening: str = opt("power", "operator the temperature softens the teachers with: power (p^(1/T)) or linear "
                                  "(toward uniform for T > 1, toward the argmax for T < 1)", choices=("power", "linear"))
    aggregate: str = opt("mixture", "how teachers are pooled", choices=("mixture", "geometric", "power"))
    weighting: str = opt("none", "per-token teacher weights",
                         choices=("none", "confidence", "agreement", "likelihood", "context"))
    teacher_weights: dict = opt({}, "global weight per teacher name (default 1 each)")
    domain_weights: dict = opt({}, "per-domain weights: {domain: {teacher: weight}}")
    alpha: float = opt(0.5, "alpha of the power pool")
    beta: float = opt(1.0, "sharpness of per-token weighting")
    calibrated: bool = opt(True, "apply each teacher's fitted temperature before pooling")
    teacher_temperatures: dict = opt({}, "per-teacher temperatures {teacher: T} replacing the calibrated ones "
                                         "(a stored blend fills them in)")
    blend: bool = opt(True, "use the blend `chorus blend` recorded for these teachers (explicit domain_weights / "
                            "weighting override it)")
    train_domains: list = opt([], "train only on rows of these domains (default: all)")
    train_rows: Optional[int] = opt(None, "train on at most this many rows, evenly spread over the store (default: all)")
    exclude_rows: Optional[int] = opt(None, "never train on the rows `train_rows: N` would pick with N = this (e.g. "
                                            "keep a teacher off the students' distillation set)")
    eval_every: int = opt(200, "evaluate on the held-out split every N steps (0: only at the end)")
    eval_rows: int = opt(256, "held-out rows per evaluation")
    save_every: int = opt(500, "checkpoint every N steps (0: only at the end)")
    log_every: int = opt(10, "log every N steps")
    precision: str = opt("auto", "autocast dtype", choices=("auto", "fp32", "bf16", "fp16"))
    parallel: str = opt("ddp", "under torchrun: ddp (a replica per rank) or fsdp (FSDP2 fully_shard: parameters, "
                               "gradients and optimizer state sharded over ranks, for a student larger than one device)",
                        choices=("ddp", "fsdp"))
    device: str = opt("auto", "training device", choices=("auto", "cpu", "cuda"))
    num_workers: int = opt(0, "loader threads decoding shards ahead of the step (0: in the training loop); the same "
                              "batches for any number")
    shuffle_buffer: int = opt(1024, "rows shuffled together after the shards are interleaved")
    shuffle_shards: Optional[int] = opt(None, "shards read side by side: each batch mixes rows of that many shards "
                                              "(memory: that many decoded shards; default max(8, shuffle_buffer / rows "
                                              "per shard))")
    chunk_size: Optional[int] = opt(None, "positions per chunk of the loss (bounds fp32 logits memory; default 1024 "
                                          "on a CPU, on a GPU at T = 1 up to 4096 within 2 GiB of fp32 logits)")
    lora: dict = opt({}, "train LoRA adapters instead of the whole student (needs peft): {r: 16, alpha: 32, dropout: 0, "
                         "target_modules: all-linear}; model/ gets the merged model, model/adapter/ the adapters")
    resume: bool = opt(False, "continue from the last checkpoint in --out")
    overwrite: bool = opt(False, "replace a run directory that holds another run")
    storage_options: dict = storage_options_field()


@dataclass
class EvalConfig:
    store: str = opt(REQUIRED, "store with the held-out split")
    model: str = opt(REQUIRED, "model directory (a `chorus train` output) or teacher cache 'teacher:NAME'")
    out: Optional[str] = opt(None, "write the metrics as JSON here")
    split: str = opt("valid", "split to evaluate")
    batch_size: int = opt(8, "rows per forward pass")
    max_rows: Optional[int] = opt(None, "evaluate at most this many rows")
    teachers: list = opt([], "cached teachers to compare with, comma-separated (default: every complete one)")
    aggregate: str = opt("mixture", "operator for the ensemble diagnostics", choices=("mixture", "geometric", "power"))
    weighting: str = opt("none", "per-token weighting for the ensemble diagnostics",
                         choices=("none", "confidence", "agreement", "likelihood", "context"))
    alpha: float = opt(0.5, "alpha of the power pool")
    beta: float = opt(1.0, "sharpness of per-token weighting")
    blend: bool = opt(True, "pool the teachers with the blend `chorus blend` recorded for them, as `chorus train` "
                            "does (an explicit weighting overrides it)")
    chunk_size: int = opt(1024, "positions per chunk of the log-softmax")
    device: str = opt("auto", "device", choices=("auto", "cpu", "cuda"))
    storage_options: dict = storage_options_field()


@dataclass
class CalibrateConfig:
    store: str = opt(REQUIRED, "store with the cached teacher")
    teacher: str = opt(REQUIRED, "name of the cached teacher")
    split: str = opt("valid", "split to fit on (held-out rows)")
    max_rows: Optional[int] = max_rows_field()
    storage_options: dict = storage_options_field()


@dataclass
class BlendConfig:
    store: str = opt(REQUIRED, "store with the cached teachers")
    teachers: list = opt([], "teachers to blend (default: every complete one)")
    split: str = opt("valid", "split to fit on (held-out rows)")
    max_rows: Optional[int] = max_rows_field()
    storage_options: dict = storage_options_field()


@dataclass
class ExportConfig:
    store: str = opt(REQUIRED, "store with the cached teacher")
    teacher: str = opt(REQUIRED, "name of the cached teacher")
    out: str = opt(REQUIRED, "output directory")
    format: str = opt("parquet", "file format", choices=("parquet", "arrow"))
    storage_options: dict = storage_options_field()


@dataclass
class ImportConfig:
    store: str = opt(REQUIRED, "store to import into (its corpus must match the files)")
    src: str = opt(REQUIRED, "directory written by `chorus export`")
    name: Optional[str] = opt(None, "teacher name in the store (default: as exported)")
    overwrite: bool = opt(False, "replace an existing teacher of that name")
    storage_options: dict = storage_options_field()


@dataclass
class CompressConfig:
    store: str = opt(REQUIRED, "store with the corpus (calibration rows, held-out rows) and the cached teachers")
    model: str = opt(REQUIRED, "model to compress: a directory or hub id (AutoModelForCausalLM, Llama family)")
    out: str = opt(REQUIRED, "run directory: one folder per stage (pruned model, distillation run), a table")
    teachers: list = opt([], "cached teachers every stage distills from (none: CE-only recovery)")
    method: str = opt("structured", "structured: a smaller model (width/depth); magnitude or wanda: unstructured "
                                    "masks; 2:4: semi-structured masks (wanda scores)",
                      choices=("structured", "magnitude", "wanda", "2:4"))
    target_params: float = opt(0.5, "structured: fraction of the model's parameters to keep")
    axes: Optional[list] = opt(None, "structured: what shrinks (heads, mlp, hidden; layers for depth); default "
                                     "heads, mlp, hidden in separate stage runs, heads, mlp inside one run "
                                     "(masks cannot shrink hidden channels)")
    sparsity: float = opt(0.5, "magnitude / wanda: fraction of each block matrix pruned (2:4 is always 0.5)")
    schedule: str = opt("stages", "how the sparsity grows: one-shot or stages (n = stages) prune → distill in a "
                                  "train run per stage; linear or cubic (Zhu & Gupta) grow it every `every` steps "
                                  "inside one train run", choices=("one-shot", "stages", "linear", "cubic"))
    stages: int = opt(1, "schedule stages: prune → distill stages from the model to the target (1: one-shot)")
    in_run: bool = opt(False, "one-shot / stages: prune inside one train run with masks, as linear and cubic do")
    begin: int = opt(0, "inside one run: the step the pruning starts at")
    end: Optional[int] = opt(None, "inside one run: the step the target is reached (default: 3/4 of the steps for "
                                   "linear and cubic, so the last quarter recovers; all steps for stages)")
    every: Optional[int] = opt(None, "linear / cubic: steps between mask updates (default: (end - begin) / 16)")
    steps: int = opt(400, "student steps in all (split evenly over separate stage runs)")
    calibration_rows: int = opt(64, "training rows whose activations rank the units")
    seed: int = opt(0, "seed of every stage's distillation")
    train: dict = opt({}, "train keys for every stage (lr, batch_size, loss, kd_weight, temperature, ...)")
    eval_rows: int = opt(256, "held-out rows evaluated after each stage")
    overwrite: bool = opt(False, "replace a run directory that holds another compression")
    storage_options: dict = storage_options_field()


@dataclass
class DemoConfig:
    out: str = opt("demo_out", "where the demo writes its store, models, table and plot")
    quick: bool = opt(False, "a smaller run that the test suite runs")
    seed: int = opt(0, "seed of every stage")
    threads: int = opt(1, "CPU threads for torch (the demo's models are tiny: one thread is about as fast, and "
                          "much faster when other work shares the cores)")
    workers: Optional[int] = opt(None, "processes running independent stages side by side (default: 1 with --quick, "
                                       "which runs beside other tests; else 2, the cores the demo is sized for)")


@dataclass
class InspectConfig:
    store: str = opt(REQUIRED, "store to describe", positional=True)
    json: bool = opt(False, "print JSON")
    storage_options: dict = storage_options_field()


@dataclass
class VerifyConfig:
    store: str = opt(REQUIRED, "store to check", positional=True)
    storage_options: dict = storage_options_field()


# ---------------------------------------------------------------------------------------------- loading
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "a mapping"}


def _base_type(tp: Any) -> tuple[type, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return (typing.get_origin(tp) or tp), False


def _coerce(cls_name: str, key: str, tp: Any, value: Any, choices: tuple | None) -> Any:
    base, optional = _base_type(tp)
    bad = ChorusError(f"{cls_name} key '{key}': expected {_TYPE_NAMES.get(base, base.__name__)}, got {value!r}")
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise bad
    if isinstance(value, str) and base is not str:  # from a key=value override or a CLI flag
        text = value.strip()
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise bad
            value = text.lower() in ("true", "1", "yes")
        elif base is list:
            value = [v.strip() for v in text.split(",") if v.strip()] if not text.startswith("[") else yaml.safe_load(text)
        else:
            try:
                value = yaml.safe_load(text) if base is dict else base(text)
            except (ValueError, yaml.YAMLError):
                raise bad from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise bad
    if choices and value not in choices:
        raise ChorusError(f"{cls_name} key '{key}': expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def command_name(cls: type) -> str:
    return cls.__name__.removesuffix("Config").lower()


def build_config(cls: type, *sources: dict) -> Any:
    """Merge plain dicts (later wins) onto ``cls`` defaults, validating every key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    merged: dict = {}
    for src in sources:
        for key, value in src.items():
            key = key.replace("-", "_")
            if key not in fields:
                close = ", ".join(sorted(fields))
                raise ChorusError(f"unknown {command_name(cls)} config key '{key}'; known keys: {close}")
            merged[key] = value
    kwargs = {}
    for name, f in fields.items():
        if name in merged:
            kwargs[name] = _coerce(command_name(cls), name, hints[name], merged[name], f.metadata.get("choices"))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            how = name.upper() if f.metadata.get("positional") else f"--{name.replace('_', '-')}"
            raise ChorusError(f"{command_name(cls)}: '{name}' is required (pass {how} or {name}=...)")
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ChorusError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ChorusError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ChorusError(f"config file '{path}': expected a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ChorusError(f"override '{item}': expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None, **values: Any) -> Any:
    """Defaults < YAML file < explicit keyword values (CLI flags) < ``key=value`` overrides."""
    file_values = read_yaml(path) if path else {}
    return build_config(cls, file_values, {k: v for k, v in values.items() if v is not None}, parse_overrides(overrides or []))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)

