"""The pack's ComfyUI nodes: thin shells over vqcore, wired to the host through nodes/host.py.

Node classes (autoencoder_nodes, diffusion_nodes, seamless_vae_node) check widget values and call the rest, and
import none of each other: sockets (the data socket types), handles (what the model sockets carry), compute (running
every model), vae_adapter (ComfyUI's VAE socket), model_choices (the loaders' combos), ui_payloads (the panels' JSON).
"""

from . import autoencoder_nodes, diffusion_nodes, seamless_vae_node

NODES = {**autoencoder_nodes.NODES, **seamless_vae_node.NODES, **diffusion_nodes.NODES}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in NODES.items()}
