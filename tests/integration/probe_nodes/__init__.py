"""Test-only nodes the harness installs beside the pack (custom_nodes/integration_probes): they hand the tests exact
float tensors (PNG outputs are 8-bit) and simulate a device running out of memory inside ComfyUI's own VAE decode."""

import os

import comfy.model_management
import folder_paths
import torch
from safetensors.torch import save_file


class TestProbeSaveTensor:
    """Writes an IMAGE exactly, as <output>/probes/<name>.safetensors."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "tensor"})}}

    def save(self, images, name):
        folder = os.path.join(folder_paths.get_output_directory(), "probes")
        os.makedirs(folder, exist_ok=True)
        save_file({"images": images.float().contiguous().cpu()}, os.path.join(folder, f"{name}.safetensors"))
        return {"ui": {"probe_tensors": [name]}}


class TestProbeDecodeOutOfMemory:
    """ComfyUI's VAE decode (what VAE Decode runs) while the first full decode raises the host's out-of-memory
    error; reports how many more times the VAE's own decode ran after it (core's blended retry decodes tile by
    tile through it, a VAE that owns its tiling does not)."""

    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_NODE = True
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",), "samples": ("LATENT",), "name": ("STRING", {"default": "oom"})}}

    def decode(self, vae, samples, name):
        model = vae.first_stage_model
        calls = []
        real_decode = model.decode

        def decode_once_out_of_memory(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise comfy.model_management.OOM_EXCEPTION("out of memory (simulated by the test)")
            return real_decode(*args, **kwargs)

        model.decode = decode_once_out_of_memory
        try:
            images = vae.decode(samples["samples"])
        finally:
            del model.decode
        return {"ui": {"probe_decode_calls_after_oom": [len(calls) - 1]}, "result": (images,)}


NODE_CLASS_MAPPINGS = {"TestProbeSaveTensor": TestProbeSaveTensor,
                       "TestProbeDecodeOutOfMemory": TestProbeDecodeOutOfMemory}
