"""The pack's ComfyUI nodes: thin shells over vqcore, wired to the host through nodes/host.py."""

from . import autoencoder_nodes, diffusion_nodes, seamless_vae_node

NODES = {**autoencoder_nodes.NODES, **seamless_vae_node.NODES, **diffusion_nodes.NODES}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}
