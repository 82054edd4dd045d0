"""CLIP text conditioning for VQ-Diffusion: transformers' CLIPTokenizer + CLIPTextModel, last hidden state with
every token vector (padding included) L2-normalised, as VQ-Diffusion trained it.

Prompts are padded to 77 tokens with "!" (id 0, the original's padding); longer prompts are cut to 77 tokens with a
warning that quotes the cut text.
"""

import logging
from pathlib import Path

import torch

from .checkpoint import read_config, read_folder_state_dict
from .errors import CheckpointError, VQCoreError
from .loading import check_finite, check_keys

log = logging.getLogger(__name__)
MAX_LENGTH = 77
PAD_TOKEN = "!"
WEIGHT_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model")


def load_tokenizer(folder):
    """CLIPTokenizer from vocab.json + merges.txt or tokenizer.json, with VQ-Diffusion's length and padding."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab, merges, fast = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    if vocab.is_file() and merges.is_file():
        # Positional arguments: the keyword form silently builds an empty vocabulary in transformers 5.
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH, pad_token=PAD_TOKEN)
    if fast.is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=MAX_LENGTH, pad_token=PAD_TOKEN)
    raise CheckpointError(
        f"{folder}: no tokenizer files (needs vocab.json and merges.txt, or tokenizer.json); found "
        f"{sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'no such folder'}"
    )


def load_text_model(folder, device="cpu", dtype=None, variant=None):
    """CLIPTextModel from a diffusers text_encoder/ folder; accepts the transformers-4 (`text_model.`) and
    transformers-5 key names. Checked like every other model (vqcore.loading): exact keys and shapes, floating
    point, no NaN/inf."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    config = {k: v for k, v in read_config(folder).items()
              if k not in ("architectures", "transformers_version", "torch_dtype", "dtype")}
    try:
        model = CLIPTextModel(CLIPTextConfig(**config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a CLIP text encoder config: {e}") from e
    file_state = read_folder_state_dict(folder, WEIGHT_STEMS, variant)
    own = model.state_dict()
    prefix = next(iter(own)).split("embeddings.")[0]  # "text_model." under transformers 4, "" under 5
    file_names = {prefix + k.removeprefix("text_model."): k for k in file_state}
    state = {name: file_state[k] for name, k in file_names.items() if not name.endswith("position_ids") or name in own}
    check_keys({k: tuple(v.shape) for k, v in own.items()}, state, "CLIPTextModel", folder,
               lambda name: file_names.get(name, name))
    converted = {k: v.to(dtype or torch.float32) for k, v in state.items()}
    check_finite(converted, folder, lambda name: file_names.get(name, name), original=state)
    model.load_state_dict(converted)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


class VQTextEncoder:
    def __init__(self, tokenizer, text_model):
        self.tokenizer = tokenizer
        self.text_model = text_model

    @classmethod
    def from_folders(cls, tokenizer_folder, text_encoder_folder, device="cpu", dtype=None, variant=None):
        return cls(load_tokenizer(tokenizer_folder), load_text_model(text_encoder_folder, device, dtype, variant))

    @property
    def device(self):
        return self.text_model.device

    def token_ids(self, prompts):
        """(B, 77) ids; tokens past the 77th are cut (the end-of-text token with them) and the cut text logged."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
        if ids.shape[1] > MAX_LENGTH:
            for prompt, cut in zip(prompts, self.tokenizer.batch_decode(ids[:, MAX_LENGTH:])):
                cut = cut.replace(PAD_TOKEN, "").strip()
                if cut:
                    log.warning("prompt longer than CLIP's %d tokens, this part was cut: %r (prompt %r)", MAX_LENGTH, cut, prompt[:60])
            ids = ids[:, :MAX_LENGTH]
        return ids

    @torch.no_grad()
    def encode(self, prompts):
        """list of prompts -> (B, 77, hidden) float32 last hidden states, each token vector L2-normalised."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise VQCoreError(f"prompts must be a non-empty list of strings; got {prompts!r}")
        hidden = self.text_model(self.token_ids(prompts).to(self.device))[0].float()
        return hidden / hidden.norm(dim=-1, keepdim=True)
