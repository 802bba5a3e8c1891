"""Loading checkpoints and adapters with errors a user can act on.

Everything fedem writes is a plain HF folder, so loading is `from_pretrained`; this module only turns
the failures a user can cause (a wrong path, a truncated file, an adapter for another base) into one
clear line instead of a traceback from deep inside transformers.

`fedem evaluate` also scores models fedem did not train, through the same `from_pretrained`: any HF
causal-LM folder, a hub repo (`org/name[@revision]`, from the local cache, the Hugging Face Hub or a
fedem hub named by `HF_ENDPOINT`), or a GGUF file, which transformers de-quantises to float32 with
the `gguf` package (`pip install 'fedem[compare]'`).
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import fedem.model.scan  # noqa: F401 — importing it installs fedem's default (fast) scan process-wide
from fedem.errors import UserError
from fedem.model.lora import with_fused_layers
from fedem.model.projection import tile_projections
from fedem.provenance import read_provenance, weights_fingerprint

GGUF_SUFFIX = ".gguf"
HUB_REPO = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")  # org/name[@revision]


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint (or tokenizer) folder."""
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir} holds no tokenizer (tokenizer.json missing)")
    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A full checkpoint folder (config.json + *.safetensors) as a causal LM."""
    if not model_dir.is_dir():
        raise UserError(f"no such checkpoint folder: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a checkpoint: config.json missing")
    if not any(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir} holds no *.safetensors weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load checkpoint {model_dir}: {_first_line(err)}") from None
    tile_projections(model)
    return model


@dataclass(frozen=True)
class ModelSource:
    """Where a causal LM comes from, resolved from what the user typed.

    `location` is a folder (a checkpoint, or the folder holding `gguf_file`) or a hub repo id.
    """

    location: str
    revision: str | None = None
    gguf_file: str | None = None
    on_hub: bool = False

    @property
    def kind(self) -> str:
        return "gguf" if self.gguf_file else "hub" if self.on_hub else "folder"

    def __str__(self) -> str:
        name = f"{self.location}@{self.revision}" if self.revision else self.location
        return f"{name}/{self.gguf_file}" if self.gguf_file else name


def model_source(spec: str | Path, gguf_file: str | None = None) -> ModelSource:
    """Resolve `spec`: an existing folder or `.gguf` file, else a hub repo `org/name[@revision]`.

    `gguf_file` names a GGUF file inside a folder or hub repo; a path ending in `.gguf` needs none.
    """
    path = Path(spec)
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        if gguf_file is not None:
            raise UserError(f"--gguf names a file inside a folder or repo, but {spec} is already a GGUF file")
        return ModelSource(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise UserError(f"no GGUF file {gguf_file} in {path}")
        return ModelSource(str(path), gguf_file=gguf_file)
    if path.suffix == GGUF_SUFFIX or not HUB_REPO.match(str(spec)):
        raise UserError(
            f"no such model: {spec} (not a folder, a .gguf file or a hub repo org/name[@revision])"
        )
    repo, _, revision = str(spec).partition("@")
    return ModelSource(repo, revision=revision or None, gguf_file=gguf_file, on_hub=True)


def load_pretrained(source: ModelSource) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any causal LM and its tokenizer in float32, with a pad token for batching.

    A model without a pad token (most open models) pads with EOS: padded positions are masked, so
    which id fills them does not matter.
    """
    options = {"revision": source.revision, "gguf_file": source.gguf_file}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **options)
        if source.kind == "folder":
            model = load_model(Path(source.location))
        else:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **options)
            tile_projections(model)
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        raise UserError(f"cannot load {source}: {_first_line(err)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def local_folder(spec: str | Path, hub: str | None = None) -> Path:
    """A model as a local folder: a folder as it is, a hub repo `org/name[@revision]` as its snapshot.

    A snapshot is downloaded with `huggingface_hub.snapshot_download` into its cache (a second call is
    served from there): from the Hugging Face Hub, or from any hub that speaks its API — a fedem hub —
    at `hub` (default: `HF_ENDPOINT`). `HF_HUB_OFFLINE=1` reads the cache only. GGUF files are for
    `fedem evaluate`; serving one would mean de-quantising it on every start.
    """
    source = model_source(spec)
    if source.gguf_file is not None:
        raise UserError(f"{spec} is a GGUF file: serve a checkpoint folder or a hub repo instead")
    if not source.on_hub:
        return Path(source.location)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(source.location, revision=source.revision, endpoint=hub)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise UserError(f"cannot download {source}: {_first_line(err)}") from None
    return Path(folder)


def check_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    """Refuse an adapter whose recorded base fingerprint differs from `base_dir`'s weights."""
    recorded = read_provenance(adapter_dir).get("base_sha256")
    if recorded is None:
        return  # an adapter fedem did not write: nothing recorded to check against
    if recorded != weights_fingerprint(base_dir):
        raise UserError(
            f"adapter {adapter_dir} was trained on another base (sha256 {recorded[:12]}…), not on {base_dir}"
        )


def load_adapter(
    model: PreTrainedModel,
    adapter_dir: Path,
    base_dir: Path,
    trainable: bool = False,
    check_base: bool = True,
) -> PeftModel:
    """Wrap `model` with the LoRA adapter in `adapter_dir`, checking it belongs to `base_dir`.

    `trainable=True` is how a relayed adapter is continued: peft loads adapters frozen by default,
    and training a frozen adapter silently changes nothing. `check_base=False` is only for a
    deliberate rebase — continuing training on a new base release, which the caller records.
    """
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a LoRA adapter: adapter_config.json missing")
    if check_base:
        check_adapter_base(adapter_dir, base_dir)
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
        if isinstance(config, LoraConfig):
            config = with_fused_layers(config)
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable, config=config)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"cannot load adapter {adapter_dir}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    """The first line of an exception's message: what a user needs, without transformers' essay."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
