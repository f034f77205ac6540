"""Stand-in AlphaEditor: the package's editor flow and state, plainly (targets one request at a
time, dense d_k x d_k solves, P and the key covariance as dense CPU tensors)."""

from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

from .compute_keys import compute_keys
from .compute_target import compute_target, get_module_input_output_at_words
from .layer_stats import layer_stats
from .spy import CALLS
from .utils.generation import generate_contexts


class AlphaEditor:
    def __init__(self, model, tokenizer, config, *, stats_dir, cache_dir=None, state_path=None,
                 context_templates=None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config.resolve_layout(model)
        self.stats_dir = Path(stats_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.context_templates = context_templates
        self._validate_single_device()
        if state_path is None:
            self.projection, self.key_covariance = self._initialize_state()
        else:
            self.projection, self.key_covariance = self._load_state(state_path)

    def edit(self, requests):
        CALLS.append("edit")
        requests = self._normalize_requests(requests)
        contexts = self._get_context_templates()
        last = self.config.layers[-1]
        targets = torch.stack([self._load_or_compute_target(r, last, contexts) for r in requests], dim=1)
        for index, layer in enumerate(self.config.layers):
            keys = compute_keys(self.model, self.tokenizer, requests, self.config, layer, contexts).T.float()
            current = get_module_input_output_at_words(
                self.model, self.tokenizer, last, [r["prompt"] for r in requests], [r["subject"] for r in requests],
                self.config.layer_module_template, self.config.fact_token)[1].T.float()
            residual = (targets.float() - current) / (len(self.config.layers) - index)
            P, C = self.projection[index], self.key_covariance[index]
            lhs = P @ (keys @ keys.T + C) + self.config.l2_regularization * torch.eye(keys.shape[0])
            update = torch.linalg.solve(lhs, P @ keys @ residual.T)
            weight = self.model.get_parameter(self.config.rewrite_module_template.format(layer) + ".weight")
            with torch.no_grad():
                weight.add_((update if update.shape == weight.shape else update.T).to(weight.dtype))
        for index, layer in enumerate(self.config.layers):
            keys = compute_keys(self.model, self.tokenizer, requests, self.config, layer, contexts).T.float()
            self.key_covariance[index].add_(keys @ keys.T)
        return self.model

    def save_state(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"layers": self.config.layers, "projection": self.projection,
                    "key_covariance": self.key_covariance}, path)

    def _initialize_state(self):
        CALLS.append("_initialize_state")
        projection = torch.stack([self._compute_projection(layer) for layer in self.config.layers])
        return projection, torch.zeros_like(projection)

    def _compute_projection(self, layer):
        stat = layer_stats(self.model, self.tokenizer, self.config.rewrite_module_template.format(layer),
                           self.stats_dir, self.config.mom2_dataset, ["mom2"], sample_size=self.config.mom2_n_samples,
                           precision=self.config.mom2_dtype)
        values, vectors = torch.linalg.eigh(stat.mom2.moment().float())
        null = vectors[:, values < self.config.nullspace_threshold]
        return null @ null.T

    def _load_or_compute_target(self, request, layer, contexts):
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"layer_{layer}" / f"case_{request['case_id']}.npz"
            if path.exists():
                return torch.from_numpy(np.load(path)["target"])
        target = compute_target(self.model, self.tokenizer, request, self.config, layer, contexts)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, target=target.float().numpy())
        return target

    def _get_context_templates(self):
        if self.context_templates is None:
            texts = generate_contexts(self.model, self.tokenizer, ["The", "Therefore", "Because", "I", "You"],
                                      generations_per_prompt=1, max_new_tokens=10)
            self.context_templates = [["{}"], [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]]
        return self.context_templates

    def _load_state(self, path):
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if state["layers"] != self.config.layers:
            raise ValueError("Saved state layers do not match the current config")
        return state["projection"].float(), state["key_covariance"].float()

    def _validate_single_device(self):
        devices = {p.device for p in self.model.parameters()}
        if len(devices) != 1:
            raise ValueError("AlphaEdit currently requires the Qwen model on one device; "
                             "device_map='auto' sharding is not supported")
        if next(iter(devices)).type != "cuda":
            raise ValueError("AlphaEdit requires a CUDA device")

    @staticmethod
    def _normalize_requests(requests):
        if not requests:
            raise ValueError("At least one edit request is required")
        requests = deepcopy(requests)
        for index, request in enumerate(requests):
            missing = {"prompt", "subject", "target_new"} - request.keys()
            if missing:
                raise ValueError(f"Request {index} is missing: {sorted(missing)}")
            if request["prompt"].count("{}") != 1:
                raise ValueError(f"Request {index} prompt must contain one '{{}}'")
            if isinstance(request["target_new"], str):
                request["target_new"] = {"str": request["target_new"]}
            if not request["target_new"]["str"].startswith(" "):
                request["target_new"]["str"] = " " + request["target_new"]["str"]
            request.setdefault("case_id", index)
        return requests
