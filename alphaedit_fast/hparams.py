"""AlphaEditHyperParams: the original AlphaEdit JSON hyper-parameters, validated, and the shipped presets."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HyperParamsError

FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last", "last")
TEMPLATE_FIELDS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
                   "lm_head_module")
MODEL_FIELDS = ("model_name", "v_loss_layer", *TEMPLATE_FIELDS)  # what for_model(model, layers) reads off the model
PRESETS_DIR = Path(__file__).parent / "presets"
_ALIASES = {"gptj6b": "EleutherAI_gpt-j-6B"}  # names that differ from a file name by more than _squash removes
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # '5e-1': a string to YAML 1.1, a float to us


def preset_names() -> list[str]:
    """Names of the shipped presets (`alphaedit_fast/presets/*.json`), for `AlphaEditHyperParams.load`."""
    return sorted((path.stem for path in PRESETS_DIR.glob("*.json")), key=str.lower)


def _squash(name: str) -> str:
    """`name` lower-cased, without '.json', '-', '_', '/' and spaces: what preset names are compared on."""
    return re.sub(r"[-_/\s]", "", name.lower().removesuffix(".json"))


def find_preset(name: str) -> str | None:
    """The preset called `name` (case, '.json', '-' and '_' aside; `gpt-j-6b` is an alias), or None."""
    key = _squash(name)
    key = _squash(_ALIASES.get(key, key))
    return next((preset for preset in preset_names() if _squash(preset) == key), None)


def matching_preset(config, name_or_path: str | None = None) -> str | None:
    """The preset whose `"architecture"` (model_type, depth, widths) equals `config`'s, or None.

    Presets of one shape (Llama3-8B and llama3.1-8b) are told apart by `name_or_path` (default
    `config._name_or_path`): one whose name it contains wins, else the first in `preset_names()`
    (Llama3-8B, the original's).
    """
    def fits(architecture) -> bool:
        return bool(architecture) and all(getattr(config, k, None) == v for k, v in architecture.items())

    matches = [name for name in preset_names() if fits(AlphaEditHyperParams.load(name).extra.get("architecture"))]
    hint = _squash(name_or_path if name_or_path is not None else getattr(config, "_name_or_path", "") or "")
    named = [name for name in matches if _squash(name) in hint]
    return (named or matches or [None])[0]


def _read_yaml(path: Path) -> dict[str, Any]:
    """An EasyEdit hparams YAML (`hparams/AlphaEdit/*.yaml`) as a dict; '5e-1' becomes 0.5, as in EasyEdit."""
    try:
        import yaml
    except ImportError:
        raise HyperParamsError(f"reading {path} needs PyYAML: pip install pyyaml") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise HyperParamsError(f"cannot read hyper-parameter file {path}: {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise HyperParamsError(f"{path} is not valid YAML ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise HyperParamsError(f"{path} must hold a mapping of hyper-parameter names to values (EasyEdit's "
                               f"hparams/AlphaEdit/*.yaml layout), got {type(data).__name__}")
    return {k: float(v) if isinstance(v, str) and _SCIENTIFIC.fullmatch(v) else v for k, v in data.items()}


POST_MLP_NORM_KEY = "post_mlp_norm"
EARLY_STOP_TOP1_KEY = "early_stop_top1"
NORM_ANCHOR_KEY = "norm_anchor"
NORM_ANCHOR_SAMPLES_KEY = "norm_anchor_samples"


@dataclass
class AlphaEditHyperParams:
    """Hyper-parameters with the names and meaning of the original `AlphaEditHyperParams`.

    Keys the original files do not have are kept in `extra` (and written back by `to_dict`).
    """

    layers: list[int]
    rewrite_module_tmp: str
    layer_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    v_loss_layer: int
    model_name: str = ""
    layer_selection: str = "all"
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    mom2_update_weight: float = 15000
    mlp_module_tmp: str = ""
    attn_module_tmp: str = ""
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    nullspace_threshold: float = 2e-2
    L2: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlphaEditHyperParams:
        """Build from a dict with the original keys; unknown keys go to `extra`."""
        if not isinstance(data, dict):
            raise HyperParamsError(f"hyper-parameters must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise HyperParamsError(f"hyper-parameters lack the required key(s) {missing}")
        if not isinstance(data.get("extra", {}), dict):
            raise HyperParamsError(f"extra must be a JSON object, got {type(data['extra']).__name__}")
        extra = dict(data.get("extra", {}))
        extra.update({k: v for k, v in data.items() if k not in known and k != "extra"})
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> AlphaEditHyperParams:
        """Read an original AlphaEdit hparams file (e.g. `hparams/AlphaEdit/Llama3-8B.json`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HyperParamsError(f"hyper-parameter file {path} does not exist") from None
        except OSError as err:
            raise HyperParamsError(f"cannot read hyper-parameter file {path}: {err}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise HyperParamsError(f"{path} is not valid JSON ({type(err).__name__}: {err}); give an AlphaEdit "
                                   "hparams file such as hparams/AlphaEdit/Llama3-8B.json") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> AlphaEditHyperParams:
        """Read a hparams file, or a shipped preset by name.

        An existing file is read as JSON (the original's layout), or as YAML when it ends in .yaml/.yml
        (EasyEdit's); anything else is a preset name.
        Preset names match without regard to case, '.json', '-' and '_': `Llama3-8B`, `llama3-8b.json`,
        `gpt2-xl`, `gpt-j-6b`, `qwen2.5-7b`, `llama3.1-8b`, `factworld` (see `preset_names()`).
        """
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise HyperParamsError(f"give a hparams file path or a preset name, got {type(name_or_path).__name__}")
        path = Path(name_or_path)
        if path.is_file():
            return cls.from_dict(_read_yaml(path)) if path.suffix.lower() in (".yaml", ".yml") else cls.from_json(path)
        name = find_preset(str(name_or_path))
        if name is None:
            raise HyperParamsError(f"{str(name_or_path)!r} is neither a hyper-parameter file (no such file) nor a "
                                   f"preset; the presets are {', '.join(preset_names())}")
        return cls.from_json(PRESETS_DIR / f"{name}.json")

    @classmethod
    def for_model(cls, model, layers: list[int] | None = None, **overrides) -> AlphaEditHyperParams:
        """Hyper-parameters for `model`, module templates from (or checked against) `arch.detect`.

        Without `layers`: the whole preset whose "architecture" matches `model.config`
        (`matching_preset`; Llama3-8B over llama3.1-8b unless the model's name says 3.1), named in
        `extra["preset"]`; no match raises HyperParamsError.
        With `layers`: the original's defaults, the detected templates, `v_loss_layer` the last
        layer. Any field can be overridden by keyword.
        """
        from .arch import detect

        spec = detect(model)
        if layers is None:
            values = cls._matching_preset_values(model, spec)
        else:
            values = dict(
                model_name=getattr(model.config, "_name_or_path", "") or spec.family,
                layers=list(layers),
                v_loss_layer=spec.num_layers - 1,
                v_lr=spec.default_v_lr,
                **{name: getattr(spec, name) for name in TEMPLATE_FIELDS},
            )
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def _matching_preset_values(cls, model, spec) -> dict[str, Any]:
        """The values of the preset matching `model`, plus "preset": its name; HyperParamsError when
        none matches or its module templates are not `spec`'s."""
        from .arch import same_layout, text_config

        config = text_config(model)
        name = matching_preset(config, getattr(model.config, "_name_or_path", "") or "")
        if name is None:
            raise HyperParamsError(
                f"no preset fits {type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}, "
                f"{spec.num_layers} layers, hidden size {getattr(config, 'hidden_size', None)}): give the layers "
                f"to edit (0-{spec.num_layers - 1} here), e.g. AlphaEditHyperParams.for_model(model, layers=[4, 5, "
                "6, 7, 8]) as AlphaEdit does for Llama-3-8B. Its published settings edit a few consecutive MLP "
                "layers early in the network: 4-8 of 32 for Llama-3-8B, 13-17 of 48 for GPT-2 XL, 3-8 of 28 for "
                f"GPT-J-6B. Presets (used when the model's shape matches one): {', '.join(preset_names())}")
        preset = cls.load(name)
        wrong = {k: (getattr(preset, k), getattr(spec, k))
                 for k in TEMPLATE_FIELDS if not same_layout(getattr(preset, k), getattr(spec, k))}
        if wrong:
            raise HyperParamsError(f"preset {name} fits the shape of {type(model).__name__} but not its modules "
                                   f"(preset, model): {wrong}; pass layers= to use the model's modules")
        # the model's own names: a text model's preset also fits the model under a multimodal wrapper
        return {**preset.to_dict(), **{k: getattr(spec, k) for k in TEMPLATE_FIELDS}, "preset": name}

    def to_dict(self) -> dict[str, Any]:
        """The original flat JSON layout, extra keys included."""
        data = dataclasses.asdict(self)
        data.update(data.pop("extra"))
        return data

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Raise HyperParamsError on any field of the wrong type or out of range."""
        layers = self.layers
        if not isinstance(layers, (list, tuple)) or not layers:
            raise HyperParamsError(f"layers must be a non-empty list of ints, got {layers!r}")
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in layers):
            raise HyperParamsError(f"layers must be non-negative ints, got {layers!r}")
        layers = [int(x) for x in layers]
        if list(layers) != sorted(set(layers)):
            raise HyperParamsError(f"layers must be strictly increasing, got {layers!r}")
        self.layers = list(layers)
        for name in ("rewrite_module_tmp", "layer_module_tmp"):
            value = getattr(self, name)
            if not isinstance(value, str) or value.count("{}") != 1 or any(b in value.replace("{}", "") for b in "{}"):
                raise HyperParamsError(f"{name} must be a module path with one '{{}}' for the layer number and no "
                                       f"other brace, e.g. 'model.layers.{{}}.mlp.down_proj'; got {value!r}")
        for name in ("ln_f_module", "lm_head_module"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise HyperParamsError(f"{name} must be a module path such as 'model.norm', got {value!r}")
        if self.fact_token not in FACT_TOKENS:
            raise HyperParamsError(f"fact_token must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        self._check_number("v_num_grad_steps", int, minimum=1)
        self._check_number("v_loss_layer", int, minimum=0)
        for name in ("v_lr", "clamp_norm_factor"):
            self._check_number(name, float, minimum=0.0, strict=True)
        for name in ("v_weight_decay", "kl_factor", "L2", "nullspace_threshold"):
            self._check_number(name, float, minimum=0.0)
        if not isinstance(self.extra, dict):
            raise HyperParamsError("extra must be a dict")
        if self.extra.get(POST_MLP_NORM_KEY, "ignore") not in ("ignore", "map"):
            raise HyperParamsError(f"{POST_MLP_NORM_KEY} must be 'ignore' (the original's update) or 'map', "
                                   f"got {self.extra[POST_MLP_NORM_KEY]!r}")
        anchor = self.extra.get(NORM_ANCHOR_KEY)
        if anchor is not None and anchor != "auto" and (isinstance(anchor, bool) or not isinstance(
                anchor, (int, float)) or not 0 < anchor < float("inf")):
            raise HyperParamsError(f"{NORM_ANCHOR_KEY} must be a positive number (the reference norm of v*), 'auto' "
                                   f"(computed from a sample of the requests) or null (off), got {anchor!r}")
        samples = self.norm_anchor_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise HyperParamsError(f"{NORM_ANCHOR_SAMPLES_KEY} must be a positive int, got {samples!r}")
        hits = self.extra.get(EARLY_STOP_TOP1_KEY)
        if hits is not None and (isinstance(hits, bool) or not isinstance(hits, int) or hits < 1):
            raise HyperParamsError(f"{EARLY_STOP_TOP1_KEY} must be a positive int (stop a request's z optimisation "
                                   f"at its N-th top-1 evaluation) or null (off), got {hits!r}")

    @property
    def maps_post_mlp_norm(self) -> bool:
        """`"post_mlp_norm": "map"` (a key the original's files do not have): on models that
        normalise the MLP output before the residual stream (Gemma 2/3), each layer's residual
        target is mapped through that norm (`solve.through_post_mlp_norm`). Default "ignore": the
        original's update, which treats the MLP output as added as it is."""
        return self.extra.get(POST_MLP_NORM_KEY, "ignore") == "map"

    @property
    def early_stop_top1(self) -> int | None:
        """`"early_stop_top1": N` (a key the original's files do not have; ENCORE's most-probable
        early stopping, MPES, with its prob_cutoff = -N): a request's z optimisation stops at the N-th
        loss evaluation (counted, not necessarily in a row) at which its new target is the top-1
        token at every target position of its rewriting prompts but the first (the bare prompt, as
        ENCORE leaves out); its z is the one that evaluation saw. Default None: the original's loop."""
        return self.extra.get(EARLY_STOP_TOP1_KEY)

    @property
    def norm_anchor(self) -> float | str | None:
        """`"norm_anchor"` (a key the original's files do not have; NAS's norm anchors, `anchors.py`):
        the reference norm each request's target MLP output v* is rescaled to, or "auto" until it
        is computed from a sample of the requests (`anchors.reference_norm`; the CLI does it).
        Default None: the original's targets."""
        return self.extra.get(NORM_ANCHOR_KEY)

    @property
    def norm_anchor_samples(self) -> int:
        """`"norm_anchor_samples"`: how many requests `"norm_anchor": "auto"` computes its reference from (1000)."""
        return self.extra.get(NORM_ANCHOR_SAMPLES_KEY, 1000)

    def _check_number(self, name: str, kind: type, minimum: float, strict: bool = False) -> None:
        value = getattr(self, name)
        ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise HyperParamsError(f"{name} must be {kind.__name__}, got {value!r}")
        if value != value or (value <= minimum if strict else value < minimum):
            bound = ">" if strict else ">="
            raise HyperParamsError(f"{name} must be {bound} {minimum}, got {value!r}")
        setattr(self, name, kind(value))
