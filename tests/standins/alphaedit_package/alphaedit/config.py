"""Stand-in AlphaEditConfig: the package's fields, JSON aliases and Qwen layout detection."""

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

ALIASES = {"L2": "l2_regularization", "rewrite_module_tmp": "rewrite_module_template",
           "layer_module_tmp": "layer_module_template", "ln_f_module": "final_norm_module"}
LAYOUTS = [("model.layers.{}.mlp.down_proj", "model.layers.{}", "model.norm"),
           ("model.language_model.layers.{}.mlp.down_proj", "model.language_model.layers.{}",
            "model.language_model.norm")]


@dataclass(frozen=True)
class AlphaEditConfig:
    layers: list
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.1
    v_loss_layer: int = 0
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100_000
    mom2_dtype: str = "float32"
    nullspace_threshold: float = 0.02
    l2_regularization: float = 10.0
    rewrite_module_template: str = None
    layer_module_template: str = None
    final_norm_module: str = None
    lm_head_module: str = "lm_head"

    @classmethod
    def from_json(cls, path):
        raw = {ALIASES.get(k, k): v for k, v in json.loads(Path(path).read_text()).items()}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def resolve_layout(self, model):
        kind = str(getattr(model.config, "model_type", "")).lower()
        if "qwen" not in kind and "qwen" not in str(model.config._name_or_path).lower():
            raise ValueError(f"Only Qwen models are supported; got model_type={kind!r}")
        names = dict(model.named_modules())
        for rewrite, layer, norm in LAYOUTS:
            if rewrite.format(self.layers[0]) in names and norm in names:
                return replace(self, rewrite_module_template=rewrite, layer_module_template=layer,
                               final_norm_module=norm)
        raise ValueError("Unsupported Qwen architecture")

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}
