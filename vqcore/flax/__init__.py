"""vqcore.flax: the KL autoencoder in JAX/Flax Linen, loading every file vqcore.load_autoencoder_kl reads.

    import jax
    from vqcore.flax import FlaxAutoencoderKL, load_autoencoder_kl

    model, params = load_autoencoder_kl("ae.safetensors", dtype="bf16")      # any layout; family= as for torch
    posterior = model.apply({"params": params}, images, method=FlaxAutoencoderKL.encode)   # images NCHW, [-1, 1]
    latents = posterior.sample(jax.random.key(0))                            # or posterior.mode()
    pixels = model.apply({"params": params}, latents, method=FlaxAutoencoderKL.decode)

JAX and Flax are optional (not among vqcore's requirements): `pip install jax flax`. `import vqcore` never imports
them; importing this package without them raises one VQCoreError that names the missing package.
"""

from ..errors import VQCoreError

try:
    import jax  # noqa: F401
    import flax.linen  # noqa: F401
except ImportError as e:
    raise VQCoreError(
        f"vqcore.flax needs the optional package {(e.name or 'jax').split('.')[0]!r}, which is not installed: pip install jax flax"
    ) from e

from .autoencoder_kl import FlaxAutoencoderKL, FlaxDiagonalGaussian  # noqa: E402
from .loading import load_autoencoder_kl, params_from_state_dict  # noqa: E402

__all__ = ["FlaxAutoencoderKL", "FlaxDiagonalGaussian", "load_autoencoder_kl", "params_from_state_dict"]
