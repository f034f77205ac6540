"""A BaseEditor-like caller: ALG_DICT lookup at construction, one request per apply call as
BaseEditor.edit_requests makes them (copy=False, return_orig_weights=True, keep_original_weight=False,
train_ds=None), weights restored from weights_copy unless sequential_edit."""

import torch

from ..util.alg_dict import ALG_DICT


class BaseEditor:
    @classmethod
    def from_hparams(cls, hparams, model=None, tok=None):
        return cls(hparams, model, tok)  # EasyEdit loads hparams.model_name; the tests hand the model in

    def __init__(self, hparams, model, tok):
        self.hparams, self.model, self.tok, self.alg_name = hparams, model, tok, hparams.alg_name
        self.apply_algo = ALG_DICT[hparams.alg_name]

    def edit(self, prompts, target_new, subject, ground_truth=None, sequential_edit=False, **kwargs):
        if isinstance(prompts, str):
            prompts, target_new, subject = [prompts], [target_new], [subject]
        requests = [{"prompt": p, "target_new": t, "subject": s, "ground_truth": "<|endoftext|>", "portability": {},
                     "locality": {}} for p, t, s in zip(prompts, target_new, subject)]
        for request in requests:
            assert request["subject"] in request["prompt"]
            edited_model, weights_copy = self.apply_algo(self.model, self.tok, [request], self.hparams, copy=False,
                                                         return_orig_weights=True, keep_original_weight=False,
                                                         train_ds=None)
            if sequential_edit:
                self.model = edited_model
            else:
                with torch.no_grad():
                    for name, weight in weights_copy.items():
                        edited_model.get_parameter(name)[...] = weight
        return [{"requested_rewrite": r} for r in requests], self.model, weights_copy
