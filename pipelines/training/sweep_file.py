"""The sweep file: a JSON Schema for its shape, then the checks no schema expresses.

    metric: eval/loss          # "loss" (training loss) or one of the stage's eval metrics
    mode: min
    scheduler: {grace_period: 2, reduction_factor: 2}   # ASHA, in reports (one per checkpoint)
    space:
      lr: {loguniform: [1.0e-4, 3.0e-3]}
      batch_size: {choice: [4, 8]}
      model.depth: {randint: [1, 3]}                     # both ends included
      model.cond_dropout: {uniform: [0.0, 0.2]}

SCHEMA (jsonschema) holds the keys, types and distribution shapes; each of its parts carries the
one-line message a user reads ("x-message"). What depends on the stage and preset stays in code:
the metric the stage reports, which parameters exist and their types, the ranges, and that every
trial config the space can produce passes TrainConfig's own checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema

from pipelines.platform import storage
from pipelines.training.config import OVERRIDABLE, ConfigError, TrainConfig

# Trial parameters besides model.<field>: the TrainConfig fields a sweep may vary, with their types.
TRIAL_FIELDS = {
    "lr": float,
    "batch_size": int,
    "ema_decay": float,
    "warmup_steps": int,
    "grad_clip": float,
    "seed": int,
}
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SWEEP_KEYS = ("metric", "mode", "scheduler", "space")
SCHEDULER_KEYS = ("grace_period", "reduction_factor", "brackets")
MODEL_PREFIX = "model."
EMPTY_SPACE = "space is empty: name at least one parameter, e.g. lr: {loguniform: [1.0e-4, 1.0e-3]}"

SCHEMA = {
    "type": "object",
    "x-message": "must be a mapping with keys " + ", ".join(SWEEP_KEYS),
    "properties": {
        "metric": {"type": "string", "x-message": "metric must be a string, got {instance!r}"},
        "mode": {"enum": ["min", "max"], "x-message": "mode must be min or max, got {instance!r}"},
        "scheduler": {
            "type": ["object", "null"],
            "x-message": "scheduler must be a mapping of " + ", ".join(SCHEDULER_KEYS) + ", got {instance!r}",
            "properties": {
                "grace_period": {
                    "type": "integer",
                    "minimum": 1,
                    "x-message": "scheduler.grace_period must be a positive integer, got {instance!r}",
                },
                "brackets": {
                    "type": "integer",
                    "minimum": 1,
                    "x-message": "scheduler.brackets must be a positive integer, got {instance!r}",
                },
                "reduction_factor": {
                    "type": "number",
                    "exclusiveMinimum": 1,
                    "x-message": "scheduler.reduction_factor must be a number above 1, got {instance!r}",
                },
            },
            "additionalProperties": False,
            "x-unknown": "unknown scheduler key {first!r}; valid: " + ", ".join(SCHEDULER_KEYS),
        },
        "space": {
            "type": "object",
            "minProperties": 1,
            "x-message": EMPTY_SPACE.replace("{", "{{").replace("}", "}}"),
            "additionalProperties": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,
                "x-message": "space.{param} must be one of {{"
                + ": ..., ".join(DISTRIBUTIONS)
                + ": ...}}, got {instance!r}",
                "propertyNames": {
                    "enum": list(DISTRIBUTIONS),
                    "x-message": "space.{param}: unknown distribution {instance!r}; valid: " + ", ".join(DISTRIBUTIONS),
                },
                "additionalProperties": {
                    "type": "array",
                    "minItems": 1,
                    "x-message": "space.{param}.{dist} needs a non-empty list, got {instance!r}",
                },
            },
        },
    },
    "required": ["space"],
    "additionalProperties": False,
    "x-unknown": "unknown key(s) {keys}; valid: " + ", ".join(SWEEP_KEYS),
}
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


class SweepError(ConfigError):
    """A wrong sweep file or sweep setting, in one line, before any trial starts."""


@dataclass(frozen=True)
class Search:
    """A checked sweep file."""

    metric: str
    mode: str
    grace_period: int
    reduction_factor: float
    brackets: int
    space: dict[str, tuple[str, list]]  # parameter -> (distribution, arguments)
    text: str  # the file as written, logged to the parent run


def schema_message(error: jsonschema.ValidationError) -> str:
    """The x-message of the schema part that failed, filled in from where it failed."""
    if error.validator == "required":
        return EMPTY_SPACE
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and "x-unknown" in error.schema:
        unknown = sorted(map(str, set(error.instance) - set(error.schema["properties"])))
        return error.schema["x-unknown"].format(keys=", ".join(unknown), first=unknown[0])
    # path: space, <parameter>, <distribution> (a propertyNames error stops at the parameter; its
    # instance is the bad name)
    fields = {
        "instance": error.instance,
        "param": path[1] if len(path) > 1 else "",
        "dist": path[2] if len(path) > 2 else "",
    }
    return error.schema.get("x-message", error.message).format(**fields)


def load_search(path: str, base: TrainConfig) -> Search:
    """Read and check a sweep file against the stage and preset of `base`; SweepError on any problem."""
    import yaml

    from pipelines.training.stage import get_stage

    def fail(message: str):
        raise SweepError(f"sweep file {path}: {message}")

    try:
        text = storage.read_text(path)
    except (OSError, storage.StorageError) as exc:
        raise SweepError(f"sweep file {path}: cannot read it ({exc})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"not valid YAML ({' '.join(str(exc).split())})")
    error = jsonschema.exceptions.best_match(VALIDATOR.iter_errors(doc))
    if error is not None:
        fail(schema_message(error))

    metrics = ("loss", *get_stage(base.stage).eval_metrics)
    metric = doc.get("metric", "loss")
    if metric not in metrics:
        fail(f"metric {metric!r} is not reported by the {base.stage} stage; choose one of: {', '.join(metrics)}")
    checked = {}
    for param, spec in doc["space"].items():
        kind = param_type(str(param), base)
        if kind is None:
            valid = [*TRIAL_FIELDS, *(MODEL_PREFIX + k for k in model_fields(base))]
            fail(f"unknown parameter {param!r}; valid: {', '.join(valid)}")
        ((dist, args),) = spec.items()
        checked[param] = (dist, check_arguments(param, dist, args, kind, fail))
    scheduler = doc.get("scheduler") or {}
    search = Search(
        metric=metric,
        mode=doc.get("mode", "min"),
        grace_period=int(scheduler.get("grace_period", 1)),
        reduction_factor=float(scheduler.get("reduction_factor", 2)),
        brackets=int(scheduler.get("brackets", 1)),
        space=checked,
        text=text,
    )
    for values in probe_points(search):
        try:
            trial_config(base, values, "probe")
        except ConfigError as exc:
            fail(f"space gives a trial config that fails: {exc} (with {json.dumps(values)})")
    return search


def model_fields(base: TrainConfig) -> tuple[str, ...]:
    """The model.* parameters of this stage and preset (none for an SD UNet)."""
    return OVERRIDABLE[base.stage] if getattr(base.model_preset, base.stage) is not None else ()


def param_type(param: str, base: TrainConfig) -> type | None:
    if param.startswith(MODEL_PREFIX):
        key = param[len(MODEL_PREFIX) :]
        return type(getattr(getattr(base.model_preset, base.stage), key)) if key in model_fields(base) else None
    return TRIAL_FIELDS.get(param)


def check_arguments(param: str, dist: str, args: list, kind: type, fail) -> list:
    """A distribution's arguments of the parameter's type: integers for an int, numbers otherwise; ranges low < high."""

    def typed(value) -> bool:
        if isinstance(value, bool):
            return False
        return isinstance(value, int) if kind is int else isinstance(value, (int, float))

    type_name = "integers" if kind is int else "numbers"
    if dist == "choice":
        wrong = [v for v in args if not typed(v)]
        if wrong:
            fail(f"space.{param}.choice: {param} takes {type_name}, got {wrong[0]!r}")
        return args
    if dist in ("uniform", "loguniform") and kind is int:
        fail(f"space.{param} is an integer: use randint or choice, not {dist}")
    if dist == "randint" and kind is not int:
        fail(f"space.{param} is a number: use uniform, loguniform or choice, not randint")
    if len(args) != 2 or not all(typed(v) for v in args):
        fail(f"space.{param}.{dist} needs [low, high] as {type_name}, got {args!r}")
    low, high = args
    if not low < high:
        fail(f"space.{param}.{dist}: low {low!r} must be below high {high!r}")
    if dist == "loguniform" and low <= 0:
        fail(f"space.{param}.loguniform: low must be above 0, got {low!r}")
    return args


def probe_points(search: Search) -> list[dict]:
    """Trial parameter sets that cover every choice and both ends of every range (one parameter at a time)."""
    ends = {p: (args if dist == "choice" else [args[0], args[1]]) for p, (dist, args) in search.space.items()}
    first = {p: values[0] for p, values in ends.items()}
    return [first, *({**first, p: v} for p, values in ends.items() for v in values[1:])]


def largest_point(search: Search) -> dict:
    """The trial needing the most GPU memory: every parameter at its largest value. Memory grows with
    the batch, the width, the depth and the MLP ratio, and no parameter a sweep may vary lowers it."""
    return {p: max(args) if dist == "choice" else args[1] for p, (dist, args) in search.space.items()}


def trial_config(base: TrainConfig, values: dict, name: str) -> TrainConfig:
    """The TrainConfig of one trial: the shared fields, the trial's values and its name."""
    values = dict(values)
    model = values.pop("model", None) or {
        k[len(MODEL_PREFIX) :]: values.pop(k) for k in list(values) if k.startswith(MODEL_PREFIX)
    }
    return base.replace(name=name, model_overrides={**base.model_overrides, **model}, **values)
