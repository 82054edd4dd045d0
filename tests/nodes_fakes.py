"""A recording stand-in for the ComfyUI modules nodes/host.py talks to (comfy.model_management, comfy.model_patcher,
comfy.utils, comfy.cli_args, folder_paths). Every call lands in one ordered event list, so tests can assert what happened when."""

import types

import torch


class InterruptProcessingException(Exception):
    pass


class FakeHost:
    def __init__(self, models_dir, folders_cls, free_memory=8 << 30):
        self.events = []  # ("load", patchers, memory_required, force_full_load), ("progress", ...), ...
        self.progress_bars = []
        self.free_memory = free_memory
        self.interrupt_after_checks = None  # raise on the n-th interrupt check (None: never)
        self.interrupt_checks = 0
        self.folders = folders_cls(models_dir)
        self.mm = self._model_management()
        self.model_patcher = types.SimpleNamespace(ModelPatcher=self._patcher_class())
        self.utils = types.SimpleNamespace(ProgressBar=self._progress_class())
        # the user's preview method ("none" turns previews off) and size, as ComfyUI's arguments hold them
        self.cli_args = types.SimpleNamespace(args=types.SimpleNamespace(preview_method="auto", preview_size=512),
                                              LatentPreviewMethod=types.SimpleNamespace(NoPreviews="none"))

    def modules(self):
        return {"model_management": self.mm, "model_patcher": self.model_patcher, "utils": self.utils,
                "folder_paths": self.folders, "cli_args": self.cli_args}

    def _model_management(self):
        host = self

        def cpu():
            return torch.device("cpu")

        def load_models_gpu(models, memory_required=0, force_full_load=False, **kwargs):
            host.events.append(("load", list(models), memory_required, force_full_load))
            for patcher in models:
                patcher.model.to(patcher.load_device)

        def processing_interrupted():
            host.interrupt_checks += 1
            host.events.append(("interrupt_check", host.interrupt_checks))
            return host.interrupt_after_checks is not None and host.interrupt_checks >= host.interrupt_after_checks

        def throw_exception_if_processing_interrupted():
            if processing_interrupted():
                raise InterruptProcessingException()

        return types.SimpleNamespace(
            get_torch_device=cpu, vae_device=cpu, vae_offload_device=cpu, text_encoder_device=cpu,
            text_encoder_offload_device=cpu, unet_offload_device=cpu, intermediate_device=cpu,
            vae_dtype=lambda device=None, allowed_dtypes=(): torch.float32,
            get_free_memory=lambda dev=None, torch_free_too=False: host.free_memory,
            load_models_gpu=load_models_gpu, processing_interrupted=processing_interrupted,
            throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
            InterruptProcessingException=InterruptProcessingException,
            OOM_EXCEPTION=torch.OutOfMemoryError,
        )

    def _patcher_class(self):
        host = self

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device
                host.events.append(("wrap", self))

        return ModelPatcher

    def _progress_class(self):
        host = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current, self.node_id, self.previews = total, 0, node_id, []
                host.progress_bars.append(self)

            def update_absolute(self, value, total=None, preview=None):
                self.total = total if total is not None else self.total
                self.current = min(value, self.total)
                if preview is not None:
                    self.previews.append(preview)
                host.events.append(("progress", self.current, self.total, preview is not None))

            def update(self, value):
                self.update_absolute(self.current + value)

        return ProgressBar

    def record_compute(self, module, label="compute"):
        """Adds an event each time `module` runs forward."""
        module.register_forward_pre_hook(lambda *_: self.events.append((label,)))

    def index(self, kind):
        return next(i for i, event in enumerate(self.events) if event[0] == kind)
