"""Reference AlphaEdit: the algorithm of DESIGN.md written as plainly as possible."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..arch import get_module, stores_keys_first
from ..hparams import AlphaEditHyperParams
from ..modelstate import frozen
from ..positions import absolute_positions, encode_batch, lookup_positions
from ..requests import normalize_request, target_token_ids
from ..timing import Phases
from ..trace import hidden_of, hooks, input_of, with_hidden

log = logging.getLogger(__name__)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def module_reprs_at_words_ref(
    model, tok, templates: Sequence[str], words: Sequence[str], module_name: str,
    fact_token: str, track: str,
) -> torch.Tensor:
    """Input (`track="in"`) or output (`"out"`) of `module_name` at each lookup position.

    One full forward pass per text. Returns (len(templates), d) in the model dtype.
    """
    positions = lookup_positions(tok, templates, words, fact_token)
    device = model.get_input_embeddings().weight.device
    rows = []
    for template, word, pos in zip(templates, words, positions):
        input_ids, mask = encode_batch(tok, [template.format(word)], device)
        seen = {}

        def grab(module, args, kwargs, output, seen=seen):
            seen["x"] = input_of(args, kwargs) if track == "in" else hidden_of(output)

        with torch.no_grad(), hooks(model, {module_name: grab}):
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        rows.append(seen["x"][0, pos])
    return torch.stack(rows)


def compute_ks_ref(model, tok, requests, hparams: AlphaEditHyperParams, layer: int, context_templates) -> torch.Tensor:
    """Keys of each request at layer `layer`: (n_requests, d_k), fp32.

    A request's key is the rewrite-module input at its lookup position, averaged over the
    templates of each context group, then over groups.
    """
    module = hparams.rewrite_module_tmp.format(layer)
    keys = []
    for request in requests:
        group_means = []
        for group in context_templates:
            texts = [context.format(request["prompt"]) for context in group]
            reprs = module_reprs_at_words_ref(
                model, tok, texts, [request["subject"]] * len(texts), module, hparams.fact_token, "in"
            )
            group_means.append(reprs.float().mean(0))
        keys.append(torch.stack(group_means).mean(0))
    return torch.stack(keys)


def compute_z_ref(model, tok, request, hparams: AlphaEditHyperParams, layer: int, context_templates) -> torch.Tensor:
    """Target value z = h0 + delta at the output of block `layer` for one request: (d_model,).

    Optimises delta with Adam so that the model predicts `target_new` after every context
    template + prompt, with a KL term on "{} is a" and a norm penalty (DESIGN step 3).
    """
    request = normalize_request(request)
    subject = request["subject"]
    target_ids = target_token_ids(tok, request["target_new"]["str"])
    rewriting_prompts = [
        context.format(request["prompt"]) + tok.decode(target_ids[:-1])
        for group in context_templates
        for context in group
    ]
    all_prompts = rewriting_prompts + ["{} is a"]
    n_rewrite = len(rewriting_prompts)

    device = model.get_input_embeddings().weight.device
    input_ids, mask = encode_batch(tok, [p.format(subject) for p in all_prompts], device)
    positions = absolute_positions(
        lookup_positions(tok, all_prompts, [subject] * len(all_prompts), hparams.fact_token), mask
    ).tolist()

    # Target tokens sit at the end of each rewriting prompt's real tokens.
    targets = torch.full((n_rewrite, input_ids.shape[1]), -100, dtype=torch.long, device=device)
    for i in range(n_rewrite):
        end = int(mask[i].sum())
        targets[i, end - len(target_ids) : end] = torch.tensor(target_ids, device=device)
    target_mask = (targets != -100).float()

    loss_layer = max(hparams.v_loss_layer, layer)
    layer_name = hparams.layer_module_tmp.format(layer)
    loss_layer_name = hparams.layer_module_tmp.format(loss_layer)
    ln_f = get_module(model, hparams.ln_f_module)
    lm_head = get_module(model, hparams.lm_head_module)
    lm_w = lm_head.weight.T
    lm_b = lm_head.bias if getattr(lm_head, "bias", None) is not None else lm_w.new_zeros(lm_w.shape[1])

    delta_device = _device_of(get_module(model, layer_name))
    delta = torch.zeros(lm_w.shape[0], device=delta_device, requires_grad=True)
    state = {"h0": None, "loss_layer_out": None}

    def add_delta(module, args, kwargs, output):
        hidden = hidden_of(output)
        if state["h0"] is None:
            state["h0"] = hidden[0, positions[0]].detach().clone()
        hidden = hidden.clone()
        for row, pos in enumerate(positions):
            hidden[row, pos] = hidden[row, pos] + delta
        return with_hidden(output, hidden)

    def keep_loss_layer(module, args, kwargs, output):
        state["loss_layer_out"] = hidden_of(output)

    def keep_mlp_output(module, args, kwargs, output):  # norm_anchor's v0: the MLP output at the lookup token
        if "v0" not in state:
            state["v0"] = hidden_of(output)[0, positions[0]].detach().clone()

    readers = {loss_layer_name: keep_loss_layer}
    if hparams.norm_anchor is not None:
        readers[hparams.mlp_module_tmp.format(layer)] = keep_mlp_output

    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    kl_init = None
    top1_evaluations = 0  # early_stop_top1: evaluations with the new target top-1 at every checked position
    with frozen(model), hooks(model, {layer_name: add_delta}), hooks(model, readers):
        for step in range(hparams.v_num_grad_steps):
            opt.zero_grad()
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            kl_log_probs = F.log_softmax(logits[n_rewrite:, positions[n_rewrite]].float(), dim=-1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()

            full_repr = state["loss_layer_out"][:n_rewrite]
            log_probs = torch.log_softmax(ln_f(full_repr) @ lm_w + lm_b, dim=2)
            picked = torch.gather(log_probs, 2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
            nll_each = -(picked * target_mask).sum(1) / len(target_ids)
            nll = nll_each.mean()
            kl = hparams.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
            decay = hparams.v_weight_decay * (delta.norm() / state["h0"].norm() ** 2)
            loss = nll + kl + decay
            log.debug("step %d: loss %.4f = nll %.4f + kl %.4f + decay %.4f; target prob %.4f",
                      step, loss, nll, kl, decay, torch.exp(-nll_each).mean())
            stop_top1 = False
            if hparams.early_stop_top1 is not None and n_rewrite > 1:  # all rewriting prompts but the bare first
                checked = target_mask[1:].bool()
                top1_evaluations += bool((log_probs[1:].argmax(-1) == targets[1:])[checked].all())
                stop_top1 = top1_evaluations >= hparams.early_stop_top1
            if loss < 5e-2 or step == hparams.v_num_grad_steps - 1 or stop_top1:
                break
            loss.backward()
            opt.step()
            max_norm = hparams.clamp_norm_factor * state["h0"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    if hparams.norm_anchor is None:
        return (state["h0"] + delta).detach()
    # NAS: v* = v0 + delta rescaled to the reference norm; above twice the reference, v* = v0
    reference, v0 = hparams.norm_anchor, state["v0"]
    v_star = (v0 + delta).detach()
    if v_star.norm() > 2 * reference:
        v_star = v0
    else:
        v_star = v_star * reference / (v_star.norm() + 1e-10)
    return state["h0"] - v0 + v_star


def apply_alphaedit_ref(
    model, tok, requests, hparams: AlphaEditHyperParams, context_templates,
    P: torch.Tensor, cache_c: torch.Tensor, timings: dict[str, float] | None = None,
    peak_bytes: dict[str, int] | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Edit `model` in place (DESIGN steps 3-5). P, cache_c: (len(layers), d_k, d_k).

    Returns ({layer: weight update, shaped like the weight}, new cache_c on cache_c's device);
    `timings` receives the seconds per phase, `peak_bytes` the peak memory per phase.
    """
    phase = Phases(model.get_input_embeddings().weight.device, timings, peak_bytes)
    requests = [normalize_request(r, i) for i, r in enumerate(requests)]
    z_layer = hparams.layers[-1]
    with phase("z"):
        zs = torch.stack(
            [compute_z_ref(model, tok, r, hparams, z_layer, context_templates) for r in requests], dim=1
        ).float()  # (d_model, n)
    prompts = [r["prompt"] for r in requests]
    subjects = [r["subject"] for r in requests]
    updates = {}
    for i, layer in enumerate(hparams.layers):
        module = get_module(model, hparams.rewrite_module_tmp.format(layer))
        device = module.weight.device
        with phase("keys"):
            keys = compute_ks_ref(model, tok, requests, hparams, layer, context_templates).T.to(device)
            cur_zs = module_reprs_at_words_ref(
                model, tok, prompts, subjects, hparams.layer_module_tmp.format(z_layer), hparams.fact_token, "out"
            ).T.float().to(device)
            block = get_module(model, hparams.layer_module_tmp.format(layer))
            post_norm = getattr(block, "post_feedforward_layernorm", None) if hparams.maps_post_mlp_norm else None
            if post_norm is not None:  # the MLP output at the plain prompts, before the norm
                mlp_out = module_reprs_at_words_ref(model, tok, prompts, subjects, hparams.rewrite_module_tmp.format(
                    layer), hparams.fact_token, "out").T.float().to(device)
        with phase("solve"):
            resid = (zs.to(device) - cur_zs) / (len(hparams.layers) - i)
            if post_norm is not None:
                resid = mlp_change_through_norm_ref(resid, mlp_out, post_norm)
            proj = P[i].to(device, torch.float32)
            cache = cache_c[i].to(device, torch.float32)
            lhs = proj @ (keys @ keys.T + cache) + hparams.L2 * torch.eye(keys.shape[0], device=device)
            upd = torch.linalg.solve(lhs, proj @ keys @ resid.T)  # (d_k, d_model)
            if not stores_keys_first(module):
                upd = upd.T
            with torch.no_grad():
                module.weight.add_(upd.to(module.weight.dtype))
        updates[layer] = upd
    new_cache = cache_c.clone()
    with phase("cache update"):
        for i, layer in enumerate(hparams.layers):
            keys = compute_ks_ref(model, tok, requests, hparams, layer, context_templates).T
            new_cache[i] += (keys @ keys.T).to(new_cache.device, new_cache.dtype)
    return updates, new_cache


def mlp_change_through_norm_ref(resid: torch.Tensor, mlp_out: torch.Tensor, norm) -> torch.Tensor:
    """For a block adding norm(m) = g * m / rms(m) to the residual stream: the change of m (d_model,
    n) that brings norm(m) nearest to norm(m) + resid (d_model, n); mlp_out: m (d_model, n). The
    norm reaches exactly the g * u with mean(u^2) = 1; the nearest is u = g t / (g^2 + mu) with the
    mu giving mean(u^2) = 1 (Lagrange), found by bisection; m moves to the multiple of u nearest it."""
    with torch.no_grad():
        g = norm(torch.ones(1, resid.shape[0], device=resid.device)).double()[0]
    changes = []
    for column in range(resid.shape[1]):
        m = mlp_out[:, column].double()
        t = g * m / m.pow(2).mean().sqrt() + resid[:, column].double()
        moves = (g * t) != 0

        def unit(mu, t=t, moves=moves):
            u = torch.zeros_like(t)
            u[moves] = g[moves] * t[moves] / (g[moves] ** 2 + mu)
            return u

        low = -float((g[moves] ** 2).min())
        high = float((g * t).pow(2).mean().sqrt()) + max(low, 0.0)
        for _ in range(200):
            mid = (low + high) / 2
            if float(unit(mid).pow(2).mean()) > 1:
                low = mid
            else:
                high = mid
        u = unit(high)
        scale = max(float(u @ m / (u @ u)), 0.0)
        changes.append((scale * u - m).float())
    return torch.stack(changes, dim=1)


def nullspace_projector_ref(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U0 U0^T from the singular vectors of `cov` whose singular value is below `threshold`."""
    U, S, _ = torch.linalg.svd(cov, full_matrices=False)
    small = (S < threshold).nonzero(as_tuple=True)[0]
    return U[:, small] @ U[:, small].T
