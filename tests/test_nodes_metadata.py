"""What ComfyUI reads off the node classes: ids with the pack prefix, display names, categories, descriptions, and a
tooltip on every input and output."""

EXPECTED = {
    "VQCoreLoadVQModel": "Load VQModel", "VQCoreLoadAutoencoderKL": "Load AutoencoderKL", "VQCoreEncode": "VQ Encode",
    "VQCoreDecode": "VQ Decode", "VQCoreTiledVAEDecode": "Tiled VAE Decode (seamless)",
    "VQCoreTiledVAEEncode": "Tiled VAE Encode (seamless)", "VQCoreLoadVQDiffusion": "Load VQ-Diffusion Checkpoint",
    "VQCoreCLIPTextEncode": "CLIP Text Encode (VQ-Diffusion)", "VQCoreVQDiffusionSampler": "VQ-Diffusion Sampler",
    "VQCoreTruncation": "Truncation and Purity Prior", "VQCoreSeamlessVAE": "Seamless VAE",
}


def test_node_ids_and_display_names(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == EXPECTED
    assert set(pack.NODE_CLASS_MAPPINGS) == set(EXPECTED)
    assert pack.WEB_DIRECTORY == "./web"


def test_every_input_and_output_is_documented(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("vqcore/") and len(cls.DESCRIPTION) > 40, node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), node_id
        assert all(tip.strip() for tip in cls.OUTPUT_TOOLTIPS), node_id
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (kind, *options) in spec.get(section, {}).items():
                assert options and options[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
                if isinstance(kind, list) and "default" in options[0]:
                    assert options[0]["default"] in kind, f"{node_id}.{name}"
