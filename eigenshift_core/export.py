"""Exports for serving stacks that cannot run our hook: a plain HF model directory, or a PEFT LoRA adapter.

Both carry exactly the rank-k edit W' = W − (W Vₖᵀ diag(1 − α)) Vₖ; neither modifies the loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file
from torch import nn

from eigenshift_core.intervention import Intervention
from eigenshift_core.loading import LoadedModel, output_layer


def _output_layer_key(model: nn.Module) -> str:
    head = output_layer(model)  # type: ignore[arg-type]
    name = next(name for name, module in model.named_modules() if module is head)
    return f"{name}.weight"


def export_hf_model(lm: LoadedModel, intervention: Intervention, out_dir: Path) -> Path:
    """A Hugging Face model directory with the rebuilt lm_head, untied (`tie_word_embeddings: false`),
    which transformers and vLLM load as an ordinary model. Input embeddings keep their original values."""
    intervention.check_model(lm.model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = lm.model
    head_key = _output_layer_key(model)
    rebuilt = intervention.materialize(output_layer(model).weight).to(output_layer(model).weight.dtype)  # type: ignore[arg-type]
    # Clone every tensor: a tied embedding must not share storage with the new head in the file.
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    state[head_key] = rebuilt.contiguous().cpu()
    save_torch_state_dict(state, out_dir, max_shard_size="5GB")
    config = model.config.to_dict()
    config["tie_word_embeddings"] = False
    if "text_config" in config and isinstance(config["text_config"], dict):
        config["text_config"]["tie_word_embeddings"] = False
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    model.generation_config.save_pretrained(out_dir)
    lm.tokenizer.save_pretrained(out_dir)
    (out_dir / "eigenshift.json").write_text(json.dumps(intervention.info, indent=2) + "\n")
    return out_dir


def export_lora_adapter(lm: LoadedModel, intervention: Intervention, out_dir: Path) -> Path:
    """A PEFT LoRA adapter on lm_head equal to the rank-k update: ΔW = B A with
    A = Vₖ (k, d) and B = −W Vₖᵀ diag(1 − α) (vocab, k); r = lora_alpha = k, so PEFT's scaling is 1."""
    from peft import LoraConfig  # peft is only needed for this export

    intervention.check_model(lm.model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head_key = _output_layer_key(lm.model)
    module_name = head_key.removesuffix(".weight")
    weight = output_layer(lm.model).weight.detach().to("cpu", torch.float32)  # type: ignore[arg-type]
    a = intervention.directions.to(torch.float32)  # (k, d)
    b = -(weight @ a.T) * (1.0 - intervention.alphas)  # (vocab, k)
    save_file(
        {
            f"base_model.model.{module_name}.lora_A.weight": a.contiguous(),
            f"base_model.model.{module_name}.lora_B.weight": b.contiguous(),
        },
        str(out_dir / "adapter_model.safetensors"),
    )
    config = LoraConfig(
        r=intervention.k, lora_alpha=intervention.k, lora_dropout=0.0, bias="none",
        target_modules=[module_name], task_type="CAUSAL_LM",
        base_model_name_or_path=str(lm.model.config._name_or_path or lm.model_id),
    )
    config.save_pretrained(str(out_dir))
    return out_dir
