"""AlphaEditHyperParams: the original AlphaEdit JSON hyper-parameters, validated."""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HyperParamsError

FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last", "last")


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
    def for_model(cls, model, layers: list[int] | None = None, **overrides) -> AlphaEditHyperParams:
        """Defaults for `model` with its module templates filled in from `arch.detect`.

        `layers` defaults to five consecutive layers starting at num_layers // 8 (the original
        uses 4-8 for the 32-layer Llama-3-8B); any other field can be overridden by keyword.
        """
        from .arch import detect

        spec = detect(model)
        if layers is None:
            start = spec.num_layers // 8
            layers = list(range(start, min(start + 5, spec.num_layers)))
        values = dict(
            model_name=getattr(model.config, "_name_or_path", "") or spec.family,
            layers=list(layers),
            rewrite_module_tmp=spec.rewrite_module_tmp,
            layer_module_tmp=spec.layer_module_tmp,
            mlp_module_tmp=spec.mlp_module_tmp,
            attn_module_tmp=spec.attn_module_tmp,
            ln_f_module=spec.ln_f_module,
            lm_head_module=spec.lm_head_module,
            v_loss_layer=spec.num_layers - 1,
            v_lr=spec.default_v_lr,
        )
        values.update(overrides)
        return cls.from_dict(values)

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

    def _check_number(self, name: str, kind: type, minimum: float, strict: bool = False) -> None:
        value = getattr(self, name)
        ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise HyperParamsError(f"{name} must be {kind.__name__}, got {value!r}")
        if value != value or (value <= minimum if strict else value < minimum):
            bound = ">" if strict else ">="
            raise HyperParamsError(f"{name} must be {bound} {minimum}, got {value!r}")
        setattr(self, name, kind(value))
