"""Stand-in compute_target: the package's target optimisation for one request, plainly: a delta
added at the subject token of block `layer`'s output, v_num_grad_steps Adam steps (stopping early
when the loss is below 0.05), loss at block max(v_loss_layer, layer) through the final norm and the
head's weight, KL on "{} is a", norm clamp after each step. Right padding, as the package assumes."""

import torch

from .representations import get_reprs_at_word_tokens, get_words_idxs_in_templates
from .spy import CALLS


def _module(model, name):
    return dict(model.named_modules())[name]


def compute_target(model, tokenizer, request, config, layer, context_templates):
    CALLS.append("compute_target")
    head, norm = _module(model, config.lm_head_module), _module(model, config.final_norm_module)
    head_bias = head.bias if getattr(head, "bias", None) is not None else torch.zeros(head.weight.shape[0])
    target_ids = tokenizer(request["target_new"]["str"], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    rewriting = [context.format(request["prompt"]) + tokenizer.decode(target_ids[:-1])
                 for group in context_templates for context in group]
    prompts = rewriting + ["{} is a"]
    inputs = tokenizer([p.format(request["subject"]) for p in prompts], return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    for row in range(len(rewriting)):
        end = int(inputs["attention_mask"][row].sum())
        labels[row, end - len(target_ids):end] = target_ids
    subtoken = config.fact_token.removeprefix("subject_")
    lookup = [i[0] for i in get_words_idxs_in_templates(tokenizer, prompts, [request["subject"]] * len(prompts),
                                                        subtoken)]
    edited, loss_block = (_module(model, config.layer_module_template.format(layer)),
                          _module(model, config.layer_module_template.format(max(config.v_loss_layer, layer))))
    delta = torch.zeros(head.weight.shape[1], dtype=head.weight.dtype, requires_grad=True)
    seen = {"initial": None}

    def add_delta(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if seen["initial"] is None:
            seen["initial"] = hidden[0, lookup[0]].detach().clone()
        for row, index in enumerate(lookup):
            hidden[row, index, :] += delta
        return output

    def keep(module, args, output):
        seen["loss"] = output[0] if isinstance(output, tuple) else output

    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([delta], lr=config.v_lr)
    handles = [edited.register_forward_hook(add_delta), loss_block.register_forward_hook(keep)]
    kl_initial = None
    try:
        for _ in range(config.v_num_grad_steps):
            optimizer.zero_grad()
            logits = model(**inputs).logits
            kl_log_probs = torch.log_softmax(logits[len(rewriting), lookup[-1]][None], dim=-1)
            if kl_initial is None:
                kl_initial = kl_log_probs.detach().clone()
            log_probs = torch.log_softmax(norm(seen["loss"][:len(rewriting)]) @ head.weight.T + head_bias, dim=-1)
            picked = torch.gather(log_probs, 2, labels[:len(rewriting)].clamp_min(0)[..., None])[..., 0]
            nll = (-(picked * (labels[:len(rewriting)] != -100)).sum(1) / len(target_ids)).mean()
            kl = config.kl_factor * torch.nn.functional.kl_div(kl_initial, kl_log_probs, log_target=True,
                                                               reduction="batchmean")
            loss = nll + kl + config.v_weight_decay * delta.norm() / seen["initial"].norm() ** 2
            if loss.item() < 0.05:
                break
            loss.backward()
            optimizer.step()
            limit = config.clamp_norm_factor * seen["initial"].norm()
            if delta.norm() > limit:
                with torch.no_grad():
                    delta.mul_(limit / delta.norm())
    finally:
        for handle in handles:
            handle.remove()
    return (seen["initial"] + delta).detach()


def get_module_input_output_at_words(model, tokenizer, layer, context_templates, words, module_template,
                                     fact_token_strategy):
    return get_reprs_at_word_tokens(model, tokenizer, context_templates, words, module_template.format(layer),
                                    fact_token_strategy.removeprefix("subject_"))
