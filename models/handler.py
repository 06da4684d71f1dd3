"""Beam RunInference model handler for the ECG language model.

It is Beam's `PytorchModelHandlerKeyedTensor`, with two changes that the model needs:

* `load_model` reads the safetensors artifact (local or gs://) and checks its hash,
  where Beam's default would `torch.load` a pickled state dict;
* `run_inference` makes the batch's RR features in one go (`with_rr_features`: row by row
  they cost more than the model), and pads each batch, because records have different
  numbers of leads and beats and Beam's default inference function stacks equal-shaped
  tensors only; it scores p_af of strips up to 96 beats as the mean over short runs of
  beats where the model asks for it (`models.burden.windowed_p_af`), and adds AF burden
  and episodes for long rows (`models.burden`, windows of 48 beats); and it refuses
  (`ArtifactError`) examples made from another tokenizer's token rows, whose word ids
  would mean nothing to this model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerKeyedTensor

from ecgtok.models.burden import burden_of_examples, windowed_p_af
from ecgtok.models.model import (
    WEIGHTS_FILE,
    EcgLM,
    collate,
    load_model,
    pick_device,
    tokenizer_number,
    with_rr_features,
)
from ecgtok.models.tokenizer import ArtifactError, _join


class EcgModelHandler(PytorchModelHandlerKeyedTensor):
    """Scores examples made by `models.model.row_to_example`, in padded batches."""

    def __init__(self, model_dir: str, device: str = "auto", max_batch_size: int = 64) -> None:
        super().__init__(
            state_dict_path=_join(model_dir, WEIGHTS_FILE),
            model_class=EcgLM,
            model_params={},
            device="CPU",
            min_batch_size=1,
            max_batch_size=max_batch_size,
        )
        self._model_dir = model_dir
        self._requested_device = device

    def load_model(self) -> torch.nn.Module:
        model, config = load_model(self._model_dir, pick_device(self._requested_device))
        model.model_id = config["model_id"]
        model.tokenizer_id = config.get("tokenizer_id", "")
        model.p_af_threshold = float(config.get("p_af_threshold", 0.5))
        return model

    def run_inference(
        self,
        batch: Sequence[dict[str, torch.Tensor]],
        model: torch.nn.Module,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        check_tokenizer(batch, getattr(model, "tokenizer_id", ""))
        batch = with_rr_features(list(batch))
        device = next(model.parameters()).device
        with torch.inference_mode():
            inputs = {k: v.to(device) for k, v in collate(batch).items()}
            out = model(**inputs)
        out = {k: v.float().cpu().numpy() for k, v in out.items()}
        for i, p_af in windowed_p_af(model, batch, device).items():
            out["p_af"][i] = p_af
        burden = burden_of_examples(model, batch, getattr(model, "p_af_threshold", 0.5), device)
        for i, example in enumerate(batch):
            inference = {k: v[i] for k, v in out.items()}
            if i in burden:
                inference.update(burden[i])
            yield PredictionResult(example, inference, model.model_id)

    def get_metrics_namespace(self) -> str:
        return "ecgtok_score"


def check_tokenizer(batch: Sequence[dict[str, torch.Tensor]], tokenizer_id: str) -> None:
    """Raise ArtifactError when an example comes from another tokenizer than the model's."""
    if not tokenizer_id:
        return
    want = tokenizer_number(tokenizer_id)
    for example in batch:
        got = example.get("tokenizer")
        if got is not None and int(got) != want:
            raise ArtifactError(
                f"token rows were made by tokenizer {int(got):015x}..., but model expects "
                f"tokenizer {tokenizer_id}: re-tokenize with the model's tokenizer or use a "
                "model trained on these tokens"
            )
