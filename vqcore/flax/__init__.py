"""vqcore.flax: the KL autoencoder in JAX/Flax Linen, loading every file vqcore.load_autoencoder_kl reads.

    import jax
    from vqcore.flax import FlaxAutoencoderKL, load_autoencoder_kl

    model, params = load_autoencoder_kl("ae.safetensors", dtype="bf16")      # any layout; family= as for torch
    posterior = model.apply({"params": params}, images, method=FlaxAutoencoderKL.encode)   # images NCHW, [-1, 1]
    latents = posterior.sample(jax.random.key(0))                            # or posterior.mode()
    pixels = model.apply({"params": params}, latents, method=FlaxAutoencoderKL.decode)

JAX and Flax are optional (not among vqcore's requirements): `pip install jax jaxlib flax`. `import vqcore` never
imports them; importing this package without them raises one VQCoreError that names the missing package.
"""

from ..errors import VQCoreError


def missing_package(error):
    """The top-level package whose absence caused an ImportError: the innermost named one (jax re-raises a missing
    jaxlib as its own error without a name)."""
    names = []
    while error is not None:
        if isinstance(error, ImportError) and error.name:
            names.append(error.name)
        error = error.__cause__ or error.__context__
    return (names[-1] if names else "jax").split(".")[0]


try:
    import jax  # noqa: F401
    import flax.linen  # noqa: F401
except ImportError as e:
    raise VQCoreError(f"vqcore.flax needs the optional package {missing_package(e)!r}, which is not installed: "
                      f"pip install jax jaxlib flax") from e

from .autoencoder_kl import FlaxAutoencoderKL, FlaxDiagonalGaussian  # noqa: E402
from .loading import load_autoencoder_kl, params_from_state_dict  # noqa: E402

__all__ = ["FlaxAutoencoderKL", "FlaxDiagonalGaussian", "load_autoencoder_kl", "params_from_state_dict"]
