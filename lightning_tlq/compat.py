"""Work-arounds for upstream bugs, one function each, with the versions they concern."""

from __future__ import annotations

from torch import nn


def restore_output_capturing(model: nn.Module) -> nn.Module:
    """Re-register transformers' output-capture specs for every submodel of ``model`` (idempotent).

    Work-around for a transformers 5.x bug: ``PreTrainedModel.post_init`` fills a registry keyed by class name
    (``output_capturing._CAN_RECORD_REGISTRY``) that unpickling does not. In a ``ddp_spawn`` worker a model built in
    the main process therefore installs no capture hooks, and e.g. LLaVA fails in every forward with
    ``'NoneType' object is not subscriptable`` (its vision features read ``hidden_states``). :class:`TLQCallback`
    calls this in ``setup``, before training touches the model.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # other transformers versions: nothing to repair
        return model
    for module in model.modules():
        specs = getattr(module, "_can_record_outputs", None)
        if isinstance(module, PreTrainedModel) and specs and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = specs
    return model
