# ruff: noqa: N999 - EasyEdit's module name
from dataclasses import dataclass

import yaml

from ...util.hparams import HyperParams


@dataclass
class AlphaEditHyperParams(HyperParams):
    layers: list
    layer_selection: str
    fact_token: str
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    mom2_adjustment: bool
    mom2_update_weight: float
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    mom2_dataset: str
    mom2_n_samples: int
    mom2_dtype: str
    nullspace_threshold: float
    L2: float
    alg_name: str
    device: int
    model_name: str
    stats_dir: str
    P_loc: str
    max_length: int = 40
    batch_size: int = 1
    model_parallel: bool = False

    @classmethod
    def from_hparams(cls, path: str):
        path = path if ".yaml" in path else path + ".yaml"
        with open(path) as f:
            config = cls.construct_float_from_scientific_notation(yaml.safe_load(f))
        assert config["alg_name"] == "AlphaEdit"
        return cls(**config)
