"""MEMIT's target optimisation as the reference code runs it: one request at a time, whole model.

:func:`single_request_targets` follows ``compute_z`` of kmeng01/memit step by step for each request
alone: its context prompts and one KL prompt ``"{subject} is a"`` padded to the longest of them,
the whole model run every step (logits and log-softmax at every position), ``delta`` added at the
fact token of the last edited block's output,

    loss = mean over prompts of the target's mean token NLL
           + kl_factor * KL(p || p_init)            (``kl_div(init, p, log_target=True)``)
           + v_weight_decay * ||delta|| / ||h||^2,

a stop once the loss is below ``loss_stop`` (the reference's 5e-2), Adam, and the clamp
``||delta|| <= clamp_norm_factor * ||h||``. It reads the inputs (context templates, fact-token
positions, target tokens) from a :class:`~fedke.editing.MemitEditor`, so it optimises exactly the
targets the editor's batched :meth:`~fedke.editing.MemitEditor.compute_targets` does: the
benchmark ``bench/memit_speed.py`` times the two side by side, and the tests hold them equal.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedke.data.records import EditRequest
from fedke.editing.memit import MemitEditor, Targets, _block_output_dim, _request_keys
from fedke.editing.presets import get_module


def single_request_targets(editor: MemitEditor, requests: Sequence[EditRequest]) -> Targets:
    """Target vectors of ``requests``, each optimised alone as the reference does (see the module)."""
    requests = list(requests)
    if not requests:
        raise ValueError("no edit requests")
    editor._check_requests(requests)
    model = editor.model
    was_training = model.training
    model.eval()
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        pairs = [_one_request(editor, request) for request in requests]
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    z = torch.stack([target for target, _, _ in pairs]).to(torch.float64)
    h_init = torch.stack([init for _, init, _ in pairs]).to(torch.float64)
    return Targets(_request_keys(requests), z, h_init, editor._target_signature(), tuple(n for _, _, n in pairs))


def _one_request(editor: MemitEditor, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor, int]:
    cfg, model, tokenizer, device = editor.config, editor.model, editor.tokenizer, editor.device
    target_ids = editor._target_ids(request.target_new)
    templates, subjects, _ = editor._prompts_with_context([request])
    rows, lookups, target_positions = [], [], []
    for template, subject in zip(templates + [cfg.kl_prompt], subjects + [request.subject]):
        prompt_ids = tokenizer(template.format(subject))["input_ids"]
        lookups.append(editor._lookup_index(template, subject, len(prompt_ids)))
        target_positions.append([len(prompt_ids) - 1 + t for t in range(len(target_ids))])
        rows.append(prompt_ids + target_ids[:-1] if len(rows) < len(templates) else prompt_ids)
    width = max(len(row) for row in rows)  # padding=True: the longest prompt
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    n_rewrite = len(templates)
    targets = torch.full((n_rewrite, width), -100, dtype=torch.long, device=device)
    for i in range(n_rewrite):
        targets[i, target_positions[i]] = torch.tensor(target_ids, device=device)
    mask = (targets != -100).float()

    block = get_module(model, editor.preset.block_name(editor.preset.layers[-1]))
    delta = torch.zeros(_block_output_dim(model), device=device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def edit_output(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if "target_init" not in state:  # the clean sentence: the first context, "{}"
            state["target_init"] = hidden[0, lookups[0]].detach().clone()
        hidden = hidden.clone()
        for i, index in enumerate(lookups):
            hidden[i, index] = hidden[i, index] + delta.to(hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    optimizer = torch.optim.Adam([delta], lr=cfg.v_lr)
    kl_init, passes = None, 0
    handle = block.register_forward_hook(edit_output)
    try:
        for step in range(cfg.v_num_grad_steps):
            passes = step + 1
            optimizer.zero_grad()
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            kl_log_probs = torch.log_softmax(logits[n_rewrite:, lookups[n_rewrite]].float(), dim=1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            log_probs = torch.log_softmax(logits[:n_rewrite].float(), dim=2)
            token_lp = torch.gather(log_probs, 2, torch.where(targets != -100, targets, 0).unsqueeze(2)).squeeze(2)
            nll = (-(token_lp * mask).sum(1) / len(target_ids)).mean()
            kl = cfg.kl_factor * torch.nn.functional.kl_div(kl_init, kl_log_probs, log_target=True,
                                                            reduction="batchmean")
            weight_decay = cfg.v_weight_decay * (delta.norm() / state["target_init"].norm() ** 2)
            loss = nll + kl + weight_decay
            if loss < cfg.loss_stop or step == cfg.v_num_grad_steps - 1:
                break
            loss.backward()
            optimizer.step()
            max_norm = cfg.clamp_norm_factor * state["target_init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        handle.remove()
    return state["target_init"] + delta.detach(), state["target_init"], passes
