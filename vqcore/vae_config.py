"""Config overrides for autoencoders: what a user says about a model that its tensor shapes cannot (GroupNorm groups,
activation, sample size, latent constants), in one of three forms:

* a dict of diffusers config fields: `config={"norm_num_groups": 8, "scaling_factor": 0.13025}`;
* a diffusers `config.json` (or the folder holding one);
* a taming / LDM YAML (`model.params.ddconfig` with `ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`,
  `z_channels`, `double_z`, `in_channels`, `out_ch`, `resolution`; `embed_dim`, `n_embed` beside it; an SD
  inference YAML's `first_stage_config` and `scale_factor` too). Training settings (`lossconfig`, `dropout`, ...)
  are ignored. What the original code fixes (32 GroupNorm groups, SiLU) can be given under the diffusers names in
  `ddconfig` or `params`, e.g. `norm_num_groups: 8`.

A single weight file picks up such a file beside it with the same stem (`model.ckpt` + `model.yaml` / `model.yml` /
`model.json`), and says so in the log. Every field the weights determine too is checked against them: a
contradiction is a CheckpointError naming the field, the config file and what the weights say.
"""

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .autoencoder_kl import AutoencoderKL
from .checkpoint import read_json, read_yaml
from .errors import CheckpointError
from .vae_layouts import SHAPE_FIELDS
from .vq_model import VQModel

log = logging.getLogger("vqcore")
SIDECAR_SUFFIXES = (".yaml", ".yml", ".json")
CLASS_FIELDS = {cls.__name__: set(inspect.signature(cls.__init__).parameters) - {"self"} for cls in (VQModel, AutoencoderKL)}
DESCRIPTIONS = {"VQModel": "a VQ autoencoder (VQModel)", "AutoencoderKL": "a KL autoencoder (AutoencoderKL)"}
# taming/LDM ddconfig options the diffusers architecture has no equivalent for, with the value it does implement.
UNSUPPORTED_DDCONFIG = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False}
SUPPORTED_ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")


@dataclass
class ConfigOverride:
    """Config fields from one place; `origins` says, per field, what in the source it was made of (for messages)."""

    fields: dict
    source: str
    origins: dict = field(default_factory=dict)
    strict: bool = True  # unknown fields are errors (typed by a user), not ignored (written by a newer tool)


def read_override(config) -> ConfigOverride:
    """The `config=` argument of the loaders: a dict of diffusers fields, or a path to a config.json, a folder
    holding one, or a taming/LDM YAML."""
    if isinstance(config, dict):
        return ConfigOverride(dict(config), "config=")
    if not isinstance(config, (str, Path)):
        raise CheckpointError(f"config= must be a dict of diffusers config fields or the path of a .json/.yaml "
                              f"config file; got {type(config).__name__}")
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix.lower() == ".json":
        return ConfigOverride(read_json(path), str(path), strict=False)
    if path.suffix.lower() in (".yaml", ".yml"):
        return yaml_override(read_yaml(path), path)
    raise CheckpointError(f"{path}: a config must be a .json (diffusers) or .yaml (taming / LDM) file")


def sidecar_override(weight_file) -> ConfigOverride | None:
    """The config file beside a single weight file with the same stem, if there is one."""
    weight_file = Path(weight_file)
    found = [weight_file.with_suffix(s) for s in SIDECAR_SUFFIXES if weight_file.with_suffix(s).is_file()]
    if not found:
        return None
    if len(found) > 1:
        raise CheckpointError(f"{weight_file}: several config files beside it ({', '.join(p.name for p in found)}); "
                              f"keep one, or pass config= to choose")
    log.info("%s: using the config file beside it, %s", weight_file, found[0].name)
    return read_override(found[0])


def yaml_override(doc: dict, path) -> ConfigOverride:
    """diffusers fields from a taming / LDM YAML; a YAML without ddconfig may hold diffusers fields directly."""
    params = _find_ddconfig_owner(doc)
    if params is None:
        if set(doc) <= set().union(*CLASS_FIELDS.values()) | {"_class_name"}:
            return ConfigOverride(dict(doc), str(path))
        raise CheckpointError(f"{path}: no model.params.ddconfig (a taming / LDM autoencoder config) and not a mapping "
                              f"of diffusers config fields (found {', '.join(map(str, list(doc)[:8]))})")
    dd = params["ddconfig"]
    if not isinstance(dd, dict):
        raise CheckpointError(f"{path}: ddconfig is a {type(dd).__name__}, not a mapping")
    fields, origins = {}, {}

    def put(name, value, origin):
        fields[name], origins[name] = value, origin

    for option, supported in UNSUPPORTED_DDCONFIG.items():
        if option in dd and dd[option] != supported:
            raise CheckpointError(f"{path}: ddconfig {option}: {dd[option]} is not supported (only {supported})")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in SUPPORTED_ATTN_TYPES:
        raise CheckpointError(f"{path}: ddconfig attn_type: {attn_type} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ATTN_TYPES)})")
    if "double_z" in dd:
        put("_class_name", "AutoencoderKL" if dd["double_z"] else "VQModel", f"ddconfig double_z: {dd['double_z']}")
    elif "n_embed" in params:
        put("_class_name", "VQModel", "n_embed")
    for yaml_name, name in (("in_channels", "in_channels"), ("out_ch", "out_channels"), ("z_channels", "latent_channels"),
                            ("num_res_blocks", "layers_per_block"), ("resolution", "sample_size")):
        if yaml_name in dd:
            put(name, _integer(dd[yaml_name], f"ddconfig {yaml_name}", path), f"ddconfig {yaml_name}")
    if "ch" in dd and "ch_mult" in dd:
        ch, mult = _integer(dd["ch"], "ddconfig ch", path), _integers(dd["ch_mult"], "ddconfig ch_mult", path)
        put("block_out_channels", [ch * m for m in mult], f"ddconfig ch: {ch} × ch_mult: {mult}")
        attention = _attention_levels(dd, len(mult), attn_type, path)
        if attention is not None:
            origin = f"ddconfig attn_resolutions: {dd.get('attn_resolutions')} at resolution {dd.get('resolution')}"
            put("down_block_types", ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention], origin)
            put("up_block_types", ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)], origin)
    if attn_type == "none":
        put("mid_block_add_attention", False, "ddconfig attn_type: none")
    if "n_embed" in params:
        put("num_vq_embeddings", _integer(params["n_embed"], "n_embed", path), "n_embed")
    if "embed_dim" in params:
        embed_dim = _integer(params["embed_dim"], "embed_dim", path)
        if fields.get("_class_name") == "AutoencoderKL":
            if "latent_channels" in fields and embed_dim != fields["latent_channels"]:
                raise CheckpointError(f"{path}: embed_dim: {embed_dim} differs from ddconfig z_channels: "
                                      f"{fields['latent_channels']}; a KL autoencoder here has one latent width")
        else:
            put("vq_embed_dim", embed_dim, "embed_dim")
    scale = _find_key(doc, "scale_factor")
    if scale is not None:
        put("scaling_factor", float(scale), "scale_factor")
    for name in set().union(*CLASS_FIELDS.values()):  # diffusers names for what the original code fixes
        for owner, where in ((dd, "ddconfig"), (params, "params")):
            if name in owner:
                put(name, owner[name], f"{where} {name}")
    return ConfigOverride(fields, str(path), origins)


def _find_ddconfig_owner(doc):
    """The mapping that holds `ddconfig`, breadth-first (taming: model.params; SD: model.params.first_stage_config
    .params)."""
    queue = [doc]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if "ddconfig" in node:
                return node
            queue.extend(v for v in node.values() if isinstance(v, dict))
    return None


def _find_key(doc, key):
    queue = [doc]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if key in node:
                return node[key]
            queue.extend(v for v in node.values() if isinstance(v, dict))
    return None


def _integer(value, what, path):
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{path}: {what} must be an integer; got {value!r}")
    return value


def _integers(value, what, path):
    if not isinstance(value, (list, tuple)) or not value:
        raise CheckpointError(f"{path}: {what} must be a non-empty list of integers; got {value!r}")
    return [_integer(v, what, path) for v in value]


def _attention_levels(dd, levels, attn_type, path):
    """Which levels have attention: taming's encoder and decoder attend at level i when the map there,
    resolution / 2**i, is in attn_resolutions."""
    if attn_type == "none":
        return [False] * levels
    if "attn_resolutions" not in dd:
        return None
    resolutions = _integers(dd["attn_resolutions"], "ddconfig attn_resolutions", path) if dd["attn_resolutions"] else []
    if resolutions and "resolution" not in dd:
        raise CheckpointError(f"{path}: ddconfig attn_resolutions needs resolution to place the attention levels")
    return [dd.get("resolution", 0) // 2**i in resolutions for i in range(levels)]


# ---------------------------------------------------------------------------------------------------------------
# Applying overrides


def folder_override(config_json: dict, path, class_name) -> ConfigOverride:
    """A diffusers folder's config.json as an override, with the model class's defaults where it lacks an
    architecture field (as diffusers reads it), so that a default that does not fit the weights is reported as
    such instead of as a list of unexpected keys."""
    cls = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}[class_name]
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if name in SHAPE_FIELDS and name not in config_json}
    origins = {name: f"{name} (not set; {class_name}'s default)" for name in defaults}
    return ConfigOverride({**defaults, **config_json}, str(path), origins, strict=False)


def apply_overrides(config: dict, shapes: dict, overrides, source) -> dict:
    """config updated with the overrides' fields, later ones winning; each field must belong to the model the
    weights hold, and the value that wins must agree with the weights where they determine it (a contradiction
    names the override that set it)."""
    class_name = shapes["_class_name"]
    other = next(name for name in CLASS_FIELDS if name != class_name)
    config, set_by = dict(config), {}
    for override in overrides:
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in override.fields.items()}
        given_class = fields.get("_class_name")
        if given_class in DESCRIPTIONS and given_class != class_name:
            origin = override.origins.get("_class_name", f"_class_name: {given_class}")
            raise CheckpointError(f"{override.source}: {origin} describes {DESCRIPTIONS[given_class]}, but the "
                                  f"weights of {source} are {DESCRIPTIONS[class_name]}")
        for name, value in fields.items():
            if name.startswith("_"):
                continue
            if name not in CLASS_FIELDS[class_name]:
                if name in CLASS_FIELDS[other]:
                    raise CheckpointError(f"{override.source}: {name} is a field of {DESCRIPTIONS[other]}, but the "
                                          f"weights of {source} are {DESCRIPTIONS[class_name]}")
                if override.strict:
                    raise CheckpointError(f"{override.source}: unknown config field {name!r}; {class_name} fields: "
                                          f"{', '.join(sorted(CLASS_FIELDS[class_name]))}")
                log.warning("%s: ignoring the unknown config field %r", override.source, name)
                continue
            config[name], set_by[name] = value, override
    for name, override in set_by.items():
        if name in shapes and _effective(name, config) != _effective(name, shapes):
            origin = override.origins.get(name, name)
            raise CheckpointError(f"{override.source}: {origin} gives {name} = {config[name]!r}, but the weights of "
                                  f"{source} say {shapes[name]!r}")
    return config


def _effective(name, config):
    """A field's value as the model uses it: vq_embed_dim None means the latent width."""
    if name == "vq_embed_dim" and config.get(name) is None:
        return config.get("latent_channels")
    return config.get(name)
